"""One rank's checkpoint shard as a single file that can also be read in part.

A resume in the same layout reads a shard whole. A resume into another layout (other worker count or
expert-parallel degree; ``pipelines.train.reshard``) needs pieces of several shards: some tensors, and of an
expert stack only the rows of the experts the new rank holds. So a shard keeps an index up front and
each tensor as raw contiguous bytes, and a reader fetches only the byte ranges it asks for (ranged reads
through ``pyarrow``'s random-access files: local files or S3).

File layout::

    MAGIC (8 bytes) | header length H (8 bytes, little-endian) | header: H bytes of JSON | data

    header = {"version": 1,
              "tensors": {key: {"dtype": "float32", "shape": [...], "offset": int, "nbytes": int}, ...},
              "skeleton": [offset, nbytes]}

Offsets count from the start of the data section. ``key`` is the tensor's path in the state, its dict
keys and list indices joined by ``/`` (``model/layers.1.attn.q_b_proj.weight``,
``optimizer/state/layers.1.mlp.experts.gate_proj/momentum``). The skeleton is the state with every tensor
replaced by a ``TensorRef`` to its key, serialised with ``torch.save``: step counters, RNG states and
optimizer hyperparameters, small next to the tensors.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAGIC = b"K2SHARD1"
VERSION = 1
_PREFIX = len(MAGIC) + 8
ALIGN = 64


@dataclass(frozen=True)
class TensorRef:
    """Placeholder for a tensor in a shard's skeleton."""

    key: str


