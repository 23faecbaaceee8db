"""GGUF Q4_K_M: codes tuned in llama.cpp's Q4_K parameterization written exactly, llama.cpp's type mix,
the runs that make it, and llama.cpp loading it."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from hubtool.core.kquant import two_level
from hubtool.formats.export import export_format
from hubtool.formats.gguf import GGUF_TYPES, _llama_permute, kept_out_of_int4, q4_k_m_type, write_gguf
from hubtool.formats.gguf import canonical_format as gguf_format
from hubtool.quant.calib import load_calibration
from hubtool.quant.driver import quantize_model
from hubtool.quant.layers import plan_layers
from hubtool.quant.rtn import quantize_rtn
from hubtool.quant.spec import make_recipe
from tests import tiny
from tests.test_cli_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FMT = "gguf_q4_k_m"
SPEC = GGUF_TYPES[FMT].spec
# Rows of 256 (one Q4_K super-block) so that the 4-bit type applies; 3 layers: llama.cpp's use_more_bits
# picks layer 2 of 3 for attn_v / ffn_down.
SHAPE = dict(layers=3, hidden=256, inter=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> a saved tiny model whose rows split into 256-blocks."""
    cache = {}

    def get(arch):
        if arch not in cache:
            # llama.cpp gives a model whose name says "phi3" Phi-3's special tokens, which the tiny tokenizer lacks
            folder = tmp_path_factory.mktemp("kq-" + arch.replace("phi3", "p"))
            cache[arch] = tiny.build_text_model(arch, folder, **SHAPE)
        return cache[arch]

    return get


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), AutoTokenizer.from_pretrained(
        folder
    )


def _export_rtn(folder, out):
    """RTN codes in the Q4_K parameterization for the linears the mix stores as Q4_K, written as Q4_K_M."""
    model, tok = _load(folder)
    keep = kept_out_of_int4(model, FMT)
    plan = plan_layers(model, SPEC, keep=keep)
    weights = {n: quantize_rtn(model.get_submodule(n).weight.detach(), SPEC) for n in plan.linear_names()}
    export_format(model, tok, weights, SPEC, FMT, out, {"source": "tiny"})
    (path,) = out.glob("*.gguf")
    return model, weights, keep, path


