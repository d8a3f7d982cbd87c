"""Writers for the binary formats that ``bitlm.data`` reads, used to build test fixtures.

Written from the format descriptions (SWORD zText, R XDR serialisation, R lazy-load DB, Debian
ar archive), independently of the readers, so that a reader bug can't hide behind a writer bug
of the same shape.
"""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# SWORD zText
# ------------------------------------------------------------------------------------------------


def write_ztext_testament(module_dir: Path, testament: str, blocks: list[list[str]]) -> None:
    """Write ``{testament}.bzs/.bzv/.bzz``.  ``blocks`` is a list of blocks, each a list of index
    entries (raw OSIS strings; "" makes an empty entry).  Entries are indexed in order, block by
    block, after the two leading entries SWORD reserves (module and testament headings)."""
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    bzv += struct.pack("<IIH", 0, 0, 0)  # entry 0: empty
    bzv += struct.pack("<IIH", 0, 0, 0)  # entry 1: empty testament heading
    for b, entries in enumerate(blocks):
        raw = bytearray()
        for e in entries:
            data = e.encode("utf-8")
            bzv += struct.pack("<IIH", b, len(raw), len(data) & 0xFFFF)  # 16-bit size, as osis2mod
            raw += data
        comp = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / f"{testament}.bzs").write_bytes(bytes(bzs))
    (module_dir / f"{testament}.bzv").write_bytes(bytes(bzv))
    (module_dir / f"{testament}.bzz").write_bytes(bytes(bzz))


def book_block(osis_id: str, chapters: list[list[str]], intro: str = "", milestone: bool = True) -> list[str]:
    """Entries of one book as osis2mod lays them out: book intro, then per chapter a heading
    entry followed by the verses."""
    head = f'<div type="book" osisID="{osis_id}" sID="b{osis_id}" canonical="true"/>' if milestone else ""
    entries = [intro + head + f'<title type="main">The Book of {osis_id}</title>']
    for c, verses in enumerate(chapters, 1):
        entries.append(f'<chapter n="{c}" osisID="{osis_id}.{c}" sID="{osis_id}.{c}"/>')
        entries.extend(verses)
    if milestone:
        entries[-1] += f'<div type="book" eID="b{osis_id}" osisID="{osis_id}"/>'
    return entries


# ------------------------------------------------------------------------------------------------
# R XDR serialisation
# ------------------------------------------------------------------------------------------------

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 254, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, ALTREP_SXP = 255, 238
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6


