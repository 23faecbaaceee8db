"""hubtool eval: task specs and files (rejected before any model loads), the per-sample cache, the table,
and tiny end-to-end runs (a VLM on all three TSV layouts; a text model on perplexity and a local lm_eval task)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path

import pytest

from hubtool import record
from hubtool.errors import HubtoolError
from hubtool.stages import compare, evaltable, evaluate
from hubtool.stages.tasks import load_task, parse_spec, parse_specs

pytest_plugins = ["tests.test_compare"]  # the run-folder fixtures: base_runs, fresh_run, no_model_loads


# -- tiny task files in VLMEvalKit's layouts -------------------------------------------------------
def b64_image(color: tuple[int, int, int], size: int = 24) -> str:
    """A small solid PNG as base64, as VLMEvalKit TSVs hold images."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write a TSV the way pandas' to_csv(sep='\\t') does (minimal quoting)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def mcq_tsv(path: Path) -> Path:
    """MMBench / ScienceQA layout; row 3 reuses row 1's image by index, as MMBench does."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        [1, "What color is the image?", "", "red", "green", "blue", "black", "A", "color", b64_image(RED)],
        [
            2,
            "What color is the image?",
            "Look closely.",
            "red",
            "green",
            "blue",
            "",
            "B",
            "color",
            b64_image(GREEN),
        ],
        [3, "Which color fills the picture?", "", "blue", "red", "", "", "B", "color", "1"],
        [4, "What color is the image?", "", "red", "green", "blue", "black", "C", "color", b64_image(BLUE)],
    ]
    return write_tsv(path, header, rows)


def yesno_tsv(path: Path) -> Path:
    """POPE layout."""
    header = ["index", "question", "answer", "category", "image"]
    rows = [
        [1, "Is there a red square in the image?", "yes", "adversarial", b64_image(RED)],
        [2, "Is there a dog in the image?", "no", "adversarial", b64_image(RED)],
        [3, "Is the image green?", "yes", "popular", b64_image(GREEN)],
        [4, "Is the image blue?", "no", "random", b64_image(GREEN)],
        [5, "Is the image blue?", "yes", "random", b64_image(BLUE)],
    ]
    return write_tsv(path, header, rows)


def vqa_tsv(path: Path) -> Path:
    """TextVQA layout: answer is the list of human answers."""
    header = ["index", "question", "answer", "image"]
    rows = [
        [1, "What color is this?", str(["red"] * 7 + ["dark red"] * 3), b64_image(RED)],
        [2, "What color is this?", str(["green"] * 10), b64_image(GREEN)],
        [3, "What color is this?", "blue", b64_image(BLUE)],
    ]
    return write_tsv(path, header, rows)


# -- specs and malformed files (no model) ----------------------------------------------------------
def test_parse_specs():
    specs = parse_specs(
        ["ppl mcq:data/MMBench_DEV_EN_V11.tsv", "lm_eval:arc_easy,/x/my_task.yaml", "yesno:POPE.tsv"]
    )
    assert [(s.kind, s.name) for s in specs] == [
        ("perplexity", "ppl_heldout"),
        ("mcq", "MMBench_DEV_EN_V11"),
        ("lm_eval", "arc_easy,my_task"),
        ("yesno", "POPE"),
    ]
    assert parse_spec("ppl:wikitext:wikitext-2-raw-v1@test").name == "ppl_wikitext"
    assert [s.name for s in parse_specs("vqa:a/T.tsv vqa:b/T.tsv")] == ["T", "T_2"]
    with pytest.raises(HubtoolError, match="unknown task 'mmlu'"):
        parse_specs(["mmlu"])
    with pytest.raises(HubtoolError, match="needs a file"):
        parse_spec("mcq:")
    with pytest.raises(HubtoolError, match="no tasks"):
        parse_specs([])


def test_vlm_files_parse(tmp_path):
    mcq = load_task(parse_spec(f"mcq:{mcq_tsv(tmp_path / 'MMB.tsv')}"), is_vlm=True)
    assert [s.answer for s in mcq.samples] == ["A", "B", "B", "C"]
    assert list(mcq.samples[1].options) == ["A", "B", "C"] and mcq.samples[1].hint == "Look closely."
    assert mcq.samples[2].image == mcq.samples[0].image  # image given by index
    assert [s.line for s in mcq.samples] == [2, 3, 4, 5]
    yn = load_task(parse_spec(f"yesno:{yesno_tsv(tmp_path / 'POPE.tsv')}"), is_vlm=True, limit=2)
    assert [s.answer for s in yn.samples] == ["yes", "no"]
    vqa = load_task(parse_spec(f"vqa:{vqa_tsv(tmp_path / 'TextVQA.tsv')}"), is_vlm=True)
    assert len(vqa.samples[0].answer) == 10 and vqa.samples[2].answer == ["blue"]
    with pytest.raises(HubtoolError, match="needs images, but this run's model is text-only"):
        load_task(parse_spec(f"vqa:{tmp_path / 'TextVQA.tsv'}"), is_vlm=False)


def test_text_files_for_perplexity(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "first doc"}\n\n"a bare string"\n{"text": "third"}\n')
    d = load_task(parse_spec(f"ppl:{tmp_path / 'docs.jsonl'}"), is_vlm=False)
    assert d.text == "first doc\n\na bare string\n\nthird" and d.spec.name == "ppl_docs"
    (tmp_path / "t.txt").write_text("plain text")
    t = load_task(parse_spec(f"ppl:{tmp_path / 't.txt'}"), is_vlm=False)
    assert t.text == "plain text" and t.fingerprint != d.fingerprint
    held = load_task(parse_spec("ppl"), is_vlm=False)
    from hubtool.quant.calib import builtin_documents

    assert len(held.text) > 10_000
    assert not any(doc in held.text for doc in builtin_documents()[:50])  # held out from calibration


def _broken(tmp_path: Path, case: str) -> str:
    good = b64_image(RED)
    header = ["index", "question", "A", "B", "answer", "image"]
    rows = [[1, "q?", "x", "y", "A", good], [2, "q?", "x", "y", "B", good], [3, "q?", "x", "y", "A", good]]
    kind = "mcq"
    if case == "missing column":
        header = ["index", "question", "A", "B", "image"]
        rows = [r[:4] + r[5:] for r in rows]
    elif case == "empty value":
        rows[1][1] = ""
    elif case == "bad image":
        rows[2][5] = base64.b64encode(b"definitely not an image" * 4).decode()
    elif case == "bad answer":
        rows[1][4] = "E"
    elif case == "duplicate index":
        rows[2][0] = 1
    elif case == "yes/no answer":
        kind, header = "yesno", ["index", "question", "answer", "image"]
        rows = [[1, "q?", "yes", good], [2, "q?", "maybe", good]]
    elif case == "vqa list":
        kind, header = "vqa", ["index", "question", "answer", "image"]
        rows = [[1, "q?", "['a', 'b'", good]]
    path = write_tsv(tmp_path / f"{case.replace(' ', '_').replace('/', '')}.tsv", header, rows)
    return f"{kind}:{path}"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing column", "line 1, the header): missing column 'answer'"),
        ("empty value", "line 3: missing value in column 'question'"),
        ("bad image", "line 4: column 'image' is not a readable image"),
        ("bad answer", "line 3: answer 'E' is not one of the options A, B"),
        ("duplicate index", "line 4: duplicate index '1' (first on line 2)"),
        ("yes/no answer", "line 3: answer must be yes or no"),
        ("vqa list", "line 2: answer looks like a list but does not parse"),
    ],
)
def test_malformed_task_files_are_rejected_before_any_model_loads(
    fresh_run, tmp_path, no_model_loads, case, needle
):
    run = fresh_run("llava")
    with pytest.raises(HubtoolError) as exc:
        evaluate.run_eval(run, [_broken(tmp_path, case)])
    assert needle in exc.value.message, exc.value.message


def test_task_errors_without_model(fresh_run, tmp_path, no_model_loads):
    run = fresh_run("llama")
    with pytest.raises(HubtoolError, match="unknown task 'bleu'"):
        evaluate.run_eval(run, ["ppl", "bleu"])
    with pytest.raises(HubtoolError, match="needs images"):
        evaluate.run_eval(run, [f"mcq:{mcq_tsv(tmp_path / 'm.tsv')}"])
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(HubtoolError, match="line 2 has no string `text` field"):
        evaluate.run_eval(run, [f"ppl:{tmp_path / 'docs.jsonl'}"])
    with pytest.raises(HubtoolError, match="not found"):
        evaluate.run_eval(run, [f"ppl:{tmp_path / 'nothing.txt'}"])
    with pytest.raises(HubtoolError, match="cannot load dataset 'someorg/somedata'"):
        evaluate.run_eval(run, ["ppl:someorg/somedata:cfg@validation"])  # offline: a clear error
    (tmp_path / "t.yaml").write_text("dataset_path: json\n")
    with pytest.raises(HubtoolError, match="has no `task:`"):
        evaluate.run_eval(run, [f"lm_eval:{tmp_path / 't.yaml'}"])
    with pytest.raises(HubtoolError, match="--limit must be at least 1"):
        evaluate.run_eval(run, ["ppl"], limit=0)


# -- the table and lm_eval's output (no model) -----------------------------------------------------
def _tr(task, metric, model, value, kind="mcq", hib=True, primary=True, stderr=0.01, n=10):
    return record.TaskResult(task, kind, metric, model, value, stderr, n, hib, {"primary": primary})


def test_eval_table_columns_rows_and_average():
    rec = record.RunRecord(
        source=record.SourceInfo(kind="dir", name="x", dtype="bfloat16"),
        spec={},
        variants=[record.VariantRecord("int4-a", "signround"), record.VariantRecord("int4-b", "signround")],
        evals=[
            _tr("MMBench", "accuracy", "bf16", 0.80),
            _tr("MMBench", "accuracy", "int4-a", 0.78),
            _tr("MMBench", "accuracy", "int4-b", 0.76),
            _tr("POPE", "accuracy", "bf16", 0.90, "yesno", primary=False),
            _tr("POPE", "f1", "bf16", 0.88, "yesno"),
            _tr("POPE", "f1", "int4-a", 0.86, "yesno"),
            _tr("POPE", "f1", "int4-b", 0.84, "yesno"),
            _tr("ppl_heldout", "perplexity", "bf16", 12.5, "perplexity", hib=False),
            _tr("ppl_heldout", "perplexity", "int4-a", 13.1, "perplexity", hib=False),
        ],
    )
    t = evaltable.eval_table(rec)
    assert t.columns == ["bf16", "int4-a", "int4-b"]
    assert [(r.task, r.metric) for r in t.rows] == [
        ("MMBench", "accuracy"),
        ("POPE", "accuracy"),
        ("POPE", "f1"),
        ("ppl_heldout", "perplexity"),
    ]
    assert t.average_of == ["MMBench/accuracy", "POPE/f1"]  # primary fractions only; perplexity left out
    assert t.average["bf16"] == pytest.approx(0.84)
    assert t.average["int4-a"] == pytest.approx(0.82)
    assert t.average["int4-b"] == pytest.approx(0.80)
    ppl = t.rows[3]
    assert not ppl.percent and ppl.values["int4-b"] is None
    assert t.format(ppl, "int4-a") == "13.10" and t.format(ppl, "int4-b") == "–"
    assert t.format(t.rows[0], "bf16") == "80.00" and t.format(None, "int4-b") == "80.00"
    only = evaltable.eval_table(rec, primary_only=True)
    assert ("POPE", "accuracy") not in [(r.task, r.metric) for r in only.rows]
    rec.evals.pop(2)  # int4-b lacks MMBench now: no average for it
    assert evaltable.eval_table(rec).average["int4-b"] is None


def test_lm_eval_results_are_mapped():
    out = {
        "results": {
            "tiny_mc": {
                "alias": "tiny_mc",
                "acc,none": 0.5,
                "acc_stderr,none": 0.25,
                "acc_norm,none": 0.75,
                "acc_norm_stderr,none": "N/A",
            },
            "wikitext": {"word_perplexity,none": 30.5, "word_perplexity_stderr,none": "N/A"},
        },
        "higher_is_better": {
            "tiny_mc": {"acc": True, "acc_norm": True},
            "wikitext": {"word_perplexity": False},
        },
        "n-samples": {
            "tiny_mc": {"original": 10, "effective": 4},
            "wikitext": {"original": 62, "effective": 62},
        },
    }
    rs = evaluate.lm_eval_results(out, "int4")
    by = {(r.task, r.metric): r for r in rs}
    assert set(by) == {("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("wikitext", "word_perplexity")}
    acc = by[("tiny_mc", "acc")]
    assert (acc.value, acc.stderr, acc.n, acc.extra["primary"]) == (0.5, 0.25, 4, True)
    assert by[("tiny_mc", "acc_norm")].stderr is None and not by[("tiny_mc", "acc_norm")].extra.get("primary")
    wp = by[("wikitext", "word_perplexity")]
    assert wp.higher_is_better is False and wp.extra["primary"] and wp.n == 62


def test_chunking_for_perplexity():
    assert evaluate.chunk_tokens(list(range(10)), 4, bos=99) == [
        [99, 0, 1, 2],
        [99, 3, 4, 5],
        [99, 6, 7, 8],
        [99, 9],
    ]
    assert evaluate.chunk_tokens(list(range(9)), 4, bos=None) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]  # a lone token scores nothing


# -- end to end ------------------------------------------------------------------------------------
def _by(results, model, task, metric):
    (r,) = [x for x in results if (x.model, x.task, x.metric) == (model, task, metric)]
    return r


@pytest.mark.slow
def test_vlm_eval_end_to_end_with_cache_and_resume(fresh_run, tmp_path, monkeypatch):
    run = fresh_run("llava")
    tasks = [
        f"mcq:{mcq_tsv(tmp_path / 'MMBench_DEV_EN_V11.tsv')}",
        f"yesno:{yesno_tsv(tmp_path / 'POPE.tsv')}",
        f"vqa:{vqa_tsv(tmp_path / 'TextVQA_VAL.tsv')}",
    ]
    events = []
    res = evaluate.run_eval(run, tasks, batch_size=3, progress=events.append)
    rec = record.load(run)
    assert {(r.task, r.metric, r.model) for r in rec.evals} == {(r.task, r.metric, r.model) for r in res}
    for model in ("bf16", "int4"):
        mcq = _by(res, model, "MMBench_DEV_EN_V11", "accuracy")
        assert mcq.n == 4 and 0 <= mcq.value <= 1 and mcq.stderr is not None and mcq.extra["primary"]
        for metric in ("accuracy", "precision", "recall", "f1"):
            r = _by(res, model, "POPE", metric)
            assert r.n == 5 and 0 <= r.value <= 1 and r.kind == "yesno"
        f1 = _by(res, model, "POPE", "f1")
        assert f1.extra["tp"] + f1.extra["fp"] + f1.extra["tn"] + f1.extra["fn"] == 5
        vqa = _by(res, model, "TextVQA_VAL", "accuracy")
        assert vqa.n == 3 and 0 <= vqa.value <= 1
        samples = run / mcq.extra["samples"]
        lines = [json.loads(x) for x in samples.read_text().splitlines()]
        assert "header" in lines[0] and {x["id"] for x in lines[1:]} == {"1", "2", "3", "4"}
        assert all("prediction" in x and "score" in x for x in lines[1:])
    assert rec.extras["eval"]["loaded_from"] == {"int4": "hubtool"}
    assert any(e.stage == "eval" and e.status == "done" for e in events)
    t = evaltable.eval_table(rec)
    assert t.columns == ["bf16", "int4"]
    assert t.average_of == ["MMBench_DEV_EN_V11/accuracy", "POPE/f1", "TextVQA_VAL/accuracy"]

    # a re-run on the finished run loads no model and gives the same figures
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    again = evaluate.run_eval(run, tasks, batch_size=3)
    assert [record.to_dict(r) for r in again] == [record.to_dict(r) for r in res]
    monkeypatch.undo()

    # a killed eval resumes: keep 1 of 4 int4 mcq samples plus a half-written line
    path = run / "eval_cache" / "int4" / "MMBench_DEV_EN_V11.jsonl"
    head, first = path.read_text().splitlines()[:2]
    path.write_text(head + "\n" + first + "\n" + '{"id": "2", "predic')
    asked = []
    real = compare.generate_batched

    def spy(lm, texts, *a, **k):
        asked.extend(texts)
        return real(lm, texts, *a, **k)

    monkeypatch.setattr(compare, "generate_batched", spy)
    resumed = evaluate.run_eval(run, tasks[:1], batch_size=3)
    assert len(asked) == 3  # only the 3 missing int4 samples were generated; bf16 came from its cache
    assert _by(resumed, "int4", "MMBench_DEV_EN_V11", "accuracy").value == pytest.approx(
        _by(res, "int4", "MMBench_DEV_EN_V11", "accuracy").value
    )  # greedy: same answers, same score


LM_EVAL_DATA = [
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
    {"question": "Ice is", "choices": ["cold", "hot"], "label": 0},
    {"question": "Snow is", "choices": ["white", "black"], "label": 0},
]


def lm_eval_task(folder: Path) -> Path:
    """A local lm-evaluation-harness multiple-choice task (YAML + jsonl), runnable offline."""
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in LM_EVAL_DATA))
    yaml = folder / "tiny_mc.yaml"
    yaml.write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return yaml


@pytest.mark.slow
def test_text_model_perplexity_and_local_lm_eval_task(fresh_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    run = fresh_run("llama")
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    tasks = ["ppl", f"ppl:{tmp_path / 'doc.txt'}", f"lm_eval:{lm_eval_task(tmp_path)}"]
    res = evaluate.run_eval(run, tasks, limit=3, seqlen=64, batch_size=2)
    for model in ("bf16", "int4"):
        ppl = _by(res, model, "ppl_heldout", "perplexity")
        assert ppl.n == 3 and ppl.extra["tokens"] > 100 and ppl.higher_is_better is False
        assert math.isfinite(ppl.value) and ppl.value > 1 and ppl.stderr > 0
        assert ppl.value == pytest.approx(math.exp(ppl.extra["nll"]))
        assert ppl.extra["source"].startswith("builtin:pydoc_data.topics")
        doc = _by(res, model, "ppl_doc", "perplexity")
        assert doc.n == 3 and doc.extra["seqlen"] == 64
        acc = _by(res, model, "tiny_mc", "acc")
        assert acc.kind == "lm_eval" and acc.n == 3 and 0 <= acc.value <= 1 and acc.extra["primary"]
    assert (
        _by(res, "bf16", "ppl_heldout", "perplexity").value
        != _by(res, "int4", "ppl_heldout", "perplexity").value
    )
    rec = record.load(run)
    assert len(rec.evals) == len(res) == 6
    t = evaltable.eval_table(rec)
    assert t.average_of == ["tiny_mc/acc"]

    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    again = evaluate.run_eval(run, tasks, limit=3, seqlen=64, batch_size=2)
    assert [record.to_dict(r) for r in again] == [record.to_dict(r) for r in res]


@pytest.mark.slow
def test_cli_eval_prints_the_table_from_the_cache(fresh_run, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from hubtool.cli.evaluate import register

    run = fresh_run("llama")
    app = typer.Typer()
    register(app)
    app.callback()(lambda: None)  # keep sub-command names with a single-group app
    r = CliRunner().invoke(app, ["eval", str(run), "--tasks", "ppl", "--limit", "2", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    assert "ppl_heldout" in r.output and "bf16" in r.output and "int4" in r.output
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    r2 = CliRunner().invoke(app, ["eval", str(run), "--tasks", "ppl", "--limit", "2", "--seqlen", "32"])
    assert r2.exit_code == 0 and "ppl_heldout" in r2.output