def test_two_level_scales_are_llama_cpp_rule():
    """A super-block's 6-bit codes: llama.cpp's rule (round on largest / 63, the step kept in fp16); the
    stored products are exact."""
    torch.manual_seed(0)
    v = torch.rand(4, 16) * 0.01
    v[0, :8] = 0  # an all-zero super-block: step 0, codes 0
    step, codes, eff = two_level(v)
    assert step.dtype == torch.float16 and codes.dtype == torch.uint8
    assert torch.equal(step[0, 0], torch.tensor(0.0, dtype=torch.float16)) and not codes[0, :8].any()
    want = (v.reshape(4, 2, 8).amax(-1) / 63).half()
    assert torch.equal(step, want)
    assert int(codes.max()) == 63 and torch.equal(eff, step.float().repeat_interleave(8, -1) * codes.float())
    # nearest on the unrounded step, as llama.cpp: within half a step plus the fp16 rounding of 63 steps
    assert (eff - v).abs().max() <= step.float().max() * (0.5 + 63 * 2**-11)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_codes_and_mix_written_exactly(arch, models, tmp_path):
    """Each tuned tensor is Q4_K and dequantizes (gguf package) to hubtool's codes bit for bit; every
    other 2-D tensor has the type llama.cpp's Q4_K_M rules give it and is within its type's error."""
    import gguf
    from gguf import GGUFReader

    model, weights, keep, path = _export_rtn(models(arch), tmp_path)
    reader = GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    listing = {t["name"]: t for t in json.loads((path.parent / "gguf_tensors.json").read_text())["tensors"]}
    cfg, sd = model.config, model.state_dict()
    types = {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        entry = listing[t.name]
        assert entry["type"] == t.tensor_type.name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        key = entry["source"] + (".weight" if entry["tuned"] else "")
        if entry["tuned"]:
            want = weights[entry["source"]].dequantize()
        else:
            want = sd[key].float() + (1.0 if arch == "gemma3" and key.endswith("norm.weight") else 0.0)
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            kv = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            want = _llama_permute(want, cfg.num_attention_heads, kv)
        got = got.reshape(want.shape)
        if entry["tuned"] or t.tensor_type.name == "F32":
            assert torch.equal(got, want), t.name
        else:  # quantized here from the 16-bit weight: Q6_K ~2.7% RMS, Q5_K ~4.5%, Q4_K ~9%
            bound = {"Q6_K": 0.035, "Q5_K": 0.06, "Q4_K": 0.12}[t.tensor_type.name]
            assert (got - want).norm() / want.norm() < bound, t.name
    assert sum(e["tuned"] for e in listing.values()) == len(weights)
    # llama.cpp's Q4_K_M mix for three layers: attn_v / ffn_down of layer 2 in Q6_K, the output in Q6_K
    # (the embedding when tied), a fused qkv in Q5_K, the rest Q4_K.
    v = "attn_qkv" if arch == "phi3" else "attn_v"
    assert types[f"blk.2.{v}.weight"] == ("Q5_K" if arch == "phi3" else "Q6_K")
    assert types[f"blk.0.{v}.weight"] == ("Q5_K" if arch == "phi3" else "Q4_K")
    assert types["blk.2.ffn_down.weight"] == "Q6_K" and types["blk.1.ffn_down.weight"] == "Q4_K"
    tied = arch == "qwen2"
    assert types["token_embd.weight"] == ("Q6_K" if tied else "Q4_K")
    assert ("output.weight" in types) is not tied and types.get("output.weight", "Q6_K") == "Q6_K"
    assert any("Q6_K (llama.cpp's mix)" in why for why in keep.values())


def test_mix_falls_back_like_llama_cpp():
    """Rows that do not split into 256-blocks take llama.cpp's 32-block fallback types."""
    assert q4_k_m_type("blk.3.attn_q.weight", (640, 640), 18, False) == "Q5_0"
    assert q4_k_m_type("blk.0.ffn_down.weight", (640, 2048), 18, False) == "Q6_K"
    assert q4_k_m_type("blk.3.ffn_down.weight", (576, 1536), 30, False) == "Q4_K"
    assert q4_k_m_type("token_embd.weight", (49152, 576), 30, True) == "Q8_0"
    assert q4_k_m_type("blk.0.attn_qkv.weight", (96, 576), 30, False) == "Q5_1"
    assert q4_k_m_type("blk.0.attn_q.weight", (64, 48), 2, False) == "F16"


def test_transformers_reader_gives_back_the_weights(models, tmp_path):
    """transformers' GGUF loader (gguf's dequantizer, undoing the permutation) gives back the tuned codes."""
    from transformers import AutoModelForCausalLM

    model, weights, _, path = _export_rtn(models("llama"), tmp_path)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = back.state_dict()
    for name, iw in weights.items():
        assert torch.allclose(theirs[name + ".weight"], iw.dequantize(), atol=1e-6, rtol=0), name


def test_signround_tunes_in_the_q4_k_parameterization(models):
    """SignRound with the Q4_K grid in its forward: every block's loss below RTN's in the same grid, and the
    codes it returns are what it tuned (two-level scales, 6-bit codes)."""
    model, tok = _load(models("llama"))
    plan = plan_layers(model, SPEC, keep=kept_out_of_int4(model, FMT))
    recipe = make_recipe("light", iters=24, nsamples=8, seqlen=48, batch_size=4, seed=3)
    calib = load_calibration(None, tok, nsamples=8, seqlen=48, seed=3)
    res = quantize_model(model, plan, SPEC, "signround", recipe, calib)
    for bl in res.block_losses:
        assert bl.tuned < bl.rtn, bl
    for name, iw in res.weights.items():
        kq = iw.kquant
        assert kq is not None and int(kq.sc.max()) <= 63 and int(kq.m.max()) <= 63 and int(iw.q.max()) <= 15
        w = model.get_submodule(name).weight.float()
        assert (iw.dequantize() - w).norm() / w.norm() < 0.2, name


def test_cli_gguf_is_q4_k_m_and_runs_alone(capsys, models, tmp_path):
    """``--formats gguf`` writes Q4_K_M (the record says kquant and which linears the mix kept out); with
    another format it is refused in one line before anything is written."""
    assert gguf_format("gguf") == FMT and gguf_format("gguf:Q4_K_M") == FMT
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(models("qwen2")), "-o", str(run), "--method", "rtn", "--formats", "gguf"
    )
    assert code in (0, None), err
    rec = json.loads((run / "run.json").read_text())
    assert rec["spec"]["kquant"] is True and rec["spec"]["group_size"] == 32 and rec["spec"]["sym"] is False
    (variant,) = rec["variants"]
    assert any("Q6_K (llama.cpp's mix)" in s["reason"] for s in variant["skipped"])
    types = variant["formats"][0]["tensor_types"]  # the record says which tensor got which type
    assert types["blk.2.ffn_down.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert list((run / "formats" / FMT).glob("*-Q4_K_M.gguf"))
    dry = tmp_path / "dry"
    code, err = run_cli(
        capsys,
        "upload",
        str(run),
        "--repo-id",
        "acme/tiny",
        "--dry-run",
        str(dry),
        "--layout",
        "repos",
        "--skip-verify",
    )
    assert code in (0, None), err
    card = (dry / "tiny-GGUF" / "README.md").read_text()
    assert "ollama run hf.co/acme/tiny-GGUF:Q4_K_M" in card and "llama-cli -hf acme/tiny-GGUF:Q4_K_M" in card
    assert "llama.cpp's Q4_K_M: 4-bit codes in groups of 32 with 6-bit scales and minimums" in card
    code, err = run_cli(
        capsys, "quantize", str(models("qwen2")), "-o", str(tmp_path / "r2"), "--method", "rtn",
        "--formats", "gguf,hubtool",
    )  # fmt: skip
    assert_one_line_error(code, err, "Q4_K", "--formats gguf:q4_k_m")
    assert not (tmp_path / "r2").exists()


def _llama_cpp():
    from hubtool.stages.verify_gguf import llama_cpp_env, llama_cpp_home

    home = llama_cpp_home()
    if home is None:
        pytest.skip("llama.cpp is not installed (make llama-cpp builds it into the hubtool cache)")
    return home, llama_cpp_env(home)


def test_mix_is_what_llama_quantize_chooses(models, tmp_path):
    """llama.cpp's own llama-quantize, given the same model in 16 bits, picks the same type for every tensor,
    and writes nearly the same blocks as hubtool's RTN."""
    from gguf import GGUFReader

    home, env = _llama_cpp()
    model, tok = _load(models("llama"))
    dense = tmp_path / "dense"
    dense.mkdir()
    write_gguf(
        model, tok, {}, GGUF_TYPES["gguf_q4_0"].spec, "gguf_q4_0", dense, {"source": "tiny"}
    )  # all 16-bit
    (src,) = dense.glob("*.gguf")
    ours = _export_rtn(models("llama"), tmp_path / "ours")[3]
    theirs = tmp_path / "theirs.gguf"
    binary = f"{env.get('LLAMA_CPP_BIN', home / 'build' / 'bin')}/llama-quantize"
    done = subprocess.run(
        [binary, str(src), str(theirs), "Q4_K_M"],
        capture_output=True,
        text=True,
        env={"LD_LIBRARY_PATH": env.get("LLAMA_CPP_LIB_PATH", str(home / "build" / "bin"))},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs_t = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    ours_t = {t.name: t for t in GGUFReader(str(ours)).tensors}
    assert {n: t.tensor_type.name for n, t in ours_t.items()} == {
        n: t.tensor_type.name for n, t in theirs_t.items()
    }
    # hubtool's RTN in the Q4_K form is llama.cpp's Q4_K rule (its make_qkx2_quants fit, its 6-bit rounding);
    # sums in another order flip a few blocks by a step. Q6_K/Q5_K/Q5_0/Q8_0: llama.cpp's references too.
    for name, t in ours_t.items():
        if t.tensor_type.name in ("Q4_K", "Q6_K", "Q5_K"):
            size = {"Q4_K": 144, "Q6_K": 210, "Q5_K": 176}[t.tensor_type.name]
            a = np.asarray(t.data).reshape(-1, size)
            b = np.asarray(theirs_t[name].data).reshape(-1, size)
            assert (a == b).all(-1).mean() >= 0.85, name


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])
def test_llama_cpp_verifies_every_architecture(arch, capsys, models, tmp_path):
    """llama.cpp loads the Q4_K_M of each architecture, and agrees with hubtool's reference."""
    from hubtool.stages.verify import run_verify
    from hubtool.stages.verify_gguf import LLAMA_CPP_BOUND

    _llama_cpp()
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(models(arch)), "-o", str(run), "--method", "rtn", "--formats", "gguf"
    )
    assert code in (0, None), err
    (res,) = run_verify(run, formats=[FMT])
    assert res.passed, res.detail
    assert res.max_rel_error < LLAMA_CPP_BOUND and res.decisive_top1 == 1.0


