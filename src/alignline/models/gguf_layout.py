"""The layout of a GGUF file, read from its header alone: the architecture and whether the file is whole.

A GGUF file is a header (magic, version, tensor and metadata counts, the metadata key/values, one info
record per tensor: name, shape, type, offset) followed by the tensor data, aligned to ``general.alignment``
(default 32). :func:`read_gguf_layout` walks the header without parsing metadata arrays (a 262k-token
vocabulary is skipped, not decoded) and checks that the file holds every tensor's bytes, so a cut or damaged
file is a clear :class:`~alignline.errors.ModelError` before any loader meets it (a loader's ``struct.error`` or
"cannot reshape array" says nothing about the cause).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from alignline.errors import ModelError

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of each GGUF scalar value type (uint8 ... float64)."""
STRING, ARRAY, UINT32 = 8, 9, 4
DEFAULT_ALIGNMENT = 32


@dataclass
class GGUFLayout:
    version: int
    architecture: str | None
    tensors: int
    data_start: int
    """Where the tensor data begins (the header's end, aligned)."""
    data_end: int
    """The bytes the file needs to hold every tensor (tensors of a type this gguf package does not know are
    not counted)."""
    size: int


class _Truncated(Exception):
    def __init__(self, what: str):
        self.what = what


class _Reader:
    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.fh.tell():
            raise _Truncated(what)
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.fh.tell():
            raise _Truncated(what)
        self.fh.seek(n, os.SEEK_CUR)

    def string(self, what: str) -> bytes:
        return self.read(self.unpack("<Q", what)[0], what)

    def value(self, vtype: int, what: str) -> object:
        """A scalar or string value; arrays are skipped (returns None)."""
        if vtype in SCALAR_SIZES:
            raw = self.read(SCALAR_SIZES[vtype], what)
            return struct.unpack("<I", raw)[0] if vtype == UINT32 else None
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            itype, count = self.unpack("<IQ", what)
            if itype in SCALAR_SIZES:
                self.skip(SCALAR_SIZES[itype] * count, what)
            else:
                for _ in range(count):
                    self.value(itype, what)
            return None
        raise ValueError(f"unknown metadata value type {vtype} in {what}")


def _tensor_bytes(ggml_type: int, shape: list[int]) -> int | None:
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ImportError, ValueError, KeyError):
        return None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def _damaged(path: Path, detail: str) -> ModelError:
    return ModelError(f"{path} is truncated or damaged: {detail}. Download or copy the .gguf file again (compare its "
                      "size and checksum with the original)")


def read_gguf_layout(path: str | Path) -> GGUFLayout | None:
    """The layout of a little-endian GGUF v2/v3 file; None when it is not one (the caller decides). Raises
    :class:`ModelError` naming the file when it ends inside its header or before the end of its tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, size)
        try:
            magic = r.read(4, "the magic number")
            if magic != b"GGUF":
                return None
            version, n_tensors, n_kv = r.unpack("<IQQ", "the tensor and metadata counts")
            if version not in (2, 3):
                return None
            arch, alignment = None, DEFAULT_ALIGNMENT
            for i in range(n_kv):
                what = f"metadata entry {i + 1} of {n_kv}"
                key = r.string(what)
                value = r.value(r.unpack("<I", what)[0], what)
                if key == b"general.architecture" and isinstance(value, bytes):
                    arch = value.decode("utf-8", errors="replace")
                elif key == b"general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            data_end = 0
            infos = []
            for i in range(n_tensors):
                what = f"tensor info {i + 1} of {n_tensors}"
                r.string(what)
                n_dims = r.unpack("<I", what)[0]
                shape = list(r.unpack(f"<{n_dims}Q", what)) if n_dims <= 16 else None
                if shape is None:
                    raise _Truncated(what)
                ggml_type, offset = r.unpack("<IQ", what)
                infos.append((ggml_type, shape, offset))
        except _Truncated as exc:
            raise _damaged(path, f"it ends inside its GGUF header (the file has {size:,} bytes; reading "
                                 f"{exc.what})") from None
        except (ValueError, struct.error) as exc:
            raise _damaged(path, f"its GGUF header cannot be read ({exc})") from None
        data_start = -(-fh.tell() // alignment) * alignment
    for ggml_type, shape, offset in infos:
        nbytes = _tensor_bytes(ggml_type, shape)
        if nbytes is not None:
            data_end = max(data_end, data_start + offset + nbytes)
    if data_end > size:
        raise _damaged(path, f"its {n_tensors} tensors need {data_end:,} bytes but the file has {size:,} (it ends "
                             "inside the tensor data)")
    return GGUFLayout(version, arch, n_tensors, data_start, data_end, size)
