"""hubtool compare: prompts.yaml validation (before any model loads), the shipped image, and tiny end-to-end runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hubtool import record
from hubtool.assets import DEFAULT_IMAGE, default_image_path, draw_default_image
from hubtool.errors import HubtoolError
from hubtool.stages import compare
from hubtool.stages.prompts import DEFAULT_IMAGE_NAME, default_prompts, load_prompts


# -- run folders (shared with test_evaluate) -------------------------------------------------------
def build_run(src: Path, run_dir: Path) -> Path:
    """A finished quantize run of ``src``: one RTN int4 variant exported in hubtool's format."""
    from hubtool.stages.quantize import QuantizeOptions, run_quantize

    run_quantize(QuantizeOptions(source=str(src), run_dir=run_dir, method="rtn", formats=["hubtool"]))
    return run_dir


@pytest.fixture(scope="session")
def base_runs(tiny_models, tmp_path_factory):
    """arch -> a finished run folder built once per session (copy it before changing it)."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_run(tiny_models(arch), tmp_path_factory.mktemp(f"run-{arch}") / "run")
        return cache[arch]

    return get


@pytest.fixture
def fresh_run(base_runs, tmp_path):
    """arch -> a private copy of a finished run."""

    def get(arch: str) -> Path:
        dest = tmp_path / f"run-{arch}"
        shutil.copytree(base_runs(arch), dest)
        return dest

    return get


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make any model load fail loudly (for checks that must happen first)."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(compare, "load_model", boom)


# -- the shipped image -----------------------------------------------------------------------------
def test_default_image_is_shipped_and_drawn_by_code():
    path = default_image_path()
    assert path == DEFAULT_IMAGE and path.is_file()
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (336, 336) and im.mode == "RGB"
        shipped = im.tobytes()
    assert draw_default_image().tobytes() == shipped  # the committed PNG is what the code draws
    text, image = default_prompts(is_vlm=True)
    assert text.image is None and image.image is not None and image.image_ref == DEFAULT_IMAGE_NAME
    assert len(default_prompts(is_vlm=False)) == 1


# -- prompts.yaml ----------------------------------------------------------------------------------
def _png(path: Path) -> Path:
    draw_default_image(32).save(path)
    return path


def test_prompts_file_parses_with_images_and_defaults(tmp_path):
    _png(tmp_path / "pic.png")
    f = tmp_path / "prompts.yaml"
    f.write_text(
        "prompts:\n"
        "  - text: Hello there\n"
        "    system: Be brief.\n"
        "    max_new_tokens: 5\n"
        "  - text: What is this?\n"
        "    image: pic.png\n"
        "  - Just a string prompt\n"
    )
    ps = load_prompts(f, is_vlm=True)
    assert [p.text for p in ps] == ["Hello there", "What is this?", "Just a string prompt"]
    assert (ps[0].system, ps[0].max_new_tokens, ps[1].max_new_tokens) == ("Be brief.", 5, 64)
    assert ps[1].image.size == (32, 32) and ps[1].image_ref == "pic.png"
    assert [p.line for p in ps] == [2, 5, 7]


@pytest.mark.parametrize(
    "body, needle",
    [
        ("- text: ok\n- max_new_tokens: 3\n", "line 2: missing `text`"),
        ("- text: ok\n- text: hi\n  colour: red\n", "line 2: unknown key 'colour'"),
        ("- text: ok\n  max_new_tokens: many\n", "line 1: max_new_tokens"),
        ("- text: ok\n- text: see\n  image: missing.png\n", "line 2: image missing.png not found"),
        (
            "- text: ok\n- text: see\n  image: broken.png\n",
            "line 2: image broken.png is not a readable image",
        ),
        (
            "- text: see\n  image: http://example.invalid/x.png\n",
            "line 1: image URL http://example.invalid/x.png cannot be fetched offline",
        ),
        ("- text: ok\n- text: a: b\n", "line 2: invalid YAML"),
        ("prompts: 3\n", "expected a non-empty list"),
        ("[]\n", "expected a non-empty list"),
    ],
)
def test_malformed_prompts_are_rejected_with_the_line(tmp_path, monkeypatch, body, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    f = tmp_path / "prompts.yaml"
    f.write_text(body)
    with pytest.raises(HubtoolError) as exc:
        load_prompts(f, is_vlm=True)
    assert needle in exc.value.message, exc.value.message
    assert str(f) in exc.value.message or "expected" in exc.value.message


def test_image_url_is_fetched_when_online(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    _png(tmp_path / "pic.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        f = tmp_path / "p.yaml"
        f.write_text(f"- text: what?\n  image: {url}/pic.png\n- text: and?\n  image: {url}/missing.png\n")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        with pytest.raises(HubtoolError, match="line 3: cannot fetch image .*missing.png"):
            load_prompts(f, is_vlm=True)
        f.write_text(f"- text: what?\n  image: {url}/pic.png\n")
        (p,) = load_prompts(f, is_vlm=True)
        assert p.image.size == (32, 32) and p.image_ref.endswith("/pic.png")
    finally:
        server.shutdown()


def test_image_prompt_for_a_text_model_is_rejected(tmp_path):
    _png(tmp_path / "pic.png")
    f = tmp_path / "p.yaml"
    f.write_text("- text: what?\n  image: pic.png\n")
    with pytest.raises(HubtoolError, match="line 1: this prompt has an image, but the model is text-only"):
        load_prompts(f, is_vlm=False)


def test_compare_rejects_a_bad_prompts_file_before_loading_any_model(fresh_run, tmp_path, no_model_loads):
    run = fresh_run("llama")
    f = tmp_path / "p.yaml"
    f.write_text("- text: fine\n- nope: 1\n")
    with pytest.raises(HubtoolError, match="line 2"):
        compare.run_compare(run, f)
    with pytest.raises(HubtoolError, match="no variant 'nope'"):
        compare.run_compare(run, variants=["nope"])


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_tiny_vlm_default_prompts(fresh_run):
    run = fresh_run("llava")
    events = []
    comps = compare.run_compare(run, progress=events.append)
    assert len(comps) == 2  # one text prompt, one on our own image
    text, img = comps
    assert text.image is None and img.image_source == DEFAULT_IMAGE_NAME
    assert (run / img.image).is_file()  # the picture is kept in the run folder for the card
    for c in comps:
        assert [g.model for g in c.generations] == ["bf16", "int4"]
        for g in c.generations:
            assert g.tokens == len(g.token_ids) > 0 and g.seconds > 0 and g.tokens_per_s > 0
        (a,) = c.agreements
        assert a.model == "int4" and 0.0 <= a.match_share <= 1.0
        assert a.identical == (c.generations[0].token_ids == c.generations[1].token_ids)
    saved = record.load(run)
    assert record.to_dict(saved.comparisons) == record.to_dict(comps) or saved.comparisons == comps
    assert saved.extras["compare"]["loaded_from"] == {"int4": "hubtool"}
    (v,) = saved.variants  # the record says which kernel ran the int4 layers
    assert v.kernel_backend in {"hubtool", "torch", "reference", "hubtool,torch", "hubtool,reference"}
    assert any(e.status == "done" and e.model == "int4" for e in events)


@pytest.mark.slow
def test_compare_tiny_text_model_with_prompts_file(fresh_run, tmp_path):
    run = fresh_run("llama")
    f = tmp_path / "prompts.yaml"
    f.write_text(
        "- text: Say hello.\n  system: You are terse.\n  max_new_tokens: 6\n- text: Count to three.\n  max_new_tokens: 4\n"
    )
    comps = compare.run_compare(run, f)
    assert [c.max_new_tokens for c in comps] == [6, 4]
    assert comps[0].system == "You are terse."
    for c in comps:
        for g in c.generations:
            assert 0 < g.tokens <= c.max_new_tokens
    rec = record.load(run)
    assert len(rec.comparisons) == 2 and rec.comparisons[1].generations[1].model == "int4"
    # re-running one variant keeps the other answers and recomputes agreement
    again = compare.run_compare(run, f, variants=["int4"])
    assert [g.model for g in again[0].generations] == ["bf16", "int4"]
    assert again[0].generations[1].token_ids == comps[0].generations[1].token_ids  # greedy: deterministic


def test_cli_compare_and_eval_are_registered():
    import typer

    from hubtool.cli.evaluate import register

    app = typer.Typer()
    register(app)
    names = {c.name for c in app.registered_commands}
    assert names == {"compare", "eval"}