def test_gemma3_attention_scale_llama_cpp_cannot_store_is_refused(capsys, tmp_path):
    """A Gemma 3 whose query_pre_attn_scalar is not head_dim cannot be a GGUF: one line, before quantizing."""
    folder = tiny.build_text_model("gemma3", tmp_path / "g", query_pre_attn_scalar=256)
    code, err = run_cli(
        capsys, "quantize", str(folder), "-o", str(tmp_path / "r"), "--method", "rtn", "--formats", "gguf"
    )
    assert_one_line_error(code, err, "1/sqrt(256)", "head_dim")
    assert not (tmp_path / "r").exists()


def test_llama_cpp_verifies_q4_k_m_and_catches_a_broken_tensor(capsys, models, tmp_path):
    """hubtool verify's GGUF entry on Q4_K_M: llama.cpp's logits agree with the reference within the bound.
    A GGUF-only run's reference is the file read by transformers (another dequantizer), so a file changed
    after quantize is caught by its sha256 against run.json."""
    from gguf import GGUFReader

    from hubtool.stages.verify import run_verify
    from hubtool.stages.verify_gguf import LLAMA_CPP_BOUND

    _llama_cpp()
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(models("llama")), "-o", str(run), "--method", "rtn", "--formats", "gguf"
    )
    assert code in (0, None), err
    (res,) = run_verify(run, formats=[FMT])
    assert res.passed, res.detail
    assert res.max_rel_error < LLAMA_CPP_BOUND and res.decisive_top1 == 1.0
    assert res.int4_modules == res.expected_modules > 0
    (path,) = (run / "formats" / FMT).glob("*.gguf")
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_K"
    with open(path, "r+b") as f:  # reverse each block's code bytes: same scales, wrong codes
        f.seek(tensor.data_offset)
        data = np.frombuffer(f.read(tensor.n_bytes), dtype=np.uint8).reshape(-1, 144).copy()
        data[:, 16:] = data[:, 16:][:, ::-1]
        f.seek(tensor.data_offset)
        f.write(data.tobytes())
    (res,) = run_verify(run, formats=[FMT])
    assert not res.passed and res.failed_check == "files" and path.name in res.detail, res


