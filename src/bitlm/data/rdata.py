"""R serialisation (XDR, version 2/3) and lazy-load databases, stdlib only.

``Rdata.rdx`` is a gzip'd R serialisation of the index (``variables`` → (offset, length)); each
``Rdata.rdb`` entry is ``[4-byte big-endian length][zlib stream]`` of an R XDR serialisation
(``X\\n``).  ``r_unserialize`` implements the subset of R's format that data objects use (vectors,
pairlists, attributes, references, NA strings, common ALTREP classes).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import DataError

# ------------------------------------------------------------------------------------------------
# R serialisation (XDR, version 2/3) and lazy-load databases
# ------------------------------------------------------------------------------------------------

# SEXP types (R Internals §1.1) and the pseudo-types of the serialisation format (serialize.c).
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP = 9, 10, 13, 14, 15, 16
_DOTSXP, _VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 17, 19, 20, 24, 25
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP = 255, 254, 253, 252, 251
_BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP, _PERSISTSXP = 250, 249, 248, 247
_EMPTYENV_SXP, _BASEENV_SXP, _ALTREP_SXP = 242, 241, 238
_PAIRLIST_TYPES = (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP)
_NA_INT = -(2**31)
# CHARSXP encoding bits live in the "levels" field (flags >> 12)
_LATIN1_MASK, _UTF8_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6


class RSymbol(str):
    """An R symbol (name), e.g. an attribute tag."""


class RVector(list):
    """An R vector: a Python list (NA → None) with its SEXP type and attributes."""

    def __init__(self, rtype: int, values: Iterable[Any] = (), attrs: dict[str, Any] | None = None):
        super().__init__(values)
        self.rtype = rtype
        self.attrs: dict[str, Any] = attrs or {}


@dataclass
class RPairList:
    """An R pairlist (or language object): ordered (tag, value) pairs."""

    rtype: int
    items: list[tuple[str | None, Any]]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class REnvironment:
    """An environment, kept only as its frame's bindings (enough for data objects)."""

    bindings: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RSpecial:
    """A singleton such as the global environment or a namespace/package reference."""

    name: str


