"""`hubtool verify` and the upload gate: each format loaded by its users' library, checked, and refused if broken.

A clean tiny export passes with every library (auto-round, GPTQModel in .venv-gptq, transformers after
``import hubtool``, ``hubtool.load``). Three breakages, each written as if by a buggy exporter (the record's
file hashes follow the broken files, so only verify stands in the way): one module's tensors renamed, one
layer's qweight dropped, a wrong group_size in config.json. Verify names the failing check, and upload then
refuses with one line and no write on the test Hub; ``--skip-verify`` uploads and the card says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hubtool import record as rec
from hubtool.cli import main
from hubtool.errors import HubtoolError
from hubtool.stages.hub import upload
from hubtool.stages.verify import NEW_TOKENS, REL_ERROR_BOUNDS, gptq_python, run_verify
from tests.fake_run import make_run
from tests.test_publish import REPO, TOKEN  # noqa: F401 (TOKEN: the hub fixture's)
from tests.test_publish_safety import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
HAS_GPTQ = gptq_python() is not None
_CLEAN: dict[str, Path] = {}


@pytest.fixture(scope="module")
def clean_run(tiny_models, tmp_path_factory) -> Path:
    """A finished RTN run of the tiny Llama with all three formats, verified once."""
    if "run" not in _CLEAN:
        run = tmp_path_factory.mktemp("verify") / "run"
        with pytest.raises(SystemExit) as exc:
            main(["quantize", str(tiny_models("llama")), "-o", str(run), "--method", "rtn"])
        assert exc.value.code in (0, None)
        _CLEAN["run"] = run
        _CLEAN["results"] = run_verify(run)  # type: ignore[assignment]
    return _CLEAN["run"]


def _writes(server) -> list[tuple[str, str, int]]:
    return [r for r in server.state.requests if r[0] in ("POST", "PUT", "DELETE")]


@pytest.mark.slow
def test_clean_export_passes_with_every_library(clean_run):
    results = _CLEAN["results"]
    libraries = {(r.format, r.library) for r in results}
    want = {("auto_round", "auto-round"), ("hubtool", "transformers"), ("hubtool", "hubtool.load")}
    want.add(("auto_gptq", "gptqmodel" if HAS_GPTQ else "hubtool.load"))
    assert libraries == want
    for r in results:
        assert r.passed, (r.format, r.library, r.failed_check, r.detail)
        assert r.int4_modules == r.expected_modules == 14
        assert not r.missing_modules and not r.extra_modules
        assert r.generated_tokens == NEW_TOKENS
        assert r.max_rel_error <= REL_ERROR_BOUNDS[r.dtype] and r.decisive_top1 == 1.0
        assert r.positions > 0 and r.device == "cpu" and r.version
    record = rec.load(clean_run)
    assert len(record.verify) == len(results)
    for v in record.variants:
        for f in v.formats:
            assert rec.verify_problem(record, v.name, f.name) is None
            assert rec.verified_with(record, v.name, f.name).startswith("verified with ")
    if HAS_GPTQ:
        assert rec.verified_with(record, "int4", "auto_gptq").startswith("verified with gptqmodel 7.")


def _break(run: Path, fmt: str, how: str) -> None:
    """Break one export as a buggy exporter would, and record its files as they are now."""
    folder = run / "formats" / fmt
    weights = folder / "model.safetensors"
    if how == "rename":
        t = load_file(weights)
        old, new = "model.layers.0.mlp.down_proj.", "model.layers.0.mlp.down_projection."
        save_file({k.replace(old, new): v for k, v in t.items()}, weights, metadata={"format": "pt"})
    elif how == "drop":
        t = load_file(weights)
        del t["model.layers.1.self_attn.q_proj.qweight"]
        save_file(t, weights, metadata={"format": "pt"})
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"]["group_size"] = 64
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    record = rec.load(run)
    for f in record.variants[0].formats:
        if f.name == fmt:
            f.files = rec.file_records(folder, run)
    rec.save(record, run)


# (breakage, format broken, the check that catches it for each library that loads that format).
# A renamed module: auto-round builds the layer from config.json and computes from uninitialized codes (NaN
# logits); hubtool.load refuses the checkpoint. A dropped qweight: GPTQModel computes from an uninitialized
# qweight. A wrong group_size: config.json disagrees with the record (and transformers refuses the shapes).
BREAKAGES = [
    ("rename", "auto_round", {"auto-round": "logits"}),
    ("drop", "auto_gptq", {"gptqmodel": "logits", "hubtool.load": "load"}),
    ("group_size", "hubtool", {"transformers": "config", "hubtool.load": "config"}),
    ("drop", "hubtool", {"transformers": "logits", "hubtool.load": "load"}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("how", "fmt", "checks"), BREAKAGES, ids=[f"{b[0]}-{b[1]}" for b in BREAKAGES])
def test_broken_export_fails_verify_and_upload_refuses(how, fmt, checks, clean_run, tmp_path, hub, capsys):
    run = tmp_path / "run"
    shutil.copytree(clean_run, run)
    _break(run, fmt, how)
    results = run_verify(run, formats=[fmt])
    got = {r.library: r.failed_check for r in results}
    assert got == {lib: c for lib, c in checks.items() if lib in got} and len(got) == len(results) >= 1
    assert all(not r.passed for r in results)
    for other in {"auto_round", "auto_gptq", "hubtool"} - {fmt}:  # the others keep their passing results
        assert rec.verify_problem(rec.load(run), "int4", other) is None
    first = results[0]
    with pytest.raises(HubtoolError, match=f"format {fmt} .*check '{first.failed_check}'"):
        upload(run, REPO, endpoint=hub.url)
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--endpoint", hub.url)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fmt in err and "--skip-verify" in err
    assert _writes(hub) == []


def test_unverified_run_is_refused_and_skip_verify_uploads(tmp_path, hub, capsys):
    run = tmp_path / "run"
    make_run(run, variants=1, formats=("auto_round", "hubtool"), verified=False)
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--endpoint", hub.url)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "auto_round" in err and "never verified" in err
    assert _writes(hub) == []
    code, err = cli(capsys, "upload", str(run), "--repo-id", REPO, "--endpoint", hub.url, "--skip-verify")
    assert code in (0, None), err
    card = (run / "card" / "README.md").read_text()
    assert "AutoRound (`int4`, revision `main`): not verified" in card
    assert "hubtool (`int4`, revision `hubtool`): not verified" in card


def test_card_lists_verified_with_per_format(tmp_path):
    from hubtool.stages.card import write_card

    run = tmp_path / "run"
    make_run(run, variants=1, formats=("auto_round", "auto_gptq", "hubtool"))
    card = write_card(run, None).read_text()
    assert "AutoRound (`int4`, revision `main`): verified with auto-round 9.8.7 on cpu" in card
    assert "GPTQ (`int4`, revision `auto_gptq`): verified with gptqmodel 9.8.7 on cpu" in card


def test_a_result_holds_only_for_the_files_it_verified(tmp_path, hub):
    run = tmp_path / "run"
    make_run(run, variants=1, formats=("auto_round",))
    record = rec.load(run)
    record.verify[0].files = "0" * 64  # verified files that were since re-exported
    rec.save(record, run)
    assert "changed since it was verified" in rec.verify_problem(record, "int4", "auto_round")
    with pytest.raises(HubtoolError, match="format auto_round .*changed since it was verified"):
        upload(run, REPO, endpoint=hub.url)
    assert _writes(hub) == []


@pytest.mark.slow
def test_a_vlm_is_verified_on_an_image_prompt_too(tiny_models, tmp_path):
    from hubtool.stages.verify import build_reference, prompt_inputs

    run = tmp_path / "vlm"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(tiny_models("llava")), "-o", str(run), "--method", "rtn"])
    assert exc.value.code in (0, None)
    record = rec.load(run)
    assert record.source.is_vlm
    reference = build_reference(record, run, record.variants[0])
    prompts = prompt_inputs(reference, is_vlm=True)
    assert "pixel_values" in prompts[-1] and not any("pixel_values" in p for p in prompts[:-1])
    results = run_verify(run, formats=["hubtool", "auto_round"])
    assert {r.format for r in results} == {"hubtool", "auto_round"}
    positions = sum(p["input_ids"].shape[1] for p in prompts)  # the image prompt's positions included
    for r in results:
        assert r.passed, (r.format, r.library, r.failed_check, r.detail)
        assert r.positions == positions
        assert r.int4_modules == r.expected_modules > 0