def test_compare_and_eval_load_a_gguf_only_run(capsys, models, tmp_path):
    """A run whose only format is GGUF (as Q4_K_M must be) is compared and evaluated through transformers'
    GGUF reader: the int4 model they load holds the file's numbers."""
    import gguf
    from gguf import GGUFReader

    from hubtool.stages.compare import load_int4

    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(models("qwen2")), "-o", str(run), "--method", "rtn", "--formats", "gguf"
    )
    assert code in (0, None), err
    folder = run / "formats" / FMT
    model, _ = load_int4(folder, "cpu", torch.float32)
    (path,) = folder.glob("*.gguf")
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    assert torch.equal(model.state_dict()["model.layers.1.mlp.up_proj.weight"], want.reshape(512, 256))
    for args in (["compare", str(run)], ["eval", str(run), "--tasks", "ppl"]):
        code, err = run_cli(capsys, *args)
        assert code in (0, None), err
    rec = json.loads((run / "run.json").read_text())
    assert rec["comparisons"] and {e["model"] for e in rec["evals"]} == {"bf16", "int4"}
    ppl = {e["model"]: e["value"] for e in rec["evals"]}
    assert 0.8 < ppl["int4"] / ppl["bf16"] < 1.25  # a random tiny model: both near its vocabulary's size
