"""The packed model file (``.bitlm``, written by ``bitlm pack``): bytes on disk ↔ a header dict
plus named tensors.  What the tensors mean (layers, packed weights, dense head/embedding) is
``bitlm.engine``'s; this module knows only the container, and never imports the engine.

Version 1, little-endian::

    b"BITLMPAK"  u32 version  u32 0  u64 header_len  header (UTF-8 JSON)  zero padding to 64
    data: every tensor at a 64-byte aligned offset (relative to the data start)

The header holds the model config, the packing format, head/embedding types, the tokenizer
(tokenizer.json text, optional) and a table of tensors (name, dtype, shape, offset, nbytes,
crc32).  Reading memory-maps the file copy-on-write (weights paged in from the page cache on first
use, never copied) or, for files of 8 MiB and more where the OS offers transparent huge pages,
reads it into a huge-page buffer (``bitlm.memory``: decode streams every weight each token, and
it decodes 10-16 % faster from 2 MiB pages than from a file mapping's 4 KiB ones).  ``verify=True`` checks
every tensor's CRC-32 and the file size, so a corrupt or truncated file is an error naming the
tensor, never a wrong answer.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import memory
from .atomic import atomic_write

__all__ = ["MAGIC", "VERSION", "ALIGN", "PackedFormatError", "write_packed", "read_header", "read_packed"]

MAGIC = b"BITLMPAK"
VERSION = 1
ALIGN = 64

_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


class PackedFormatError(ValueError):
    """A packed model file that is corrupt, truncated, of another version, or inconsistent."""


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_packed(path: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                 tokenizer: str | None = None) -> Path:
    """Write a packed file atomically (temp file in the same folder, then rename).

    The header is ``meta`` followed by the tensor table, ``tokenizer`` (tokenizer.json text or
    None) and the data size; tensors are written in ``tensors``' order."""
    path = Path(path)
    table, offset = [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        table.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                      "offset": offset, "nbytes": nbytes, "crc32": zlib.crc32(_bytes(t))})
        offset += -(-nbytes // ALIGN) * ALIGN
    header = {**meta, "tensors": table, "tokenizer": tokenizer, "data_bytes": offset}
    hb = json.dumps(header).encode()
    pre = MAGIC + struct.pack("<IIQ", VERSION, 0, len(hb))
    data_start = -(-(len(pre) + len(hb)) // ALIGN) * ALIGN
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(pre + hb)
            f.write(b"\0" * (data_start - len(pre) - len(hb)))
            for entry, t in zip(table, tensors.values()):
                f.seek(data_start + entry["offset"])
                f.write(_bytes(t.contiguous()))
            f.truncate(data_start + offset)

    atomic_write(path, write)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a packed file (config, tensor table, tokenizer) without mapping data."""
    path = Path(path)
    with open(path, "rb") as f:
        pre = f.read(24)
        if len(pre) < 24 or pre[:8] != MAGIC:
            raise PackedFormatError(f"{path}: not a bitlm packed model (bad magic)")
        version, _, hlen = struct.unpack("<IIQ", pre[8:])
        if version != VERSION:
            raise PackedFormatError(f"{path}: packed format version {version}, this bitlm reads version {VERSION}")
        hb = f.read(hlen)
    if len(hb) != hlen:
        raise PackedFormatError(f"{path}: truncated header")
    try:
        return json.loads(hb)
    except json.JSONDecodeError as e:
        raise PackedFormatError(f"{path}: corrupt header ({e.msg})") from None


def read_packed(path: str | Path, verify: bool = True, check_header: Callable[[dict[str, Any]], Any] | None = None,
                hugepages: bool | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Map or read a packed file: ``(header, tensors, memory)``.  The tensors are views of
    ``memory`` (an ``mmap`` of the file, or a ``bitlm.memory.Buffer`` holding its bytes; keep it
    alive as long as they are used).  ``check_header(header)`` runs once the header and the file
    size are checked, before any tensor is read (or its CRC computed).  ``hugepages``: read the
    file into a huge-page buffer (default: ``bitlm.memory.worth_it(file size)``)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such packed model file") from None
    with f:
        header = read_header(path)
        hlen = struct.unpack("<Q", f.read(24)[16:24])[0]
        data_start = -(-(24 + hlen) // ALIGN) * ALIGN
        size = os.fstat(f.fileno()).st_size
        need = data_start + int(header.get("data_bytes", 0))
        if size < need:
            last = max((e for e in header["tensors"] if data_start + e["offset"] + e["nbytes"] > size),
                       key=lambda e: -e["offset"], default={"name": "?"})
            raise PackedFormatError(f"{path}: truncated ({size} of {need} bytes); tensor {last['name']!r} is incomplete")
        if check_header is not None:
            check_header(header)
        if hugepages is None:
            hugepages = memory.worth_it(size)
        if hugepages:
            mm = memory.Buffer(size)
            _read_into(f, mm.memoryview(), path)
            raw, view = mm.memoryview(), mm.view
        else:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
            raw = memoryview(mm) if mm is not None else None

            def view(dt: torch.dtype, count: int, off: int) -> torch.Tensor:
                return torch.frombuffer(mm, dtype=dt, count=count, offset=off)
    tensors: dict[str, torch.Tensor] = {}
    for e in header["tensors"]:
        name = e["name"]
        dt = _DTYPES.get(e["dtype"])
        if dt is None:
            raise PackedFormatError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
        off = data_start + e["offset"]
        if verify and zlib.crc32(raw[off : off + e["nbytes"]]) != e["crc32"]:
            raise PackedFormatError(f"{path}: tensor {name!r} is corrupt (CRC-32 mismatch)")
        count = e["nbytes"] // torch.empty(0, dtype=dt).element_size()
        t = view(dt, count, off) if count else torch.empty(0, dtype=dt)
        tensors[name] = t.view(e["shape"])
    return header, tensors, mm


def _read_into(f, out: memoryview, path: Path) -> None:
    """Fill ``out`` from the start of the open file ``f`` (read(2) moves at most ~2 GiB a call)."""
    f.seek(0)
    done, n = 0, len(out)
    while done < n:
        got = f.readinto(out[done : min(n, done + (256 << 20))])
        if not got:
            raise PackedFormatError(f"{path}: file shrank while being read ({done} of {n} bytes)")
        done += got
