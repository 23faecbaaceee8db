"""hubtool.core.shards: the streamed writer matches save_file byte for byte; ShardReader reads it back."""

from __future__ import annotations

import json
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from hubtool.core.shards import ShardReader, tensor_nbytes, write_safetensors_streamed
from hubtool.errors import HubtoolError


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Tensors of every common dtype, names out of order, 0-dim and empty shapes among them."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    def ints(dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return torch.randint(-100, 100, shape, generator=g).to(dtype)

    return {
        "zeta.weight": rand(3, 4),
        "alpha.idx": ints(torch.int32, 5),
        "mid.scale": rand().to(torch.bfloat16),
        "b.empty": rand(0, 3).half(),
        "u8": torch.randint(0, 256, (7,), generator=g).to(torch.uint8),
        "i8": ints(torch.int8, 2, 2),
        "big": ints(torch.int64, 3),
        "flags": rand(4) > 0,
        "h.half": rand(2, 3).half(),
        "bf.w": rand(3, 2).to(torch.bfloat16),
        "a.empty.i32": ints(torch.int32, 0),
        "c.empty.i32": ints(torch.int32, 2, 0),
        "emb.ü": rand(1),
        "zero.dim.i64": torch.tensor(7, dtype=torch.int64),
        "f32.scalar": torch.tensor(1.5),
    }


def meta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same names, shapes and dtypes on the meta device."""
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_streamed_file_is_save_file_bytes(tmp_path: Path, metadata: dict[str, str] | None):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    write_safetensors_streamed(
        meta(tensors), lambda k: tensors[k].clone(), tmp_path / "out.safetensors", metadata
    )
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_streamed_file_is_one_of_save_files_outputs_with_several_metadata_keys(tmp_path: Path):
    # safetensors keeps metadata in a hash map: save_file's key order varies from call to call
    tensors = mixed_tensors()
    metadata = {"format": "pt", "ändern": 'a "quoted"\nline/ü'}
    out = tmp_path / "out.safetensors"
    write_safetensors_streamed(meta(tensors), lambda k: tensors[k], out, metadata)
    ours = out.read_bytes()
    for md in [dict(reversed(metadata.items())), metadata] * 4:  # ours is deterministic
        write_safetensors_streamed(meta(tensors), lambda k: tensors[k], out, md)
        assert out.read_bytes() == ours
    ref = tmp_path / "ref.safetensors"
    for _ in range(100):  # each try matches with probability 1/2
        save_file(tensors, ref, metadata=metadata)
        if ref.read_bytes() == ours:
            break
    else:
        pytest.fail("no save_file output matched the streamed file")


def test_streamed_empty_dict(tmp_path: Path):
    save_file({}, tmp_path / "ref.safetensors")
    write_safetensors_streamed({}, lambda k: pytest.fail("nothing to produce"), tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_produce_called_once_each_and_one_tensor_alive_at_a_time(tmp_path: Path):
    tensors = mixed_tensors()
    calls: Counter[str] = Counter()
    refs: list[weakref.ref] = []
    max_live = 0

    def produce(name: str) -> torch.Tensor:
        nonlocal max_live
        calls[name] += 1
        live = sum(r() is not None for r in refs)
        max_live = max(max_live, live + 1)
        t = tensors[name]
        if t.numel() == 0:
            out = torch.empty(t.shape, dtype=t.dtype)
            refs.append(weakref.ref(out))
            return out
        # the numpy array owns the memory: it lives exactly as long as any tensor sharing it
        owner = t.reshape(-1).view(torch.uint8).numpy().copy()
        out = torch.from_numpy(owner).view(t.dtype).reshape(t.shape)
        refs.extend([weakref.ref(owner), weakref.ref(out)])
        return out

    write_safetensors_streamed(meta(tensors), produce, tmp_path / "out.safetensors")
    assert calls == Counter(dict.fromkeys(tensors, 1))
    assert max_live == 1
    assert all(r() is None for r in refs)
    with ShardReader(tmp_path / "out.safetensors") as reader:
        assert all(torch.equal(reader.get(k), t) for k, t in tensors.items())


@pytest.mark.parametrize(
    "bad",
    [lambda t: t.reshape(-1), lambda t: t.to(torch.float64), lambda t: t.numpy()],
    ids=["shape", "dtype", "type"],
)
def test_mismatch_raises_and_leaves_no_file(tmp_path: Path, bad):
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, 2), "c": torch.ones(1, 5)}
    path = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="'b'"):
        write_safetensors_streamed(meta(tensors), lambda k: bad(tensors[k]) if k == "b" else tensors[k], path)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")  # an existing file stays as it was
    with pytest.raises(ValueError, match="'b'"):
        write_safetensors_streamed(meta(tensors), lambda k: bad(tensors[k]) if k == "b" else tensors[k], path)
    assert list(tmp_path.iterdir()) == [path]
    assert path.read_bytes() == b"old"


def check_reader(reader: ShardReader, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor reads back equal, with its shape and dtype from the header."""
    assert sorted(reader.keys()) == sorted(tensors)
    assert len(reader) == len(tensors)
    assert "nope" not in reader
    for k, t in tensors.items():
        assert k in reader
        assert reader.shape(k) == tuple(t.shape)
        assert reader.dtype(k) == t.dtype
        got = reader.get(k)
        assert got.device.type == "cpu" and got.dtype == t.dtype and torch.equal(got, t)
        assert got.untyped_storage().nbytes() == tensor_nbytes(t)  # owns just its own memory


