"""Calibration sets: sources, tokenization, the held-out split and the errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from hubtool.errors import HubtoolError
from hubtool.quant import calib as C
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run on one thread


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module")
def llava_processor(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_models("llava"))


def _images(folder, n=3, broken=False):
    from PIL import Image

    names = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (40 + i, 36), (30 * i, 90, 200 - 20 * i)).save(p)
        names.append(p.name)
    if broken:
        (folder / "broken.png").write_bytes(b"not a png at all")
        names.append("broken.png")
    return names


def test_builtin_default_offline(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cs = C.load_calibration(None, tok, nsamples=4, seqlen=32, seed=1, is_vlm=False, batch_size=2)
    assert cs.info.builtin and cs.info.source == C.BUILTIN_SOURCE and cs.info.name == "pydoc-topics"
    assert (cs.info.kind, cs.info.nsamples, cs.info.seqlen, cs.info.batch_size) == ("text", 4, 32, 2)
    assert len(cs.info.sha256) == 64
    for s in cs.samples:
        assert s["input_ids"].shape == (1, 32) and s["attention_mask"].all()
        assert s["input_ids"][0, 0] == tok.bos_token_id
    idx, batch = next(cs.batches())
    assert idx == [0, 1] and batch["input_ids"].shape == (2, 32)


def test_seed_decides_the_samples(tok):
    a = C.load_calibration("builtin", tok, nsamples=3, seqlen=24, seed=5, is_vlm=False)
    b = C.load_calibration("builtin", tok, nsamples=3, seqlen=24, seed=5, is_vlm=False)
    c = C.load_calibration("builtin", tok, nsamples=3, seqlen=24, seed=6, is_vlm=False)
    ids = lambda cs: torch.cat([s["input_ids"] for s in cs.samples])  # noqa: E731
    assert torch.equal(ids(a), ids(b)) and not torch.equal(ids(a), ids(c))
    assert a.info.sha256 == c.info.sha256  # the hash is of the source data, not of the draw


def test_heldout_text_is_never_calibration():
    held = C.heldout_text()
    docs = C.builtin_documents()
    assert len(held) > 20_000
    from pydoc_data.topics import topics

    for key in C.HELDOUT_TOPICS:
        assert topics[key] in held
        assert all(topics[key] != d for d in docs)
    assert len(docs) == len(topics) - len(C.HELDOUT_TOPICS)


def test_local_text_sources(tok, tmp_path):
    words = " ".join(f"word{i} and some prose about calibration" for i in range(300))
    (tmp_path / "a.txt").write_text(words)
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": words[i * 90 :]}) for i in range(5)) + "\n"
    )
    conv = [{"conversations": [{"from": "human", "value": "hi " + words}, {"from": "gpt", "value": "ok"}]}]
    (tmp_path / "c.json").write_text(json.dumps(conv))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [words, words[::-1]]}), tmp_path / "d.parquet")
    for name in ("a.txt", "b.jsonl", "c.json", "d.parquet"):
        cs = C.load_calibration(str(tmp_path / name), tok, nsamples=2, seqlen=16, seed=0, is_vlm=False)
        assert cs.info.name == name.split(".")[0] and cs.info.kind == "text" and not cs.info.builtin
        assert len(cs) == 2 and cs.seq_len == 16
    folder = C.load_calibration(str(tmp_path), tok, nsamples=2, seqlen=16, seed=0, is_vlm=False)
    assert folder.info.name == tmp_path.name and folder.info.source == str(tmp_path.resolve())


def test_short_corpus_overlaps_and_too_short_fails(tok, tmp_path):
    (tmp_path / "s.txt").write_text("a short text " * 20)
    cs = C.load_calibration(str(tmp_path / "s.txt"), tok, nsamples=6, seqlen=16, seed=0, is_vlm=False)
    assert len(cs) == 6
    with pytest.raises(HubtoolError, match="fewer than one sample"):
        C.load_calibration(str(tmp_path / "s.txt"), tok, nsamples=2, seqlen=4096, seed=0, is_vlm=False)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"txt": "no text column"}\n', "no text column"),
        ("{not json\n", "not valid JSON"),
        ('["a list"]\n', "not an object"),
        ('{"text": 3}\n', "unreadable text field"),
    ],
)
def test_bad_jsonl(tok, tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(HubtoolError, match=match):
        C.load_calibration(str(tmp_path / "bad.jsonl"), tok, nsamples=1, seqlen=8, seed=0, is_vlm=False)


def test_bad_sources(tok, tmp_path, monkeypatch):
    kw = dict(nsamples=1, seqlen=8, seed=0, is_vlm=False)
    with pytest.raises(HubtoolError, match="not found"):
        C.load_calibration(str(tmp_path / "missing.jsonl"), tok, **kw)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(HubtoolError, match="unsupported type"):
        C.load_calibration(str(tmp_path / "x.csv"), tok, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubtoolError, match="holds no"):
        C.load_calibration(str(tmp_path / "empty"), tok, **kw)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(HubtoolError, match="no text column"):
        C.load_calibration(str(tmp_path / "p.parquet"), tok, **kw)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubtoolError, match="HF_HUB_OFFLINE"):
        C.load_calibration("someorg/some-dataset", tok, **kw)
    with pytest.raises(HubtoolError, match="seqlen"):
        C.load_calibration("builtin", tok, nsamples=0, seqlen=8, seed=0, is_vlm=False)


def test_image_text_jsonl(llava_processor, tmp_path):
    names = _images(tmp_path)
    recs = [
        {"image": names[0], "text": "A blue square on a plain background."},
        {"image": names[1], "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A small colored picture with a longer answer than the others here."},
        ]},
        {"image": names[2], "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Red."}]},
        {"text": "a record without image is skipped"},
    ]  # fmt: skip
    (tmp_path / "vl.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    cs = C.load_calibration(
        str(tmp_path / "vl.jsonl"),
        llava_processor,
        nsamples=8,
        seqlen=256,
        seed=0,
        is_vlm=True,
        image_text=True,
    )
    assert cs.info.kind == "image-text" and len(cs) == 3
    image_id = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    lengths = set()
    for s in cs.samples:
        assert s["pixel_values"].shape[0] == 1 and (s["input_ids"] == image_id).sum() > 0
        lengths.add(int(s["attention_mask"].sum()))
        assert s["input_ids"].shape[-1] == cs.seq_len
    assert len(lengths) > 1  # padded to one length, padding masked
    _, batch = next(cs.batches(3))
    assert batch["pixel_values"].shape[0] == 3


def test_image_text_errors(llava_processor, tok, tmp_path):
    names = _images(tmp_path, n=1, broken=True)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"image": names[0], "text": "a picture"}) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps({"image": "broken.png", "text": "x"}) + "\n")
    (tmp_path / "missing.jsonl").write_text(json.dumps({"image": "nope.png", "text": "x"}) + "\n")
    kw = dict(nsamples=1, seqlen=64, seed=0)
    with pytest.raises(HubtoolError, match="unreadable"):
        C.load_calibration(str(tmp_path / "broken.jsonl"), llava_processor, is_vlm=True, **kw)
    with pytest.raises(HubtoolError, match="not found"):
        C.load_calibration(str(tmp_path / "missing.jsonl"), llava_processor, is_vlm=True, **kw)
    with pytest.raises(HubtoolError, match="text-only"):
        C.load_calibration(str(tmp_path / "ok.jsonl"), tok, is_vlm=False, **kw)
    with pytest.raises(HubtoolError, match="--quantize-vision needs image-text"):
        C.load_calibration("builtin", llava_processor, is_vlm=True, image_text=True, **kw)