class _RUnserializer:
    """Reads R's XDR serialisation format (``serialize(x, NULL, xdr=TRUE)``, format 2 or 3)."""

    def __init__(self, data: bytes, where: str):
        self.data = data
        self.pos = 0
        self.where = where
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def fail(self, msg: str) -> DataError:
        return DataError(f"{self.where}: {msg} (R serialisation, byte {self.pos})")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail("unexpected end of data")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: upper and lower 32 bits follow
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise self.fail(f"negative length {n}")
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise self.fail(f"not an XDR serialisation (starts {fmt!r}; ascii/binary formats unsupported)")
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version to read it
        if version == 3:
            enc = self.take(self.int()).decode("ascii", "replace")
            self.native_encoding = "latin-1" if enc.lower() in ("latin1", "iso-8859-1") else "utf-8"
        elif version != 2:
            raise self.fail(f"unsupported serialisation version {version}")

    def attributes(self, has_attr: bool) -> dict[str, Any]:
        if not has_attr:
            return {}
        pl = self.item()
        if not isinstance(pl, RPairList):
            raise self.fail("attributes are not a pairlist")
        return {str(k): v for k, v in pl.items}

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & _UTF8_MASK or levels & _ASCII_MASK:
            return raw.decode("utf-8", errors="replace")
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & _BYTES_MASK:
            return raw.decode("utf-8", errors="surrogateescape")
        return raw.decode(self.native_encoding, errors="replace")

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t == _NILVALUE_SXP:
            return None
        if t in (
            _GLOBALENV_SXP,
            _EMPTYENV_SXP,
            _BASEENV_SXP,
            _BASENAMESPACE_SXP,
            _UNBOUNDVALUE_SXP,
            _MISSINGARG_SXP,
        ):
            return RSpecial(
                {253: "globalenv", 242: "emptyenv", 241: "baseenv", 250: "basenamespace"}.get(t, "missing")
            )
        if t == _REFSXP:
            idx = flags >> 8 or self.int()
            if not 1 <= idx <= len(self.refs):
                raise self.fail(f"reference {idx} out of range")
            return self.refs[idx - 1]
        if t in (_PERSISTSXP, _NAMESPACESXP, _PACKAGESXP):
            if self.int() != 0:
                raise self.fail("bad string vector header")
            names = [self.item() for _ in range(self.int())]
            kind = {_PERSISTSXP: "persist", _NAMESPACESXP: "namespace", _PACKAGESXP: "package"}[t]
            obj = RSpecial(f"{kind}:{':'.join(map(str, names))}")
            self.refs.append(obj)
            return obj
        if t == _SYMSXP:
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t == _ENVSXP:
            self.int()  # locked flag
            env = REnvironment()
            self.refs.append(env)  # registered before its contents: they may refer back to it
            self.item()  # enclosing environment
            frame = self.item()
            hashtab = self.item()
            attr = self.item()
            if isinstance(attr, RPairList):
                env.attrs = {str(k): v for k, v in attr.items}
            if isinstance(frame, RPairList):
                env.bindings.update({str(k): v for k, v in frame.items})
            if isinstance(hashtab, RVector):  # hashed frame: a list of pairlist buckets
                for bucket in hashtab:
                    if isinstance(bucket, RPairList):
                        env.bindings.update({str(k): v for k, v in bucket.items})
            return env
        if t in _PAIRLIST_TYPES:
            # pairlists are read iteratively along the CDR so long ones don't exhaust recursion
            pl = RPairList(t, [])
            while True:
                attrs = self.attributes(has_attr)
                if not pl.items and attrs:
                    pl.attrs = attrs
                tag = self.item() if has_tag else None
                pl.items.append((str(tag) if tag is not None else None, self.item()))
                nxt = self.int()
                nt = nxt & 0xFF
                if nt == _NILVALUE_SXP:
                    return pl
                if nt not in _PAIRLIST_TYPES:
                    # the tail is some other object (dotted pair): read it and stop
                    self.pos -= 4
                    pl.items.append((None, self.item()))
                    return pl
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
        if t == _ALTREP_SXP:
            return self.altrep()
        if t == _CHARSXP:
            s = self.charsxp(levels)
            if has_attr:
                self.item()  # old writers stored the CHARSXP cache link here; R ignores it too
            return s
        if t in (_LGLSXP, _INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            if t == _LGLSXP:
                vals: list[Any] = [None if v == _NA_INT else bool(v) for v in ints]
            else:
                vals = [None if v == _NA_INT else v for v in ints]
            return RVector(t, vals, self.attributes(has_attr))
        if t == _REALSXP:
            n = self.length()
            return RVector(t, struct.unpack(f">{n}d", self.take(8 * n)), self.attributes(has_attr))
        if t == _CPLXSXP:
            n = self.length()
            d = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return RVector(t, [complex(d[2 * i], d[2 * i + 1]) for i in range(n)], self.attributes(has_attr))
        if t == _STRSXP:
            n = self.length()
            vals = []
            for _ in range(n):
                f = self.int()
                if f & 0xFF != _CHARSXP:
                    raise self.fail(f"string vector element of type {f & 0xFF}")
                vals.append(self.charsxp(f >> 12))
                if f & (1 << 9):
                    self.item()
            return RVector(t, vals, self.attributes(has_attr))
        if t in (_VECSXP, _EXPRSXP):
            n = self.length()
            return RVector(t, [self.item() for _ in range(n)], self.attributes(has_attr))
        if t == _RAWSXP:
            n = self.length()
            return RVector(t, self.take(n), self.attributes(has_attr))
        if t == _S4SXP:
            return RVector(t, (), self.attributes(has_attr))
        raise self.fail(f"unsupported SEXP type {t}")

    def altrep(self) -> Any:
        info = self.item()
        state = self.item()
        attr = self.item()
        attrs = {str(k): v for k, v in attr.items} if isinstance(attr, RPairList) else {}
        cls = str(info.items[0][1]) if isinstance(info, RPairList) and info.items else "?"
        if cls in ("compact_intseq", "compact_realseq") and isinstance(state, RVector) and len(state) == 3:
            n, start, step = int(state[0]), state[1], state[2]
            if cls == "compact_intseq":
                return RVector(_INTSXP, [int(start + i * step) for i in range(n)], attrs)
            return RVector(_REALSXP, [float(start + i * step) for i in range(n)], attrs)
        if cls.startswith("wrap_") and isinstance(state, RPairList) and state.items:
            inner = state.items[0][1]  # state is CONS(wrapped vector, metadata)
            if isinstance(inner, RVector):
                return RVector(inner.rtype, inner, {**inner.attrs, **attrs})
        if cls == "deferred_string" and isinstance(state, RPairList) and state.items:
            arg = state.items[0][1]  # CONS(numeric vector, scalar-ness): coerce as as.character() does
            if isinstance(arg, RVector):
                conv = [
                    None if v is None else (str(v) if isinstance(v, int) else format(v, ".15g")) for v in arg
                ]
                return RVector(_STRSXP, conv, attrs)
        raise self.fail(f"unsupported ALTREP class {cls!r}")


def r_unserialize(data: bytes, where: str = "<bytes>") -> Any:
    """Decode one R XDR serialisation (``X\\n`` header).  Character vectors come back as
    ``RVector`` lists of ``str`` (``None`` for NA); other vectors likewise; pairlists as
    ``RPairList``.  Unsupported types (closures' bytecode, external pointers) raise ``DataError``."""
    u = _RUnserializer(data, where)
    u.header()
    return u.item()


def _decompress_rdb_entry(blob: bytes, compressed: int, where: str) -> bytes:
    """One lazy-load entry: 4-byte big-endian length, then the payload (R's R_decompress1/2/3)."""
    if len(blob) < 4:
        raise DataError(f"{where}: truncated entry")
    (ulen,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    try:
        if compressed == 1:
            out = zlib.decompress(body)
        elif compressed == 0:
            out = body
        else:  # formats 2 (bzip2) and 3 (xz) carry a one-byte method tag first
            kind, body = body[:1], body[1:]
            methods: dict[bytes, Callable[[bytes], bytes]] = {
                b"Z": lzma.decompress,
                b"2": bz2.decompress,
                b"1": zlib.decompress,
                b"0": bytes,
            }
            if kind not in methods:
                raise DataError(f"{where}: unknown compression tag {kind!r}")
            out = methods[kind](body)
    except (zlib.error, OSError, lzma.LZMAError) as e:
        raise DataError(f"{where}: cannot decompress entry ({e})") from None
    if len(out) != ulen:
        raise DataError(f"{where}: entry inflates to {len(out)} bytes, header says {ulen}")
    return out


def read_r_lazyload(prefix: str | os.PathLike[str], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Read objects from an R lazy-load database ``prefix.rdx`` / ``prefix.rdb`` (e.g. a package's
    ``data/Rdata``).  Returns ``{name: object}`` in index order (only ``names`` when given)."""
    prefix = Path(prefix)
    rdx_p, rdb_p = prefix.with_suffix(".rdx"), prefix.with_suffix(".rdb")
    for p in (rdx_p, rdb_p):
        if not p.is_file():
            raise DataError(f"{p}: R lazy-load file not found")
    raw = rdx_p.read_bytes()
    try:
        # the index is saved like saveRDS(): gzip by default; accept the other compressors too
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":
            raw = lzma.decompress(raw)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{rdx_p}: cannot decompress index ({e})") from None
    index = r_unserialize(raw, str(rdx_p))
    if not isinstance(index, RVector) or "names" not in index.attrs:
        raise DataError(f"{rdx_p}: index is not a named list")
    parts = dict(zip(index.attrs["names"], index))
    variables = parts.get("variables")
    if not isinstance(variables, RVector) or "names" not in variables.attrs:
        raise DataError(f"{rdx_p}: index has no 'variables' field")
    comp = parts.get("compressed")
    compressed = int(comp[0]) if isinstance(comp, RVector) and comp and comp[0] is not None else 1
    rdb = rdb_p.read_bytes()
    out: dict[str, Any] = {}
    for name, loc in zip(variables.attrs["names"], variables):
        if names is not None and name not in names:
            continue
        off, n = int(loc[0]), int(loc[1])
        where = f"{rdb_p}[{name}]"
        if off + n > len(rdb):
            raise DataError(f"{where}: entry runs past the end of the file")
        out[name] = r_unserialize(_decompress_rdb_entry(rdb[off : off + n], compressed, where), where)
    if names is not None:
        missing = [n for n in names if n not in out]
        if missing:
            raise DataError(f"{rdx_p}: no object named {missing[0]!r}")
    return out
