"""The model card: rendered from run.json only, metadata the Hub's parser reads, sandboxed templates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hubtool import record as rec
from hubtool.errors import HubtoolError
from hubtool.stages.card import AUTOROUND_BIBTEX, CHART_NAME, card_metadata, render_card, write_card
from tests.fake_run import make_run

NUMBER = re.compile(r"(?<![\w.\-])\d+(?:\.\d+)?(?!\w)")


def _walk(obj, out_nums: list[float], out_strs: list[str]) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        out_nums.append(float(obj))
    elif isinstance(obj, str):
        out_strs.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out_strs.append(str(k))
            _walk(v, out_nums, out_strs)
    elif isinstance(obj, list):
        out_nums.append(float(len(obj)))
        for v in obj:
            _walk(v, out_nums, out_strs)


def allowed_numbers(record: rec.RunRecord) -> set[str]:
    """Every way the card may print a figure of the record: as is, rounded, as a percentage, in GiB."""
    nums: list[float] = []
    strs: list[str] = []
    _walk(rec.to_dict(record), nums, strs)
    # the eval table's average row: the mean of each model's averaged (higher-is-better, primary) values
    by_model: dict[str, list[float]] = {}
    for r in record.evals:
        if r.higher_is_better and r.extra.get("primary") and r.kind != "perplexity":
            by_model.setdefault(r.model, []).append(r.value)
    nums += [sum(v) / len(v) for v in by_model.values()]
    forms: set[str] = set()
    for s in strs:
        forms.update(NUMBER.findall(s))
    for v in nums:
        for x in (v, v * 100, v / 2**30, v / 2**20):
            if float(x).is_integer():
                forms.add(str(int(x)))
            forms.update(f"{x:.{d}f}" for d in range(5))
    forms.add("16")  # "16-bit": the name of the baseline's precision, not a measured figure
    return forms


def card_body(text: str) -> str:
    """The card without its YAML block, code snippets and citations (constants of the template)."""
    body = text.split("\n---\n", 1)[1]
    body = body.split("## Citation", 1)[0]
    return re.sub(r"```(?:python|bash)\n.*?```", "", body, flags=re.S)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    make_run(tmp_path / "run", variants=2)
    return tmp_path / "run"


def test_metadata_parses_with_huggingface_hub(run: Path):
    text = render_card(run, repo_id="acme/tiny-int4")
    card = ModelCard(text)
    data = card.data
    assert data.base_model == "acme/tiny-chat"
    assert data.to_dict()["base_model_relation"] == "quantized"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["acme/calib-set"]  # the builtin calibration set is no Hub dataset
    assert {"hubtool", "int4", "auto-round", "gptq"} <= set(data.tags)
    assert data.model_name == "tiny-int4"
    record = rec.load(run)
    default = record.variants[0].name
    expected = {(r.task, r.metric): r.value for r in record.evals if r.model == default}
    got = {(e.dataset_name, e.metric_type): e.metric_value for e in data.eval_results}
    assert got == expected


def test_every_figure_comes_from_the_record(run: Path):
    record = rec.load(run)
    text = render_card(run, repo_id="acme/tiny-int4")
    allowed = allowed_numbers(record)
    body = card_body(text)
    stray = [n for n in NUMBER.findall(body) if n not in allowed]
    assert not stray, f"figures not in the record: {stray}"
    # and the key figures are there, with the formatting the card promises
    assert "| 61.38 ± 2.13 | 59.31 ± 2.13 | 60.04 ± 2.13 |" in body  # accuracy in %, with stderr
    assert "| 17.42 | 18.09 | 17.89 |" in body  # perplexity as is
    assert "**61.38**" in body and "**59.31**" in body  # the average row
    assert "hubtool quantize acme/tiny-chat -o runs/x --recipe light" in text  # the command to reproduce
    assert "Test CPU" in body and "41.7" in body  # hardware and time
    recipe_lines = [ln for ln in body.splitlines() if ln.startswith("- Recipe:")]
    assert len(recipe_lines) == 2 and recipe_lines[0].endswith("seed 42, weight gradients in int8")
    assert recipe_lines[1].endswith("seed 42")  # a record without the field
    # the snippets' generation length is the record's
    assert f"max_new_tokens={record.comparisons[0].max_new_tokens}" in text


def test_card_changes_when_the_record_does(run: Path):
    record = rec.load(run)
    record.evals[0].value = 0.77731
    rec.save(record, run)
    assert "77.73" in render_card(run)


def test_sections_and_revision_table(run: Path):
    text = render_card(run, repo_id="acme/tiny-int4")
    for heading in (
        "## Model details",
        "## Revisions",
        "## Usage",
        "## INT4 vs BF16",
        "## Evaluation",
        "## Reproduce",
        "## Caveats",
        "## Citation",
    ):
        assert heading in text
    assert '| `revision="main"` |' in text and '`revision="auto_gptq"`' in text
    assert 'model_id = "acme/tiny-int4"' in text
    assert AUTOROUND_BIBTEX in text
    assert "builtin:pydoc_data.topics" in text and "acme/calib-set" in text  # calibration sets
    assert "(identical to BF16)" in text and "33.3% of tokens match BF16" in text


def test_write_card_records_hashes_and_draws_the_chart(run: Path):
    path = write_card(run, repo_id="acme/tiny-int4")
    record = rec.load(run)
    assert path == run / "card" / "README.md"
    assert record.card.path == "card/README.md"
    assert record.card.sha256 == rec.sha256_file(path)
    chart = run / "card" / CHART_NAME
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [a.path for a in record.card_assets] == [f"card/{CHART_NAME}"]
    assert f"]({CHART_NAME})" in path.read_text()
    # deterministic: re-rendering the same record gives the same bytes (so a re-upload commits nothing)
    before = (path.read_bytes(), chart.read_bytes())
    write_card(run, repo_id="acme/tiny-int4")
    assert (path.read_bytes(), chart.read_bytes()) == before
    assert record.extras["card"]["repo_id"] == "acme/tiny-int4"


def test_no_evals_no_chart_no_model_index(tmp_path: Path):
    make_run(tmp_path / "r", variants=1, evals=False)
    path = write_card(tmp_path / "r")
    text = path.read_text()
    assert "## Evaluation" not in text and not (tmp_path / "r" / "card" / CHART_NAME).exists()
    assert "model-index" not in text
    assert ModelCard(text).data.model_name


def test_vlm_card_has_an_image_snippet(tmp_path: Path):
    make_run(tmp_path / "r", variants=1, vlm=True)
    path = write_card(tmp_path / "r", repo_id="acme/vlm-int4")
    text = path.read_text()
    assert "AutoModelForImageTextToText" in text and "AutoProcessor" in text
    assert 'hf_hub_download(model_id, "images/prompt-2.png")' in text
    assert (path.parent / "images" / "prompt-2.png").is_file()
    assert ModelCard(text).data.pipeline_tag == "image-text-to-text"
    assert "vision tower" in text
    record = rec.load(tmp_path / "r")
    assert "card/images/prompt-2.png" in [a.path for a in record.card_assets]


def test_gguf_source_caveat_and_card_extras(tmp_path: Path):
    make_run(tmp_path / "r", variants=1, source_kind="gguf")
    extras = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "tags": ["smollm2"],
        "citation": "@misc{smollm2, title={SmolLM2}}",
        "caveats": ["Made for a demo."],
        "description": "A demo build.",
    }
    text = write_card(tmp_path / "r", extras=extras).read_text()
    data = ModelCard(text).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "smollm2" in data.tags
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and "dequantized" in text
    assert "@misc{smollm2, title={SmolLM2}}" in text and "Made for a demo." in text
    assert "A demo build." in text
    # the extras live in run.json, so `hubtool card` re-renders the same card without them being passed again
    assert render_card(tmp_path / "r") == text


def test_no_base_model_without_a_hub_source(tmp_path: Path):
    make_run(tmp_path / "r", variants=1, source_kind="gguf")
    meta = card_metadata(rec.load(tmp_path / "r")).to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["license"] == "apache-2.0"


def test_user_template_renders_with_our_partials(run: Path, tmp_path: Path):
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text(
        "---\n{{ card_data }}\n---\n# {{ model_name }} by ACME\n\n"
        "{% include 'partials/evals.md.j2' %}\nbits={{ spec.bits }}\n"
    )
    text = render_card(run, tpl, repo_id="acme/tiny-int4")
    assert text.startswith("---\n") and "# tiny-int4 by ACME" in text and "bits=4" in text
    assert "| arc_easy |" in text
    assert ModelCard(text).data.base_model == "acme/tiny-chat"


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ repo_id.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
        "{{ spec.__class__.__init__.__globals__ }}",
        "{% set x = record.__class__ %}{{ x.mro() }}",
        "{{ spec.update({'bits': 2}) }}",
        "{{ range(10**9) | list }}",
    ],
)
def test_sandbox_blocks_attribute_escapes(run: Path, tmp_path: Path, monkeypatch, payload: str):
    monkeypatch.chdir(tmp_path)
    tpl = tmp_path / "evil.md.j2"
    tpl.write_text(payload)
    with pytest.raises(HubtoolError) as info:
        render_card(run, tpl)
    assert "template" in info.value.message
    assert not (tmp_path / "PWNED").exists()


def test_template_errors_are_one_line(run: Path, tmp_path: Path):
    tpl = tmp_path / "bad.md.j2"
    tpl.write_text("line one\n{{ no_such_thing.x }}\n")
    with pytest.raises(HubtoolError) as info:
        render_card(run, tpl)
    assert "bad.md.j2" in info.value.message and "\n" not in info.value.line()
    with pytest.raises(HubtoolError, match="not found"):
        render_card(run, tmp_path / "missing.j2")


def test_card_without_a_record_is_a_clear_error(tmp_path: Path):
    with pytest.raises(HubtoolError, match="no finished run"):
        render_card(tmp_path)


def test_card_after_publish_shows_commits(run: Path):
    record = rec.load(run)
    record.publish = rec.PublishRecord(
        "acme/tiny-int4",
        "http://127.0.0.1:1",
        revisions=[
            rec.PublishedRevision("auto_round", "int4-caliba", "main", "v9"),
            rec.PublishedRevision("auto_gptq", "int4-caliba", "auto_gptq", "v9-auto_gptq", "f" * 40),
        ],
    )
    rec.save(record, run)
    text = render_card(run)
    assert f"| `{'f' * 40}` |" in text and "| `v9-auto_gptq` |" in text and "this revision" in text
    assert 'model_id = "acme/tiny-int4"' in text
    assert json.loads(json.dumps(ModelCard(text).data.to_dict()))  # plain, serializable metadata


def test_a_user_template_is_remembered(run: Path, tmp_path: Path):
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text("---\n{{ card_data }}\n---\n# Custom {{ model_name }}\n")
    first = write_card(run, tpl, repo_id="acme/x").read_text()
    assert "# Custom x" in first
    assert write_card(run).read_text() == first  # e.g. the re-render inside `hubtool upload`
