"""Safetensors checkpoints one tensor at a time: read a (sharded) folder, write a file streamed.

``ShardReader`` opens ``model.safetensors`` or ``model.safetensors.index.json`` and its shards and hands
out one tensor at a time. ``write_safetensors_streamed`` writes a file byte-identical to
``safetensors.torch.save_file`` while holding only one tensor's data at a time; the tensor order and the
header's layout are learned from the installed safetensors (a save of one-element stand-ins), not assumed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save

from hubtool.core.fsio import atomic_write
from hubtool.errors import HubtoolError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_METADATA = "__metadata__"
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


def tensor_nbytes(t: torch.Tensor) -> int:
    """The bytes of a tensor's data (numel * element size); works on meta tensors too."""
    return t.numel() * t.element_size()


@functools.lru_cache(maxsize=1)
def _torch_dtypes() -> dict[str, torch.dtype]:
    """Safetensors' dtype names -> torch dtypes, learned by saving a one-element tensor of each."""
    table: dict[str, torch.dtype] = {}
    for dtype in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str):
        try:
            with warnings.catch_warnings():  # torch warns about its experimental and deprecated dtypes
                warnings.simplefilter("ignore")
                header = _read_header(save({"x": torch.zeros(1, dtype=dtype, device="cpu")}))
        except Exception:  # a dtype torch cannot make or safetensors cannot store
            continue
        table.setdefault(header["x"]["dtype"], dtype)
    return table


def _read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of serialized safetensors bytes (key order kept)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n].decode("utf-8"))


def _dump_header(header: dict[str, Any]) -> bytes:
    """Header JSON as safetensors writes it: compact, UTF-8, padded with spaces to a multiple of 8."""
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


