"""GGUF Q4_0 export: the tuned codes written exactly, names and metadata as llama.cpp expects, errors early."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hubtool.core.spec import QuantSpec
from hubtool.errors import HubtoolError
from hubtool.formats.export import export_format
from hubtool.formats.gguf import (
    GGUF_TYPES,
    _llama_permute,
    canonical_format,
    check_gguf_request,
    q4_0_blocks,
    q4_0_dequantize,
)
from hubtool.quant.rtn import quantize_rtn
from hubtool.stages.quantize import parse_formats
from tests.test_cli_errors import assert_one_line_error, run_cli
from tests.tiny import TEXT_ARCHS

SPEC = GGUF_TYPES["gguf_q4_0"].spec


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return model, AutoTokenizer.from_pretrained(folder)


def _export(arch, tiny_models, tmp_path):
    """RTN codes (Q4_0 spec) of every linear in the decoder blocks, written as GGUF Q4_0."""
    model, tok = _load(tiny_models(arch))
    weights = {
        name: quantize_rtn(mod.weight.detach(), SPEC)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in name
    }
    out = tmp_path / arch
    export_format(model, tok, weights, SPEC, "gguf_q4_0", out, {"source": f"tiny-{arch}"})
    (path,) = out.glob("*.gguf")
    return model, weights, path


def test_q4_0_spec_is_llama_cpp_rule():
    """hubtool's symmetric g32 RTN is llama.cpp's quantize_row_q4_0_ref (gguf's port) except ties/fp16 scale."""
    import gguf

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    ours = q4_0_blocks(quantize_rtn(w, SPEC))
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert ours.shape == ref.shape
    d_ours = ours.reshape(-1, 18)[:, :2].copy().view(np.float16)
    d_ref = ref.reshape(-1, 18)[:, :2].copy().view(np.float16)
    assert np.array_equal(d_ours, d_ref)  # the same scale rule: max / -8, stored in fp16
    same = (ours.reshape(-1, 18)[:, 2:] == ref.reshape(-1, 18)[:, 2:]).mean()
    assert same > 0.97  # codes differ only where llama.cpp rounds against the unrounded scale
    assert torch.equal(q4_0_dequantize(ours, 256), quantize_rtn(w, SPEC).dequantize())


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_codes_written_exactly(arch, tiny_models, tmp_path, one_thread):
    """Every Q4_0 tensor, dequantized by the gguf package, equals hubtool's dequantized codes bit for bit;
    16-bit tensors are the model's (Gemma norms as 1 + w); metadata names the architecture."""
    import gguf
    from gguf import GGUFReader

    model, weights, path = _export(arch, tiny_models, tmp_path)
    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and "tokenizer.chat_template" in fields
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), 2)
    cfg = model.config
    n_q4 = 0
    for key, value in model.state_dict().items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            assert "output.weight" not in tensors
            continue
        t = tensors[target]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(value.shape)
        linear = key.removesuffix(".weight")
        if linear in weights:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            want = weights[linear].dequantize()
            n_q4 += 1
        else:
            want = value.float() + (1.0 if arch == "gemma3" and key.endswith("norm.weight") else 0.0)
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            kv = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            want = _llama_permute(want, cfg.num_attention_heads, kv)
        assert torch.equal(got.float(), want.float()), key
    assert n_q4 == len(weights)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_transformers_reader_gives_back_the_weights(arch, tiny_models, tmp_path, one_thread):
    """transformers' GGUF loader (an independent dequantizer, undoing the permutation and the norm shift)
    gives back hubtool's int4 weights and the 16-bit ones."""
    from transformers import AutoModelForCausalLM

    model, weights, path = _export(arch, tiny_models, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = back.state_dict()
    for key, value in model.state_dict().items():
        linear = key.removesuffix(".weight")
        want = weights[linear].dequantize() if linear in weights else value.float()
        assert torch.allclose(theirs[key].float(), want, atol=1e-6, rtol=0), key


def test_format_names_and_spec_checks():
    assert parse_formats("gguf:q4_0,auto_round") == ["gguf_q4_0", "auto_round"]
    assert canonical_format("GGUF:Q4_0") == "gguf_q4_0"
    assert parse_formats("gguf") == ["gguf_q4_k_m"]  # llama.cpp's most used type
    with pytest.raises(HubtoolError, match="groups of 32"):
        check_gguf_request("llama", "gguf_q4_0", QuantSpec(4, 128, True))
    with pytest.raises(HubtoolError, match="llama, qwen2, gemma3, phi3"):
        check_gguf_request("mistral", "gguf_q4_0", SPEC)


def test_cli_refuses_before_quantizing(capsys, tiny_models, tmp_path):
    """An unsupported architecture or the wrong spec: one line, exit 2, no run folder."""
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llava")), "-o", str(tmp_path / "r1"), "--method", "rtn",
        "--group-size", "32", "--formats", "gguf:q4_0",
    )  # fmt: skip
    assert_one_line_error(code, err, "llava", "llama, qwen2, gemma3, phi3")
    assert not (tmp_path / "r1").exists()
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llama")), "-o", str(tmp_path / "r2"), "--method", "rtn",
        "--formats", "gguf:q4_0",
    )  # fmt: skip
    assert_one_line_error(code, err, "--group-size 32")
    assert not (tmp_path / "r2").exists()


def _llama_cpp():
    from hubtool.stages.verify_gguf import llama_cpp_home

    home = llama_cpp_home()
    if home is None:
        pytest.skip("llama.cpp is not installed (make llama-cpp builds it into the hubtool cache)")
    return home