class RWriter:
    """Builds an XDR serialisation by hand; symbols are written once and then referenced."""

    def __init__(self, version: int = 3):
        self.out = bytearray(b"X\n")
        self.syms: dict[str, int] = {}
        self.i(version)
        self.i(0x040202)  # written by R 4.2.2
        self.i(0x030500 if version == 3 else 0x020300)
        if version == 3:
            self.i(5)
            self.out += b"UTF-8"

    def i(self, v: int) -> None:
        self.out += struct.pack(">i", v)

    def charsxp(self, s: str | None, enc: str = "utf-8") -> None:
        if s is None:
            self.i(CHARSXP)
            self.i(-1)
            return
        data = s.encode(enc)
        if enc == "latin-1":
            lev = LATIN1
        else:
            lev = ASCII if data.isascii() else UTF8
        self.i(CHARSXP | (lev << 12))
        self.i(len(data))
        self.out += data

    def symbol(self, name: str) -> None:
        if name in self.syms:
            self.i(REFSXP | (self.syms[name] << 8))
            return
        self.i(SYMSXP)
        self.charsxp(name)
        self.syms[name] = len(self.syms) + 1

    def attrs(self, attrs: dict[str, Any]) -> None:
        """A pairlist of tagged values, NILVALUE-terminated."""
        for k, v in attrs.items():
            self.i(LISTSXP | HAS_TAG)
            self.symbol(k)
            self.value(v)
        self.i(NILVALUE)

    def strsxp(
        self, values: list[str | None], attrs: dict[str, Any] | None = None, enc: str = "utf-8"
    ) -> None:
        self.i(STRSXP | (HAS_ATTR if attrs else 0))
        self.i(len(values))
        for s in values:
            self.charsxp(s, enc)
        if attrs:
            self.attrs(attrs)

    def intsxp(
        self, values: list[int | None], attrs: dict[str, Any] | None = None, lgl: bool = False
    ) -> None:
        self.i((LGLSXP if lgl else INTSXP) | (HAS_ATTR if attrs else 0))
        self.i(len(values))
        for v in values:
            self.i(-(2**31) if v is None else int(v))
        if attrs:
            self.attrs(attrs)

    def realsxp(self, values: list[float]) -> None:
        self.i(REALSXP)
        self.i(len(values))
        self.out += struct.pack(f">{len(values)}d", *values)

    def named_list(self, d: dict[str, Any]) -> None:
        self.i(VECSXP | HAS_ATTR)
        self.i(len(d))
        for v in d.values():
            self.value(v)
        self.attrs({"names": list(d)})

    def altrep_compact_intseq(self, n: int, start: int, step: int = 1) -> None:
        self.i(ALTREP_SXP)
        self.i(LISTSXP)  # info: (class, package, type)
        self.symbol("compact_intseq")
        self.i(LISTSXP)
        self.symbol("base")
        self.i(LISTSXP)
        self.intsxp([INTSXP])
        self.i(NILVALUE)
        self.realsxp([float(n), float(start), float(step)])  # state
        self.i(NILVALUE)  # attributes

    def altrep_wrap_string(self, values: list[str | None], attrs: dict[str, Any] | None = None) -> None:
        self.i(ALTREP_SXP)
        self.i(LISTSXP)
        self.symbol("wrap_string")
        self.i(LISTSXP)
        self.symbol("base")
        self.i(LISTSXP)
        self.intsxp([STRSXP])
        self.i(NILVALUE)
        self.i(LISTSXP)  # state: CONS(wrapped vector, metadata): a dotted pair
        self.strsxp(values)
        self.intsxp([0, 0])
        if attrs:
            self.attrs(attrs)
        else:
            self.i(NILVALUE)

    def value(self, v: Any) -> None:
        if isinstance(v, dict):
            self.named_list(v)
        elif isinstance(v, list) and all(isinstance(x, str) or x is None for x in v):
            self.strsxp(v)
        elif isinstance(v, list):
            self.intsxp(v)
        else:
            raise TypeError(type(v))

    def getvalue(self) -> bytes:
        return bytes(self.out)


def r_serialize(v: Any) -> bytes:
    w = RWriter()
    w.value(v)
    return w.getvalue()


def write_r_lazyload(prefix: Path, objects: dict[str, bytes], compression: int = 1) -> None:
    """Write ``prefix.rdb`` / ``prefix.rdx`` holding already-serialised ``objects``.
    ``compression``: 1 zlib (R's default), 3 xz with the one-byte method tag."""
    rdb = bytearray()
    variables: dict[str, list[int]] = {}
    for name, raw in objects.items():
        if compression == 1:
            blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        else:
            blob = struct.pack(">I", len(raw)) + b"Z" + lzma.compress(raw)
        variables[name] = [len(rdb), len(blob)]
        rdb += blob
    w = RWriter()
    w.i(VECSXP | HAS_ATTR)
    w.i(3)
    w.named_list(variables)
    w.i(VECSXP)  # references: empty list
    w.i(0)
    if compression == 1:
        w.intsxp([1], lgl=True)
    else:
        w.intsxp([compression])
    w.attrs({"names": ["variables", "references", "compressed"]})
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".rdb").write_bytes(bytes(rdb))
    prefix.with_suffix(".rdx").write_bytes(gzip.compress(w.getvalue()))


# ------------------------------------------------------------------------------------------------
# Debian package (ar archive of debian-binary, control.tar.gz, data.tar.gz)
# ------------------------------------------------------------------------------------------------


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        dirs: set[str] = set()
        for path in files:
            parts = path.split("/")[:-1]
            for k in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:k]))
        for d in sorted(dirs):
            ti = tarfile.TarInfo("./" + d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tar.addfile(ti)
        for path, data in files.items():
            ti = tarfile.TarInfo("./" + path)
            ti.size = len(data)
            ti.mode = 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_deb(path: Path, package: str, files: dict[str, bytes]) -> None:
    control = (
        f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        f"Description: test fixture\n"
    ).encode()
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", _tar_gz({"control": control})),
        ("data.tar.gz", _tar_gz(files)),
    ]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        hdr = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(hdr) == 60
        out += hdr + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(bytes(out))