class ShardReader:
    """The tensors of a safetensors checkpoint folder (single file or index + shards), read one at a time."""

    def __init__(self, folder: str | os.PathLike[str]):
        """Open ``folder`` (or a single ``.safetensors`` file); shards are opened when first needed."""
        self.folder = Path(folder)
        self._handles: dict[Path, Any] = {}
        self._files: dict[str, Path] = self._map_keys()

    def _map_keys(self) -> dict[str, Path]:
        """Tensor name -> the file holding it, from the index or the one file's header."""
        path = self.folder
        if path.is_file() and path.name.endswith(".safetensors"):
            self.folder = path.parent
            return self._file_keys(path)
        if not path.is_dir():
            raise HubtoolError(f"no checkpoint folder at {path}", "give the folder holding *.safetensors")
        index = path / INDEX_FILE
        if index.is_file():
            return self._index_keys(index)
        single = path / SINGLE_FILE
        if single.is_file():
            return self._file_keys(single)
        found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(found) == 1:
            return self._file_keys(found[0])
        what = (
            "no *.safetensors file" if not found else f"{len(found)} *.safetensors files and no {INDEX_FILE}"
        )
        raise HubtoolError(
            f"{path} has {what}", f"a checkpoint is {SINGLE_FILE} or {INDEX_FILE} with its shards"
        )

    def _file_keys(self, file: Path) -> dict[str, Path]:
        """Every tensor of one file."""
        return dict.fromkeys(self._handle(file).header, file)

    def _index_keys(self, index: Path) -> dict[str, Path]:
        """Every tensor the index names, with its shard (checked to lie inside the folder)."""
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HubtoolError(f"cannot read {index}: {exc}", "the index needs a weight_map") from exc
        root = self.folder.resolve()
        out = {}
        for key, name in weight_map.items():
            file = self.folder / name
            if root not in file.resolve().parents:
                raise HubtoolError(f"{index} names a shard outside its folder: {name!r}")
            out[key] = file
        return out

    def _handle(self, file: Path) -> Any:
        """The open file and parsed header of ``file`` (read once, kept until close)."""
        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():
                raise HubtoolError(f"missing shard {file}", "download the checkpoint again")
            log.debug("opening %s", file)
            f = open(file, "rb")  # noqa: SIM115  # kept open until close()
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n).decode("utf-8"))
            except (OSError, ValueError, struct.error) as exc:
                f.close()
                raise HubtoolError(f"{file} is not a safetensors file ({exc})", "download it again") from None
            header.pop(_METADATA, None)
            handle = _Shard(f, 8 + n, header)
            self._handles[file] = handle
        return handle

    def _file_of(self, key: str) -> Path:
        """The file holding ``key`` (KeyError naming the key when it has none)."""
        try:
            return self._files[key]
        except KeyError:
            raise KeyError(f"no tensor {key!r} in {self.folder}") from None

    def keys(self) -> list[str]:
        """Every tensor name, in the index's (or the file's) order."""
        return list(self._files)

    def __contains__(self, key: object) -> bool:
        """Whether the checkpoint has a tensor of that name."""
        return key in self._files

    def __len__(self) -> int:
        """The number of tensors."""
        return len(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (no data read)."""
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """A tensor's dtype, from the header (no data read)."""
        name = self._entry(key)["dtype"]
        try:
            return _torch_dtypes()[name]
        except KeyError:
            raise HubtoolError(f"{key!r} has dtype {name}, which torch cannot hold") from None

    def _entry(self, key: str) -> dict[str, Any]:
        file = self._file_of(key)
        try:
            return self._handle(file).header[key]
        except KeyError:
            raise HubtoolError(f"{file} lacks {key!r}, which its index names", "download it again") from None

    def get(self, key: str) -> torch.Tensor:
        """A tensor's data as a CPU tensor owning its memory, read with plain file reads (no mapping: the
        process holds this tensor's bytes and nothing else of the file)."""
        shard = self._handle(self._file_of(key))
        entry, dtype = self._entry(key), self.dtype(key)
        start, end = entry["data_offsets"]
        out = torch.empty(tuple(entry["shape"]), dtype=dtype)
        if end - start != tensor_nbytes(out):
            raise HubtoolError(
                f"{key!r} in {shard.file.name} has {end - start} bytes for its shape", "download it again"
            )
        if end > start:
            view = (
                memoryview(out.view(-1).view(torch.uint8).numpy())
                if out.dim()
                else memoryview(out.reshape(1).view(torch.uint8).numpy())
            )
            got = os.preadv(shard.file.fileno(), [view], shard.data_start + start)
            if got != end - start:
                raise HubtoolError(f"{shard.file.name} ends inside {key!r}", "download it again")
        return out

    def get_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique, int64) of a tensor's first dimension, reading only those rows' bytes."""
        shard = self._handle(self._file_of(key))
        entry, dtype = self._entry(key), self.dtype(key)
        shape = tuple(entry["shape"])
        out = torch.empty((len(rows), *shape[1:]), dtype=dtype)
        row_bytes = tensor_nbytes(out[:1]) if len(rows) else 0
        if not len(rows) or not row_bytes:
            return out
        if int(rows[0]) < 0 or int(rows[-1]) >= shape[0]:
            raise IndexError(f"rows of {key!r} out of range 0..{shape[0] - 1}")
        flat = out.reshape(len(rows), -1).view(torch.uint8).numpy()
        base = shard.data_start + entry["data_offsets"][0]
        # consecutive rows are one read
        breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
        for lo, hi in zip([0, *breaks], [*breaks, len(rows)], strict=True):
            view = memoryview(flat[lo:hi].reshape(-1))
            got = os.preadv(shard.file.fileno(), [view], base + int(rows[lo]) * row_bytes)
            if got != (hi - lo) * row_bytes:
                raise HubtoolError(f"{shard.file.name} ends inside {key!r}", "download it again")
        return out

    def close(self) -> None:
        """Close every open file."""
        for handle in self._handles.values():
            handle.file.close()
        self._handles.clear()

    def __enter__(self) -> ShardReader:
        """Use as a context manager; files close on exit."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close every open file."""
        self.close()