def test_reader_single_file(tmp_path: Path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with ShardReader(tmp_path) as reader:
        check_reader(reader, tensors)
    with pytest.raises(KeyError, match="nope"):
        ShardReader(tmp_path).get("nope")


def test_reader_any_single_safetensors_file(tmp_path: Path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "weights.safetensors")
    with ShardReader(tmp_path) as reader:
        check_reader(reader, tensors)
    save_file(tensors, tmp_path / "other.safetensors")
    with pytest.raises(HubtoolError, match="2 \\*.safetensors files"):
        ShardReader(tmp_path)


def write_sharded(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, list[str]]:
    """Save ``tensors`` in 3 shards with an index, as huggingface_hub splits them."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=200)
    assert split.is_sharded and len(split.filename_to_tensors) == 3
    for filename, names in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in names}, folder / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return split.filename_to_tensors


def sharded_tensors() -> dict[str, torch.Tensor]:
    """Tensors that huggingface_hub puts in 3 shards of at most 200 bytes."""
    tensors = mixed_tensors()
    tensors.update({f"layer.{i}.w": torch.full((40,), float(i)) for i in range(2)})  # 160 bytes each
    return tensors


def test_reader_three_shards(tmp_path: Path):
    tensors = sharded_tensors()
    write_sharded(tensors, tmp_path)
    with ShardReader(tmp_path) as reader:
        check_reader(reader, tensors)


def test_reader_missing_shard(tmp_path: Path):
    tensors = sharded_tensors()
    shards = write_sharded(tensors, tmp_path)
    gone, *kept = sorted(shards)
    (tmp_path / gone).unlink()
    with ShardReader(tmp_path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for name in shards[gone]:
            for read in (reader.get, reader.shape, reader.dtype):
                with pytest.raises(HubtoolError, match="missing shard"):
                    read(name)
        for name in (k for f in kept for k in shards[f]):
            assert torch.equal(reader.get(name), tensors[name])


def test_reader_missing_folder_and_empty_folder(tmp_path: Path):
    with pytest.raises(HubtoolError, match="no checkpoint folder"):
        ShardReader(tmp_path / "absent")
    with pytest.raises(HubtoolError, match="no \\*.safetensors file"):
        ShardReader(tmp_path)


def test_reader_rejects_shard_outside_folder(tmp_path: Path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../x.safetensors"}})
    )
    with pytest.raises(HubtoolError, match="outside"):
        ShardReader(tmp_path)


def test_streamed_round_trip_bf16_on_meta_context(tmp_path: Path):
    tensors = {"w": torch.randn(5, 3).to(torch.bfloat16), "s": torch.tensor(2.0, dtype=torch.bfloat16)}
    with torch.device("meta"):  # the writer makes its stand-ins on the CPU explicitly
        write_safetensors_streamed(
            meta(tensors), lambda k: tensors[k], tmp_path / "x.safetensors", {"k": "v"}
        )
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reader_rows_are_the_tensors_rows(tmp_path: Path, dtype):
    table = torch.randn(300, 7, 5).to(dtype)
    save_file({"emb": table, "other": torch.ones(3)}, tmp_path / "model.safetensors")
    rows = torch.tensor([0, 1, 2, 9, 10, 57, 200, 298, 299])  # runs, gaps and both ends
    with ShardReader(tmp_path) as reader:
        assert torch.equal(reader.get_rows("emb", rows), table[rows])
        assert reader.get_rows("emb", torch.tensor([], dtype=torch.long)).shape == (0, 7, 5)
        with pytest.raises(IndexError):
            reader.get_rows("emb", torch.tensor([5, 300]))


def test_produce_may_give_blocks_of_rows(tmp_path: Path):
    tensors = {"a": torch.randn(10, 3).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32)}
    want = tmp_path / "want.safetensors"
    save_file(tensors, want)

    def produce(name):
        return iter(tensors["a"].split(4)) if name == "a" else tensors[name]

    write_safetensors_streamed(
        {k: v.to("meta") for k, v in tensors.items()}, produce, tmp_path / "got.safetensors"
    )
    assert (tmp_path / "got.safetensors").read_bytes() == want.read_bytes()
    with pytest.raises(ValueError, match="rows"):  # blocks that do not add up to the tensor
        write_safetensors_streamed(
            {"a": tensors["a"].to("meta")},
            lambda n: iter(tensors["a"][:8].split(4)),
            tmp_path / "bad.safetensors",
        )
    assert not (tmp_path / "bad.safetensors").exists()