def test_llama_cpp_verifies_and_catches_a_broken_tensor(capsys, tiny_models, tmp_path, one_thread):
    """hubtool verify's GGUF entry: llama.cpp loads the file and its logits agree with hubtool's int4
    reference (here from the hubtool export of the same codes) within the bound; the same file with one
    tensor's codes scrambled fails the logits check."""
    from gguf import GGUFReader

    from hubtool import record
    from hubtool.stages.verify import run_verify
    from hubtool.stages.verify_gguf import LLAMA_CPP_BOUND, tokenize

    home = _llama_cpp()
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llama")), "-o", str(run), "--method", "rtn",
        "--group-size", "32", "--formats", "gguf:q4_0,hubtool",
    )  # fmt: skip
    assert code in (0, None), err
    (res,) = run_verify(run, formats=["gguf_q4_0"])
    assert res.passed, res.detail
    assert res.library == "llama.cpp" and res.rel_error_bound == LLAMA_CPP_BOUND
    assert res.max_rel_error < LLAMA_CPP_BOUND and res.decisive_top1 == 1.0 and res.generated_tokens == 4
    assert res.int4_modules == res.expected_modules == 14
    (path,) = (run / "formats" / "gguf_q4_0").glob("*.gguf")
    from tests.tiny import make_tokenizer

    text = "The capital of France is"
    assert tokenize(home, path, [text]) == [
        make_tokenizer()(text)["input_ids"]
    ]  # same tokenizer in llama.cpp
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    with open(path, "r+b") as f:  # reverse the order of the blocks' bytes: same scales, wrong codes
        f.seek(tensor.data_offset)
        data = np.frombuffer(f.read(tensor.n_bytes), dtype=np.uint8).reshape(-1, 18).copy()
        data[:, 2:] = data[:, 2:][:, ::-1]
        f.seek(tensor.data_offset)
        f.write(data.tobytes())
    (res,) = run_verify(run, formats=["gguf_q4_0"])
    assert not res.passed and res.failed_check == "logits", res
    assert record.load(run).verify[-1].passed is False


def test_the_card_shows_llama_cpp_ollama_and_python_for_gguf(capsys, tiny_models, tmp_path, one_thread):
    """The usage of a GGUF format: on its own repo (layout repos) llama-cli -hf, ollama run hf.co/ and
    Llama.from_pretrained with the file named by its type, library_name gguf; on a revision, a download
    from that revision (the -hf / hf.co/ forms read main only)."""
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(tiny_models("llama")), "-o", str(run), "--method", "rtn",
        "--group-size", "32", "--formats", "hubtool,gguf:q4_0",
    )  # fmt: skip
    assert code in (0, None), err
    repos, revs = tmp_path / "repos", tmp_path / "revs"
    for layout, out in (("repos", repos), ("revisions", revs)):
        code, err = run_cli(
            capsys, "upload", str(run), "--repo-id", "acme/tiny", "--dry-run", str(out), "--layout", layout,
            "--skip-verify",
        )  # fmt: skip
        assert code in (0, None), err
    (gguf_file,) = (repos / "tiny-GGUF").glob("*.gguf")
    assert gguf_file.name.endswith("-Q4_0.gguf")
    card = (repos / "tiny-GGUF" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: gguf\n") and "\n- gguf\n" in card
    assert "llama-cli -hf acme/tiny-GGUF:Q4_0" in card and "ollama run hf.co/acme/tiny-GGUF:Q4_0" in card
    assert f'Llama.from_pretrained(repo_id="acme/tiny-GGUF", filename="{gguf_file.name}")' in card
    main_card = (revs / "main" / "README.md").read_text()
    assert main_card.startswith("---\nlibrary_name: transformers\n")
    assert f"hf download acme/tiny {gguf_file.name} --revision gguf_q4_0" in main_card
    assert "ollama run hf.co/acme" not in main_card and "llama-cli -hf acme" not in main_card
    assert (revs / "gguf_q4_0" / gguf_file.name).read_bytes() == gguf_file.read_bytes()


def test_llama3_rope_scaling_is_written_and_llama_cpp_agrees(capsys, tmp_path, one_thread):
    """Llama 3.1+'s RoPE scaling (rope_type llama3) goes into the GGUF as llama.cpp's rope_freqs tensor
    (the converter's factors), and llama.cpp's logits then agree with the scaled model's (a tiny Llama whose
    original context is 64 positions, so that its factors span 1 to 8, the smooth band included)."""
    from gguf import GGUFReader

    from hubtool.formats.gguf import llama3_rope_factors
    from hubtool.stages.verify import run_verify
    from tests import tiny

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = tiny.build_text_model("llama", tmp_path / "src", rope_parameters=rope)
    from transformers import AutoConfig

    factors = llama3_rope_factors(AutoConfig.from_pretrained(src))
    assert factors.shape == (16,) and float(factors.min()) == 1.0 and float(factors.max()) == 8.0
    assert bool(((factors > 1) & (factors < 8)).any())  # the smooth band too
    run = tmp_path / "run"
    code, err = run_cli(
        capsys, "quantize", str(src), "-o", str(run), "--method", "rtn",
        "--group-size", "32", "--formats", "gguf:q4_0,hubtool",
    )  # fmt: skip
    assert code in (0, None), err
    (path,) = (run / "formats" / "gguf_q4_0").glob("*.gguf")
    stored = next(t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    assert np.array_equal(np.asarray(stored.data), factors.numpy())
    _llama_cpp()
    (res,) = run_verify(run, formats=["gguf_q4_0"])
    assert res.passed, res.detail
    # measured: 0.014 with the factors; 0.078 (just inside verify's 0.08) when the file holds factors of 1
    assert res.max_rel_error < 0.03 and res.decisive_top1 == 1.0