@dataclass
class _Shard:
    """One open shard: its file, where its data starts, its header (tensor name -> dtype, shape, offsets)."""

    file: Any
    data_start: int
    header: dict[str, Any]


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A one-element CPU tensor of ``t``'s dtype and rank (one element, so no two share a data offset)."""
    return torch.zeros((1,) * t.dim(), dtype=t.dtype, device="cpu")


def _layout(entries: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[list[str], bytes]:
    """The data order and the header (length prefix included) safetensors would write for ``entries``."""
    data = save({k: _stand_in(t) for k, t in entries.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    probe = _read_header(data)
    if _dump_header(probe) != data[8 : 8 + n]:
        raise RuntimeError("cannot reproduce the installed safetensors' header layout")
    order = sorted((k for k in probe if k != _METADATA), key=lambda k: probe[k]["data_offsets"][0])
    offsets, offset = {}, 0
    for key in order:
        offsets[key] = [offset, offset + tensor_nbytes(entries[key])]
        offset = offsets[key][1]
    header: dict[str, Any] = {}
    for key, info in probe.items():  # the probe's key order, each tensor's fields in the probe's order
        if key == _METADATA:
            # safetensors keeps metadata in a hash map, so its order varies from save to save: sort it
            header[key] = {k: info[k] for k in sorted(info)}
        elif set(info) != _TENSOR_FIELDS:
            raise RuntimeError(
                f"safetensors writes the fields {sorted(info)} for a tensor, not {sorted(_TENSOR_FIELDS)}"
            )
        else:
            header[key] = {**info, "shape": list(entries[key].shape), "data_offsets": offsets[key]}
    raw = _dump_header(header)
    return order, struct.pack("<Q", len(raw)) + raw


def _chunk_bytes(name: str, chunks: Iterable[torch.Tensor], entry: torch.Tensor) -> Iterator[Any]:
    """The data of ``chunks`` (row blocks whose concatenation is the tensor), checked against ``entry``."""
    rows = 0
    for c in chunks:
        if not isinstance(c, torch.Tensor) or c.dtype != entry.dtype or c.shape[1:] != entry.shape[1:]:
            raise ValueError(
                f"produce({name!r}) gave a chunk that is not rows of {entry.dtype} {tuple(entry.shape)}"
            )
        rows += c.shape[0]
        yield c.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    if rows != entry.shape[0]:
        raise ValueError(f"produce({name!r}) gave {rows} rows, expected {entry.shape[0]}")


def _tensor_bytes(name: str, t: object, entry: torch.Tensor) -> Any:
    """``t``'s data as a flat uint8 array (no copy when it is a contiguous CPU tensor), checked against ``entry``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"produce({name!r}) returned {type(t).__name__}, not a tensor")
    if t.shape != entry.shape or t.dtype != entry.dtype:
        raise ValueError(
            f"produce({name!r}) returned {t.dtype} {tuple(t.shape)}, expected {entry.dtype} {tuple(entry.shape)}"
        )
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors_streamed(
    entries: dict[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
    path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``save_file({k: produce(k)}, path, metadata)``'s bytes, holding one produced tensor at a time.

    ``produce(k)`` returns the tensor, or an iterable of blocks of its rows (held one block at a time).
    """
    order, header = _layout(entries, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            for name in order:
                made = produce(name)
                if isinstance(made, torch.Tensor) or entries[name].dim() == 0:
                    data = _tensor_bytes(name, made, entries[name])
                    f.write(data)
                    del data, made  # drop the tensor before asking for the next
                    continue
                for data in _chunk_bytes(
                    name, made, entries[name]
                ):  # a large tensor, a block of rows at a time
                    f.write(data)
                    del data
            f.flush()
            os.fsync(f.fileno())

    atomic_write(Path(path), write)
    log.debug("wrote %s (%d tensors)", path, len(order))