def _flatten(obj: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = "/".join(path)
        tensors[key] = obj
        return TensorRef(key)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            part = str(k)
            if "/" in part:
                raise ValueError(f"state key {part!r} at {'/'.join(path) or '<root>'} contains '/', which a "
                                 "shard uses to join paths")
            out[k] = _flatten(v, (*path, part), tensors)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, (*path, str(i)), tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def fill(obj: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    """``obj`` (a skeleton or a part of one) with every ``TensorRef`` replaced by ``tensor(key)``."""
    if isinstance(obj, TensorRef):
        return tensor(obj.key)
    if isinstance(obj, dict):
        return {k: fill(v, tensor) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, tensor) for v in obj]
    if isinstance(obj, tuple):
        return tuple(fill(v, tensor) for v in obj)
    return obj


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (dicts, lists, tuples), as a shard stores them: what a
    reader of exactly that state reads (``ShardReader.tensor_bytes_read``)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write(stream, state: Any) -> None:
    """Write the shard file for ``state`` (nested dicts, lists and tuples of tensors and picklable values)
    to ``stream``, tensor by tensor: only the index and the skeleton are built in memory first, so this
    function never holds a second copy of the tensors (the retrying S3 wrapper's stream spools past 64 MiB
    to local disk, not memory)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, (), tensors)
    index: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, t in tensors.items():
        offset += -offset % ALIGN
        nbytes = t.numel() * t.element_size()
        index[key] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
                      "nbytes": nbytes}
        offset += nbytes
    buf = io.BytesIO()
    torch.save(skeleton, buf)
    skel = buf.getvalue()
    header = json.dumps({"version": VERSION, "tensors": index, "skeleton": [offset, len(skel)]}).encode()
    stream.write(MAGIC + struct.pack("<Q", len(header)) + header)
    pos = 0
    for key, t in tensors.items():
        start = index[key]["offset"]
        if start > pos:
            stream.write(bytes(start - pos))
        raw = _raw(t)
        if raw.nbytes:
            stream.write(raw)
        pos = start + raw.nbytes
    stream.write(skel)


def encode(state: Any) -> bytes:
    """The shard file's bytes for ``state`` (``write`` into memory)."""
    buf = io.BytesIO()
    write(buf, state)
    return buf.getvalue()


def _tensor_from(raw: bytes | bytearray | memoryview, info: dict[str, Any], shape: list[int] | None = None
                 ) -> torch.Tensor:
    dtype = getattr(torch, info["dtype"])
    shape = info["shape"] if shape is None else shape
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _parse_header(prefix: bytes, where: str) -> int:
    if len(prefix) < _PREFIX or prefix[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{where} is not a k2pipe checkpoint shard (it does not start with {MAGIC!r}); "
                         "checkpoints written before this format cannot be resumed")
    return struct.unpack("<Q", prefix[len(MAGIC):_PREFIX])[0]


def decode(data: bytes, where: str = "shard") -> Any:
    """The state ``encode`` wrote, every tensor a fresh CPU tensor."""
    header_len = _parse_header(data[:_PREFIX], where)
    header = json.loads(data[_PREFIX:_PREFIX + header_len])
    base = _PREFIX + header_len
    view = memoryview(data)
    tensors = {key: _tensor_from(view[base + i["offset"]:base + i["offset"] + i["nbytes"]], i)
               for key, i in header["tensors"].items()}
    s_off, s_len = header["skeleton"]
    skeleton = torch.load(io.BytesIO(view[base + s_off:base + s_off + s_len]), weights_only=False)
    return fill(skeleton, tensors.__getitem__)


class ShardReader:
    """Ranged reads of one shard file: the index, the skeleton, whole tensors or row ranges of them.
    ``bytes_read`` counts every byte fetched, ``tensor_bytes_read`` the tensor data among them (tests check
    that a resharding rank reads only its part)."""

    def __init__(self, fs, path: str):
        self.path = path
        self._file = fs.open_input_file(path)
        self.bytes_read = 0
        self.tensor_bytes_read = 0
        prefix = self._read(0, _PREFIX)
        header_len = _parse_header(prefix, path)
        self.header = json.loads(self._read(_PREFIX, header_len))
        self._base = _PREFIX + header_len
        self.tensors: dict[str, dict[str, Any]] = self.header["tensors"]
        self._skeleton = None

    def _read(self, offset: int, nbytes: int) -> bytes:
        data = self._file.read_at(nbytes, offset) if nbytes else b""
        if len(data) != nbytes:
            raise OSError(f"{self.path}: short read at byte {offset} ({len(data)} of {nbytes} bytes); "
                          "the shard is truncated")
        self.bytes_read += nbytes
        return data

    def skeleton(self) -> Any:
        """The state with ``TensorRef`` in place of every tensor."""
        if self._skeleton is None:
            s_off, s_len = self.header["skeleton"]
            self._skeleton = torch.load(io.BytesIO(self._read(self._base + s_off, s_len)), weights_only=False)
        return self._skeleton

    def tensor(self, key: str, rows: range | None = None, *, elements: range | None = None) -> torch.Tensor:
        """Tensor ``key``, or only its rows ``rows`` along the first dimension, or only the flat elements
        ``elements`` (a 1-D tensor); one ranged read."""
        info = self.tensors[key]
        shape = list(info["shape"])
        if elements is not None:
            numel = 1
            for d in shape:
                numel *= d
            if elements.step != 1 or not 0 <= elements.start <= elements.stop <= numel:
                raise ValueError(f"{self.path}: elements {elements} outside {key} of {numel} elements")
            item = info["nbytes"] // numel if numel else 0
            self.tensor_bytes_read += len(elements) * item
            data = self._read(self._base + info["offset"] + elements.start * item, len(elements) * item)
            return _tensor_from(data, info, [len(elements)])
        if rows is None:
            self.tensor_bytes_read += info["nbytes"]
            return _tensor_from(self._read(self._base + info["offset"], info["nbytes"]), info)
        if not shape or rows.step != 1 or not 0 <= rows.start <= rows.stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {rows} outside {key} of shape {tuple(shape)}")
        row_bytes = info["nbytes"] // shape[0] if shape[0] else 0
        self.tensor_bytes_read += len(rows) * row_bytes
        data = self._read(self._base + info["offset"] + rows.start * row_bytes, len(rows) * row_bytes)
        return _tensor_from(data, info, [len(rows), *shape[1:]])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
