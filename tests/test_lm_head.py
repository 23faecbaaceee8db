"""--quantize-lm-head int8|int4: the head's math, the hubtool export that stores it (untied from the
embedding), the other formats that keep it 16-bit, loading it, eval's cost of it and the card's line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import hubtool
from hubtool.core.lmhead import int8_dequantize, int8_rows
from hubtool.runtime.int4linear import Int4Linear
from hubtool.runtime.int8linear import Int8Linear
from hubtool.runtime.loader import load_processor
from hubtool.stages import evaluate
from hubtool.stages.card import write_card
from hubtool.stages.quantize import quantize_options, run_quantize
from tests.test_cli_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# logits of the export with the quantized head against the same blocks with the 16-bit head (the
# auto_round export of the same run), relative L2, on tiny random models: int8 ~0.007, int4 ~0.11
LOGIT_BOUND = {"int8": 0.02, "int4": 0.2}


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """(arch, mode) -> a run folder quantized with RTN into hubtool + auto_round with that head mode."""
    cache = {}

    def get(arch, mode):
        if (arch, mode) not in cache:
            out = tmp_path_factory.mktemp(f"lh-{arch}-{mode}")
            opts = quantize_options(
                str(tiny_models(arch)),
                out / "run",
                method="rtn",
                formats=["hubtool", "auto_round"],
                quantize_lm_head=mode,
            )
            run_quantize(opts)
            cache[arch, mode] = out / "run"
        return cache[arch, mode]

    return get


def test_int8_rows_math():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.rand(300, 1) * 3
    q, scale = int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (300,)
    assert int(q.abs().max()) == 127
    assert bool((q.abs().amax(dim=1) == 127).all())  # each row's largest weight maps onto +-127
    err = (int8_dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())  # round to nearest: half a step at most


@pytest.mark.parametrize("arch", ["gemma3", "llama"])  # a head tied to the embedding, and an untied one
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_export_and_load(runs, tiny_models, arch, mode):
    run = runs(arch, mode)
    src = _tensors(tiny_models(arch))
    tied = "lm_head.weight" not in src
    head_w = src["lm_head.weight"] if not tied else src["model.embed_tokens.weight"]

    hub_dir, ar_dir = run / "formats" / "hubtool", run / "formats" / "auto_round"
    cfg = json.loads((hub_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["lm_head"] == mode and cfg["tie_word_embeddings"] is False
    assert ("lm_head" in qc.get("int8_modules", [])) == (mode == "int8")
    assert ("lm_head" in qc["modules"]) == (mode == "int4")
    t = _tensors(hub_dir)
    assert "lm_head.weight" not in t
    assert torch.equal(
        t["model.embed_tokens.weight"], src["model.embed_tokens.weight"]
    )  # the embedding stays
    if mode == "int8":
        assert t["lm_head.qweight"].dtype == torch.int8 and t["lm_head.scales"].dtype == torch.float32
        w = int8_dequantize(t["lm_head.qweight"], t["lm_head.scales"])
        step = t["lm_head.scales"][:, None]
        assert bool(((w - head_w.float()).abs() <= step / 2 * (1 + 1e-5)).all())

    # the other format keeps the 16-bit head, tied as the source ties it
    ar_cfg = json.loads((ar_dir / "config.json").read_text())
    assert ar_cfg.get("tie_word_embeddings", False) == tied
    ar = _tensors(ar_dir)
    assert not any(k.startswith("lm_head.q") for k in ar)
    if not tied:
        assert torch.equal(ar["lm_head.weight"], src["lm_head.weight"])

    model = hubtool.load(hub_dir, dtype=torch.bfloat16)
    ref = hubtool.load(ar_dir, dtype=torch.bfloat16)
    assert isinstance(model.lm_head, Int8Linear if mode == "int8" else Int4Linear)
    assert not hasattr(model.lm_head, "weight")  # no 16-bit copy of the head is made at load
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits.float()
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < LOGIT_BOUND[mode], rel


def test_int8_paths_agree(runs, monkeypatch):
    """The CPU kernel at M = 1 (when built) and the torch path give the same logits to bf16 rounding."""
    model = hubtool.load(runs("gemma3", "int8") / "formats" / "hubtool", dtype=torch.bfloat16)
    head = model.lm_head
    x = torch.randn(1, head.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ head.dequantize(torch.float64).t()
    with torch.no_grad():
        y = head(x)
        first = head.last_backend
        monkeypatch.setenv("HUBTOOL_DENSE_KERNEL", "torch")
        y_torch = head(x)
    assert head.last_backend == "torch"
    for out in (y, y_torch):  # within two bf16 roundings of the exact product of the stored weight
        assert float((out.double() - ref).abs().max()) <= 2 * 2**-8 * float(ref.abs().max())
    if hubtool.kernels.cpu.load():
        assert first == "hubtool"


def test_eval_measures_the_head_and_the_card_says_it(runs, tmp_path):
    run = runs("gemma3", "int8")
    results = evaluate.run_eval(run, ["ppl"], limit=4)
    by_model = {r.model: r.value for r in results if r.task == "ppl_heldout"}
    assert set(by_model) == {"bf16", "int4", "int4, 16-bit head"}
    # the 16-bit-head model is the auto_round export's model (same blocks, the source's head): same perplexity
    ar = hubtool.load(run / "formats" / "auto_round", dtype=torch.bfloat16)
    tok = load_processor(run / "formats" / "auto_round")
    held = evaluate.load_task(evaluate.parse_specs(["ppl"])[0], is_vlm=False, limit=4)
    chunks = evaluate.chunk_tokens(tok(held.text)["input_ids"], evaluate.DEFAULT_SEQLEN, tok.bos_token_id)[:4]
    nll = evaluate.chunk_nll(ar, chunks, "cpu")
    ppl = float(torch.tensor(sum(n for n, _ in nll) / sum(c for _, c in nll)).exp())
    assert abs(by_model["int4, 16-bit head"] - ppl) <= 1e-3 * ppl
    assert by_model["int4"] != by_model["int4, 16-bit head"]

    card = write_card(run).read_text()
    assert "| lm_head | int8, one scale per output row, in the `hubtool` format" in card
    delta = by_model["int4"] - by_model["int4, 16-bit head"]
    line = (
        f"perplexity {by_model['int4']:.3f} with the int8 head, {by_model['int4, 16-bit head']:.3f} "
        f"with the 16-bit head ({delta:+.3f}"
    )
    assert line in card, card


def test_refused_in_one_line(capsys, tiny_models, tmp_path):
    src = str(tiny_models("llama"))
    code, err = run_cli(
        capsys, "quantize", src, "-o", str(tmp_path / "a"), "--method", "rtn", "--formats", "auto_round",
        "--quantize-lm-head", "int8",
    )  # fmt: skip
    assert_one_line_error(code, err, "hubtool format only", "add hubtool to --formats")
    code, err = run_cli(
        capsys, "quantize", src, "-o", str(tmp_path / "b"), "--method", "rtn", "--quantize-lm-head", "int2"
    )
    assert_one_line_error(code, err, "is not a mode", "int8 or int4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_verify_checks_each_format_against_its_own_head(runs):
    """The hubtool export (int4 head) against a reference with that head dequantized, auto_round (16-bit
    head) against one with the source's head: both pass, and the head counts among hubtool's modules."""
    from hubtool.stages.verify import run_verify

    run = runs("llama", "int4")
    results = {(r.format, r.library): r for r in run_verify(run, formats=["hubtool", "auto_round"])}
    for r in results.values():
        assert r.passed, (r.format, r.failed_check, r.detail)
    blocks = results["auto_round", "auto-round"].int4_modules
    assert results["hubtool", "hubtool.load"].int4_modules == blocks + 1
    # one reference could not pass both: the int4 head alone moves the logits past the bound
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = hubtool.load(run / "formats" / "hubtool", dtype=torch.float32)(ids).logits
        b = hubtool.load(run / "formats" / "auto_round", dtype=torch.float32)(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) > results["hubtool", "hubtool.load"].rel_error_bound
