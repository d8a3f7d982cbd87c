"""Data layer of bitlm: corpora, the byte-level BPE tokenizer, memory-mapped token caches, batches.

What this module owns
---------------------
* **Corpus loading.**  ``load_text_source(spec)`` takes ``"default"`` (real English text from Debian
  packages, no network besides apt), a named Debian source or a ``+`` combination of them
  (``"default+kjv"``), a local ``.txt`` file or directory of ``.txt`` files, a ``.jsonl[.gz]`` file
  (field ``text`` by default), a ``.parquet`` file (column ``text``, needs pyarrow), or
  ``"hf:name[:config]"`` (Hugging Face ``datasets.load_dataset``, only when asked for explicitly).
* **Debian sources**, fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into
  ``$BITLM_CACHE/corpus`` (default ``~/.cache/bitlm/corpus``), then read with stdlib-only parsers:

  - SWORD *zText* modules (``sword-text-web``, ``sword-text-kjv``): ``{ot,nt}.bzs`` holds 12-byte
    ``<III`` records (offset, size, uncompressed size) of zlib blocks in ``{ot,nt}.bzz``;
    ``{ot,nt}.bzv`` holds 10-byte ``<IIH`` records (block, offset, size) of one verse inside the
    decompressed block.  Verse text is OSIS XML: ``<note>`` and non-canonical ``<title>`` elements
    are dropped, other tags stripped, entities unescaped.  One verse per line; a document per book
    (books are found from the OSIS ``<div type="book" sID=…>`` markers, so no versification table
    is needed).
  - R lazy-load databases (``r-cran-janeaustenr``: six Austen novels, ``r-cran-tokenizers``:
    Moby-Dick): ``Rdata.rdx`` is a gzip'd R serialisation of the index (``variables`` → (offset,
    length)); each ``Rdata.rdb`` entry is ``[4-byte big-endian length][zlib stream]`` of an R XDR
    serialisation (``X\\n``).  ``r_unserialize`` implements the subset of R's format that data
    objects use (vectors, pairlists, attributes, references, NA strings, common ALTREP classes).
  - plain ``fortunes`` files (``%``-separated, backspace overstriking removed) and ``jargon-text``.

* **The fixed validation split.**  Every document is cut into chunks of about ``CHUNK_CHARS``
  characters at line ends; chunk *j* of document *name* is held out iff
  ``sha256(f"{name}\\0{j}")`` read as a fraction in [0, 1) is below ``val_fraction`` (default 3 %).
  The rule depends only on the text and the document names, so it never changes between runs,
  and validation text is spread over every source (same register as training text).
* **Tokenizer**: byte-level BPE trained with the ``tokenizers`` library on the training split,
  cached by hash of (training text, vocab size, ``TOKENIZER_TAG``); or a ``tokenizer.json`` /
  Hugging Face tokenizer folder.  ``<|endoftext|>`` (id 0) is both EOS and BOS, ``<|pad|>`` is id 1.
* **Token cache**: ``.npy`` arrays (uint16 when the vocabulary fits, else uint32) under
  ``$BITLM_CACHE/tokens/<hash>/``, opened with ``np.load(mmap_mode="r")``.  Layout:
  ``EOS d1 EOS d2 … EOS dn EOS`` so every document starts right after an EOS acting as BOS.
* **Batches**: ``get_batch(tokens, B, T, seed=, step=)`` draws random windows with an RNG seeded
  by (seed, step, rank) alone, so a resumed run sees exactly the batches an uninterrupted one
  would; ``iter_eval_batches`` walks validation tokens in non-overlapping windows.
* **Bits per byte**: ``token_byte_lengths(tokenizer)`` gives each token's UTF-8 byte count (0 for
  special tokens), so bpb = total NLL (nats) / (ln 2 · bytes) over the same targets.

Nothing heavy is imported at module import: torch, tokenizers, pyarrow and datasets load lazily.
"""

from __future__ import annotations

import bisect
import bz2
import gzip
import hashlib
import html
import io
import json
import lzma
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io.atomic import atomic_write, atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DataError",
    "Document",
    "Corpus",
    "Tokenizer",
    "TokenData",
    "SOURCES",
    "DEFAULT_SOURCES",
    "cache_root",
    "fetch_debian_package",
    "read_ztext_module",
    "osis_to_text",
    "r_unserialize",
    "read_r_lazyload",
    "split_documents",
    "load_corpus",
    "load_text_source",
    "train_tokenizer",
    "load_tokenizer",
    "tokenize_corpus",
    "prepare_data",
    "get_batch",
    "iter_eval_batches",
    "utf8_len",
    "token_byte_lengths",
    "count_token_bytes",
    "bits_per_byte",
]

# Bump when the corpus readers' output changes, so cached token arrays are not reused wrongly
# (the token-cache key hashes the text itself, so this is belt and braces for the split rule).
SPLIT_TAG = "bitlm-split-v1"
# Bump when the tokenizer recipe below changes: it is part of the tokenizer cache key.
TOKENIZER_TAG = "bitlm-bpe-v1"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

CHUNK_CHARS = 8192  # validation-split granularity (~2k tokens, longer than typical eval windows)
DEFAULT_VAL_FRACTION = 0.03


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the file, field or package."""


# ------------------------------------------------------------------------------------------------
# cache directory
# ------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The bitlm cache root: ``cache_dir``, else ``$BITLM_CACHE``, else ``~/.cache/bitlm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BITLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bitlm"


def _progress(iterable: Iterable[Any], **kw: Any) -> Iterable[Any]:
    """tqdm over ``iterable``; silent when stderr is not a terminal (logs, CI) or tqdm is absent."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return iterable
    return tqdm(iterable, disable=None, file=sys.stderr, **kw)


# ------------------------------------------------------------------------------------------------
# Debian packages: apt-get download + dpkg -x, cached and atomic
# ------------------------------------------------------------------------------------------------

_COMPLETE_MARKER = ".bitlm-complete"
# apt says one of these when the package lists are missing or stale (fixable by apt-get update)
_APT_NO_LISTS = (
    "Unable to locate package",
    "has no installation candidate",
    "Can't select",
    "No packages found",
)
_apt_updated = False  # apt-get update is attempted at most once per process


def _run_apt(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(
            f"`{args[0]}` not found: the default corpus is fetched with Debian's apt; "
            "on another system pass a local text file instead (e.g. --data corpus.txt)"
        ) from None


def _last_line(s: str) -> str:
    lines = [ln.strip() for ln in s.strip().splitlines() if ln.strip() and not ln.startswith("W:")]
    return lines[-1] if lines else "(no output)"


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download package`` into ``dest``; one ``apt-get update`` retry when lists are missing."""
    global _apt_updated
    for attempt in (0, 1):
        r = _run_apt(["apt-get", "download", package], dest)
        debs = sorted(dest.glob("*.deb"))
        if r.returncode == 0 and debs:
            return debs[0]
        msg = r.stderr + r.stdout
        no_lists = any(s in msg for s in _APT_NO_LISTS)
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if attempt == 0 and no_lists and is_root and not _apt_updated:
            _apt_updated = True
            print(f"bitlm: apt has no list for {package}; running `apt-get update` once", file=sys.stderr)
            _run_apt(["apt-get", "update"], dest)
            continue
        if no_lists:
            raise DataError(
                f"apt-get download {package} failed: apt knows no such package; run "
                f"`sudo apt-get update` (Debian 12 'main' has {package}) or pass a local text file"
            )
        raise DataError(f"apt-get download {package} failed: {_last_line(msg)}")
    raise AssertionError("unreachable")  # pragma: no cover


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the data part of a .deb into ``dest`` (``dpkg-deb -x``; stdlib ar+tar if it is absent)."""
    if shutil.which("dpkg-deb"):
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"dpkg-deb -x {deb.name} failed: {_last_line(r.stderr)}")
        return
    # A .deb is an ar archive: "!<arch>\n", then 60-byte member headers (name 16, size at 48..58).
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{deb}: not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode("ascii", "replace").strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode("ascii").strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(dest, filter="data")
                    else:  # pragma: no cover - Python < 3.11.4
                        tar.extractall(dest)
            except tarfile.TarError as e:
                raise DataError(f"{deb.name}: cannot unpack {name} without dpkg-deb ({e})") from None
            return
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    raise DataError(f"{deb}: no data.tar member")


def fetch_debian_package(package: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download and unpack a Debian package (no root needed); return the unpacked root directory.

    Cached under ``<cache>/corpus/debs/<package>``; the work happens in a temporary sibling
    directory renamed into place at the end, so an interrupted run never leaves a half tree.
    """
    base = cache_root(cache_dir) / "corpus" / "debs"
    final = base / package
    if (final / _COMPLETE_MARKER).is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{package}."))
    try:
        # apt (running as root) hands the download to the unprivileged `_apt` user; let it in.
        os.chmod(tmp, 0o755)
        deb = _apt_download(package, tmp)
        root = tmp / "root"
        root.mkdir()
        _extract_deb(deb, root)
        (root / _COMPLETE_MARKER).write_text(deb.name + "\n")
        if final.exists():  # a stale, incomplete tree (or another process won the race)
            if (final / _COMPLETE_MARKER).is_file():
                return final
            shutil.rmtree(final)
        try:
            os.replace(root, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# SWORD zText modules (OSIS markup)
# ------------------------------------------------------------------------------------------------

_SOFT = "\x00"  # stands for "a word boundary was here" while tags are being removed
_NOTE_RE = re.compile(r"<note\b[^>]*?(?<!/)>.*?</note>", re.S)
_NONCANON_TITLE_RE = re.compile(r"<title\b(?![^>]*canonical=\"true\")[^>]*?(?<!/)>.*?</title>", re.S)
# Elements that separate words (structure); every other tag is inline (<w>, <q>, <transChange>…)
# and vanishes without a trace, so "<w>God</w>," stays "God,".
_BLOCK_TAG_RE = re.compile(
    r"</?(?:div|p|l|lg|lb|chapter|verse|title|milestone|list|item|speaker|table|row|cell|head|"
    r"closer|salute|signed|figure)\b[^>]*>"
)
_ANY_TAG_RE = re.compile(r"<[^>]*>")
# A run of word boundaries becomes one space, or nothing before closing punctuation/line end.
_SOFT_BEFORE_PUNCT_RE = re.compile(r"[\s\x00]*\x00[\s\x00]*(?=[,.;:!?)\]’”]|$)")
_SOFT_RUN_RE = re.compile(r"[\s\x00]*\x00[\s\x00]*")
_WS_RE = re.compile(r"\s+")
_BOUNDARY_RE = re.compile(r"<(?:div|chapter)\b[^>]*>")
# leftover USFM character markers (the KJV module has "\\nd LORD") and 1611 pilcrows
_USFM_RE = re.compile(r"\\\+?[a-z]+\d*\*?\s?|¶\s?")
_OSIS_ID_RE = re.compile(r'osisID="([^"]*)"')
_SID_RE = re.compile(r"\ssID=")  # not the "sID=" inside "osisID="
_EID_RE = re.compile(r"\seID=")


def osis_to_text(fragment: str) -> str:
    """Plain text of one OSIS verse: drop notes and editorial titles, strip tags, unescape.

    Canonical titles (psalm superscriptions) are kept because they are part of the text.  The
    result is a single line: structure tags become single spaces, whitespace runs collapse.
    """
    s = _NOTE_RE.sub(_SOFT, fragment)
    s = _NONCANON_TITLE_RE.sub(_SOFT, s)
    s = _BLOCK_TAG_RE.sub(_SOFT, s)
    s = _ANY_TAG_RE.sub("", s)
    s = _USFM_RE.sub("", html.unescape(s))
    s = _SOFT_BEFORE_PUNCT_RE.sub("", s)
    s = _SOFT_RUN_RE.sub(" ", s)
    return _WS_RE.sub(" ", s).strip()


def _read_sword_conf(path: Path) -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            conf.setdefault(k.strip(), v.strip())
    return conf


def _ztext_entries(module_dir: Path, testament: str) -> Iterator[bytes]:
    """Raw OSIS bytes of every index entry of one testament, in index (= canonical) order."""
    bzs_p, bzv_p, bzz_p = (module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
    if not bzv_p.exists():
        return  # a module may lack a testament (NT-only translations)
    bzs, bzv, bzz = bzs_p.read_bytes(), bzv_p.read_bytes(), bzz_p.read_bytes()
    if len(bzs) % 12 or len(bzv) % 10:
        raise DataError(f"{bzs_p}: truncated zText index (sizes {len(bzs)}, {len(bzv)})")
    blocks = list(struct.iter_unpack("<III", bzs))
    index = list(struct.iter_unpack("<IIH", bzv))
    # The verse size is 16 bits, so osis2mod stores an entry of 64 KiB or more modulo 65536 (the
    # WEB's Greek Daniel, which its versification lumps into one entry, is 125 KB).  Entries sit
    # back to back in their block, so the true end is the next entry's start (or the block end).
    starts: dict[int, list[int]] = {}
    for block, off, size in index:
        if size:
            starts.setdefault(block, []).append(off)
    for offs in starts.values():
        offs.sort()
    cache: dict[int, bytes] = {}  # blocks are whole books: keep the current one decompressed
    for block, off, size in index:
        if size == 0:
            continue
        if block >= len(blocks):
            raise DataError(f"{bzv_p}: entry points at block {block} of {len(blocks)}")
        raw = cache.get(block)
        if raw is None:
            boff, bsize, ulen = blocks[block]
            try:
                raw = zlib.decompress(bzz[boff : boff + bsize])
            except zlib.error as e:
                raise DataError(f"{bzz_p}: block {block} is not a zlib stream ({e})") from None
            if len(raw) != ulen:
                raise DataError(f"{bzz_p}: block {block} inflates to {len(raw)} bytes, index says {ulen}")
            cache.clear()
            cache[block] = raw
        offs = starts[block]
        k = bisect.bisect_right(offs, off)
        end = offs[k] if k < len(offs) else len(raw)
        if end - off > size and (end - off - size) % 65536 == 0:
            size = end - off
        yield raw[off : off + size]


def read_ztext_module(module_dir: str | os.PathLike[str], encoding: str = "utf-8") -> list[tuple[str, str]]:
    """Read a SWORD zText module into ``[(book osisID, text with one verse per line), ...]``.

    Books are delimited by the OSIS book milestones ``<div type="book" sID=…/>`` …
    ``<div type="book" eID=…/>``.  Material before the first book (a preface) is returned as
    ``"front"``, material after a book's end and before the next book (an appendix such as the
    WEB glossary) as ``"back"``; names are made unique with a ``.2``, ``.3``… suffix.
    """
    module_dir = Path(module_dir)
    books: list[tuple[str, list[str]]] = [("front", [])]
    current = "front"  # the book being read, as seen by the boundary scan
    for testament in ("ot", "nt"):
        for raw in _ztext_entries(module_dir, testament):
            s = raw.decode(encoding, errors="replace")
            pieces: list[tuple[str | None, str]] = []  # (new document name or None, OSIS text)
            if 'type="book"' in s or "<chapter" in s:
                # split the entry at book boundaries so intros and appendices land correctly
                last = 0
                for m in _BOUNDARY_RE.finditer(s):
                    tag = m.group(0)
                    new: str | None = None
                    if tag.startswith("<div") and 'type="book"' in tag:
                        if _SID_RE.search(tag):
                            idm = _OSIS_ID_RE.search(tag)
                            new = idm.group(1) if idm else f"book{len(books)}"
                        elif _EID_RE.search(tag):
                            new = "back"
                    elif tag.startswith("<chapter") and _SID_RE.search(tag):
                        # a chapter of another book: that book's own milestone is missing
                        # (the WEB module lacks Hosea's), so start the book here
                        idm = _OSIS_ID_RE.search(tag)
                        book = idm.group(1).split(".")[0] if idm else None
                        if book and book != current:
                            new = book
                    if new is not None:
                        pieces += [(None, s[last : m.start()]), (new, "")]
                        last = m.end()
                        current = new
                pieces.append((None, s[last:]))
            else:
                pieces.append((None, s))
            for book, frag in pieces:
                if book is not None:
                    books.append((book, []))
                elif line := osis_to_text(frag):
                    books[-1][1].append(line)
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for name, lines in books:
        if lines:
            seen[name] = seen.get(name, 0) + 1
            out.append((name if seen[name] == 1 else f"{name}.{seen[name]}", "\n".join(lines)))
    return out


def _sword_module_dirs(root: Path) -> list[tuple[str, Path, str]]:
    """(module name, data dir, encoding) for every zText module in an unpacked sword-text package."""
    sword = root / "usr" / "share" / "sword"
    out = []
    for conf_p in sorted((sword / "mods.d").glob("*.conf")):
        conf = _read_sword_conf(conf_p)
        if conf.get("ModDrv", "").lower() != "ztext":
            continue
        data_dir = (sword / conf.get("DataPath", "")).resolve()
        enc = "latin-1" if conf.get("Encoding", "").lower() == "latin-1" else "utf-8"
        out.append((conf_p.stem, data_dir, enc))
    if not out:
        raise DataError(f"{sword / 'mods.d'}: no zText module configuration found")
    return out


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


# ------------------------------------------------------------------------------------------------
# Documents, corpora and the validation split
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """A unit of text (a book, a novel, a file, a JSONL record): never split across EOS."""

    name: str  # stable identifier; the validation split hashes it, so it must not change
    text: str
    source: str = ""


@dataclass
class Corpus:
    """Training and validation documents, plus statistics.

    ``train`` holds maximal runs of consecutive training chunks of each document (so training
    text stays as contiguous as the split allows); ``val`` holds the held-out chunks.
    """

    name: str
    train: list[Document]
    val: list[Document]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def train_text(self) -> str:
        return "\n\n".join(d.text for d in self.train)

    @property
    def val_text(self) -> str:
        return "\n\n".join(d.text for d in self.val)

    def fingerprint(self) -> str:
        """sha256 over names and texts of both splits: the token cache key."""
        h = hashlib.sha256(SPLIT_TAG.encode())
        for tag, docs in (("train", self.train), ("val", self.val)):
            h.update(f"\x01{tag}:{len(docs)}".encode())
            for d in docs:
                h.update(f"\x02{len(d.name)}:{d.name}\x03{len(d.text)}:".encode())
                h.update(d.text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def _chunk_bounds(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """Cut ``text`` into contiguous pieces of about ``chunk_chars`` characters, ending at a
    newline (else a space, else anywhere) so that no line is split when lines exist."""
    bounds = []
    pos, n = 0, len(text)
    while pos < n:
        if n - pos <= chunk_chars * 3 // 2:  # don't leave a tiny tail chunk
            end = n
        else:
            end = text.find("\n", pos + chunk_chars, pos + 2 * chunk_chars)
            if end == -1:
                end = text.rfind(" ", pos + chunk_chars // 2, pos + 2 * chunk_chars)
            end = pos + chunk_chars if end == -1 else end + 1
        bounds.append((pos, end))
        pos = end
    return bounds


def _chunk_uniform(name: str, j: int) -> float:
    """Deterministic uniform number in [0, 1) for chunk ``j`` of document ``name``."""
    digest = hashlib.sha256(f"{name}\x00{j}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Sequence[Document],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    chunk_chars: int | None = None,
    name: str = "corpus",
    where: str = "",
) -> Corpus:
    """Apply the fixed validation split (see module docstring) and return a ``Corpus``.

    ``chunk_chars`` defaults to ``CHUNK_CHARS``, shrunk (down to 256) for small corpora so that
    there are about 40 chunks to choose from.  If no chunk falls under ``val_fraction`` the one
    with the smallest hash is held out, so a non-empty validation split always exists.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = [d for d in docs if d.text]
    total = sum(len(d.text) for d in docs)
    where = where or name
    if total == 0:
        raise DataError(f"{where}: no text found (empty corpus)")
    if chunk_chars is None:
        chunk_chars = max(256, min(CHUNK_CHARS, total // 40))
    train: list[Document] = []
    val: list[Document] = []
    best: tuple[float, int, int] | None = None  # (u, doc index, chunk index) of the smallest u
    per_doc: list[list[tuple[int, int, bool]]] = []
    for di, d in enumerate(docs):
        chunks = []
        for j, (a, b) in enumerate(_chunk_bounds(d.text, chunk_chars)):
            u = _chunk_uniform(d.name, j)
            chunks.append((a, b, u < val_fraction))
            if best is None or u < best[0]:
                best = (u, di, j)
        per_doc.append(chunks)
    n_chunks = sum(len(c) for c in per_doc)
    if val_fraction > 0 and not any(v for c in per_doc for _, _, v in c):
        if n_chunks < 2:
            raise DataError(
                f"{where}: corpus too small ({total} characters) to hold out a validation split; "
                "pass val_fraction=0 or more text"
            )
        assert best is not None
        a, b, _ = per_doc[best[1]][best[2]]
        per_doc[best[1]][best[2]] = (a, b, True)
    for d, chunks in zip(docs, per_doc):
        run_start = None
        part = 0
        for j, (a, b, is_val) in enumerate(chunks):
            if is_val:
                if run_start is not None:
                    train.append(Document(f"{d.name}#{part}", d.text[run_start:a], d.source))
                    part += 1
                    run_start = None
                val.append(Document(f"{d.name}@{j}", d.text[a:b], d.source))
            elif run_start is None:
                run_start = a
        if run_start is not None:
            train.append(Document(f"{d.name}#{part}" if part else d.name, d.text[run_start:], d.source))
    sources: dict[str, int] = {}
    for d in docs:
        sources[d.source or name] = sources.get(d.source or name, 0) + len(d.text)
    stats = {
        "sources_chars": sources,
        "documents": len(docs),
        "chunks": n_chunks,
        "chunk_chars": chunk_chars,
        "val_fraction": val_fraction,
        "train_chars": sum(len(d.text) for d in train),
        "val_chars": sum(len(d.text) for d in val),
        "train_pieces": len(train),
        "val_pieces": len(val),
    }
    return Corpus(name, train, val, stats)


# ------------------------------------------------------------------------------------------------
# Named Debian sources
# ------------------------------------------------------------------------------------------------

_BLANK_RUNS_RE = re.compile(r"\n{4,}")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")
_OVERSTRIKE_RE = re.compile(r"[^\n]\x08")


def _tidy(text: str) -> str:
    """Normalise packaged text: LF line ends, no BOM or trailing blanks, at most 2 blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    text = _TRAILING_WS_RE.sub("\n", text + "\n")
    return _BLANK_RUNS_RE.sub("\n\n\n", text).strip("\n")


def _decode_text_file(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old fortune files are Latin-1


def _strip_gutenberg(text: str) -> str:
    """Keep what lies between Project Gutenberg's ``*** START OF`` and ``*** END OF`` lines."""
    start = re.search(r"^\*\*\* ?START OF [^\n]*\n", text, re.M)
    end = re.search(r"^(?:End of (?:the )?Project Gutenberg[^\n]*\n\s*)?\*\*\* ?END OF ", text, re.M)
    if start and end and end.start() > start.end():
        return text[start.end() : end.start()]
    return text


def _read_sword_source(root: Path, source: str) -> list[Document]:
    docs = []
    for _module, data_dir, enc in _sword_module_dirs(root):
        for book, text in read_ztext_module(data_dir, enc):
            docs.append(Document(f"{source}/{book}", text, source))
    return docs


def _r_strings(obj: Any, where: str) -> list[str]:
    if not isinstance(obj, RVector) or obj.rtype != _STRSXP:
        raise DataError(f"{where}: expected a character vector")
    return ["" if s is None else s for s in obj]


def _read_austen(root: Path, source: str) -> list[Document]:
    prefix = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    objs = read_r_lazyload(prefix)
    # one character vector per novel, one element per printed line
    return [
        Document(f"{source}/{k}", _tidy("\n".join(_r_strings(v, f"{prefix}.rdb[{k}]"))), source)
        for k, v in objs.items()
    ]


def _read_mobydick(root: Path, source: str) -> list[Document]:
    prefix = root / "usr/lib/R/site-library/tokenizers/data/Rdata"
    obj = read_r_lazyload(prefix, ["mobydick"])["mobydick"]
    text = "\n".join(_r_strings(obj, f"{prefix}.rdb[mobydick]"))  # a single CRLF string
    text = _strip_gutenberg(_tidy(text))
    return [Document(f"{source}/mobydick", _tidy(text), source)]


def _read_fortunes(root: Path, source: str) -> list[Document]:
    d = root / "usr/share/games/fortunes"
    docs = []
    for p in sorted(d.iterdir()):
        # skip strfile indexes, the .u8 symlinks, and ascii-art (pictures, not language)
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8") or p.name == "ascii-art":
            continue
        text = _OVERSTRIKE_RE.sub("", _decode_text_file(p.read_bytes()))
        items = [_tidy(it) for it in re.split(r"^%\n", text.replace("\r\n", "\n"), flags=re.M)]
        docs.append(Document(f"{source}/{p.name}", "\n\n".join(it for it in items if it), source))
    return docs


def _read_jargon(root: Path, source: str) -> list[Document]:
    p = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    return [Document(f"{source}/jargon", _tidy(_decode_text_file(gzip.decompress(p.read_bytes()))), source)]


@dataclass(frozen=True)
class Source:
    """A named corpus source: a Debian package and the reader that turns it into documents."""

    package: str
    reader: Callable[[Path, str], list[Document]]
    description: str


SOURCES: dict[str, Source] = {
    "web": Source(
        "sword-text-web", _read_sword_source, "World English Bible (with deuterocanon), public domain"
    ),
    "austen": Source("r-cran-janeaustenr", _read_austen, "Jane Austen's six novels"),
    "mobydick": Source("r-cran-tokenizers", _read_mobydick, "Melville's Moby-Dick"),
    "kjv": Source("sword-text-kjv", _read_sword_source, "King James Version Bible"),
    "fortunes": Source("fortunes", _read_fortunes, "fortune-mod quotations"),
    "jargon": Source("jargon-text", _read_jargon, "The Jargon File 4.4.7"),
}
DEFAULT_SOURCES = ("web", "austen", "mobydick")
_PACKAGE_ALIASES = {s.package: k for k, s in SOURCES.items()}


def _source_documents(name: str, cache_dir: str | os.PathLike[str] | None) -> list[Document]:
    """Documents of one named source.  Parsing is fast (~1 s for the default corpus), so only the
    unpacked package is cached, never the parsed text: reader fixes can't go stale."""
    src = SOURCES[name]
    root = fetch_debian_package(src.package, cache_dir)
    docs = [d for d in src.reader(root, name) if d.text]
    if not docs:
        raise DataError(f"{root}: package {src.package} yielded no text")
    return docs


def load_corpus(
    name: str = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Corpus:
    """Load a corpus built from named Debian sources: ``"default"`` (= web+austen+mobydick), a
    source name from ``SOURCES`` (or its Debian package name), or a ``+`` list such as
    ``"default+kjv+fortunes"``.  Documents come in a fixed order; the split is fixed."""
    names: list[str] = []
    for part in name.split("+"):
        part = part.strip()
        part = _PACKAGE_ALIASES.get(part, part)
        expanded = list(DEFAULT_SOURCES) if part == "default" else [part]
        for n in expanded:
            if n not in SOURCES:
                raise DataError(f"unknown corpus source {n!r}; choose from default, {', '.join(SOURCES)}")
            if n not in names:
                names.append(n)
    docs: list[Document] = []
    for n in _progress(names, desc="corpus sources", unit="src"):
        docs.extend(_source_documents(n, cache_dir))
    # fixed split granularity for named corpora: independent of which sources are combined
    return split_documents(docs, val_fraction, chunk_chars=CHUNK_CHARS, name=name)


# ------------------------------------------------------------------------------------------------
# Local files and Hugging Face datasets
# ------------------------------------------------------------------------------------------------


def _read_text_path(p: Path, encoding: str = "utf-8") -> str:
    try:
        return p.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid {encoding} text (byte {e.start})") from None


def _jsonl_documents(p: Path, text_field: str) -> list[Document]:
    opener = gzip.open if p.suffix == ".gz" else open
    docs = []
    with opener(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or text_field not in rec:
                raise DataError(f"{p}:{lineno}: record has no field {text_field!r}")
            text = rec[text_field]
            if not isinstance(text, str):
                raise DataError(f"{p}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            docs.append(Document(f"{p.name}:{lineno}", text, p.name))
    return docs


def _parquet_documents(p: Path, text_field: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{p}: reading .parquet needs pyarrow; `pip install pyarrow` (or bitlm[datasets])"
        ) from None
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DataError(f"{p}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{p}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    docs = []
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{p}: column {text_field!r} row {row} is {type(text).__name__}, not a string"
                )
            docs.append(Document(f"{p.name}:{row}", text or "", p.name))
            row += 1
    return docs


def _hf_documents(spec: str, text_field: str, hf_kwargs: dict[str, Any] | None) -> list[Document]:
    rest = spec[3:]
    if not rest:
        raise DataError("hf: spec needs a dataset name, e.g. hf:roneneldan/TinyStories")
    name, _, config = rest.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec}: Hugging Face datasets are read with `datasets`; `pip install datasets`"
        ) from None
    kwargs = {"split": "train", **(hf_kwargs or {})}
    try:
        ds = datasets.load_dataset(name, config or None, **kwargs)
    except Exception as e:  # hub, network and builder errors come in many classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{spec}: datasets.load_dataset failed: {first}") from e
    if isinstance(ds, dict):  # split=None gives a DatasetDict: use every split in order
        parts = [ds[k] for k in ds]
    else:
        parts = [ds]
    docs = []
    for part in parts:
        if text_field not in part.column_names:
            raise DataError(f"{spec}: no field {text_field!r} (fields: {', '.join(part.column_names)})")
        for text in part[text_field]:
            docs.append(Document(f"{name}:{len(docs)}", text or "", spec))
    return docs


def load_text_source(
    spec: str = "default",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    hf_kwargs: dict[str, Any] | None = None,
) -> Corpus:
    """One entry for every text source; returns a split ``Corpus``.

    ``spec``: ``"default"`` / source names (see ``load_corpus``); a path to a ``.txt`` file (one
    document), a directory (every ``*.txt`` below it, sorted, one document each), a ``.jsonl`` or
    ``.jsonl.gz`` file (field ``text_field`` of each record), a ``.parquet`` file (column
    ``text_field`` of each row); or ``"hf:name[:config]"`` for ``datasets.load_dataset(name,
    config, split="train", **hf_kwargs)``, the only path that may touch the network.
    """
    if spec.startswith("hf:"):
        return split_documents(_hf_documents(spec, text_field, hf_kwargs), val_fraction, name=spec)
    p = Path(spec).expanduser()
    if not p.exists():
        first = _PACKAGE_ALIASES.get(spec.split("+")[0], spec.split("+")[0])
        if first == "default" or first in SOURCES:
            return load_corpus(spec, cache_dir, val_fraction)
        raise DataError(
            f"{spec}: no such file, directory or corpus name (names: default, {', '.join(SOURCES)})"
        )
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"{p}: directory holds no .txt files")
        docs = [Document(str(f.relative_to(p)), _read_text_path(f), p.name) for f in files]
    elif p.name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        docs = _jsonl_documents(p, text_field)
    elif p.suffix == ".parquet":
        docs = _parquet_documents(p, text_field)
    else:
        docs = [Document(p.name, _read_text_path(p), p.name)]
    return split_documents(docs, val_fraction, name=p.name, where=str(p))


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte↔unicode table (char → byte) that byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 and up."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ids bitlm needs.

    ``encode`` treats text as text: it adds no special tokens, and a literal ``<|endoftext|>`` in
    the input is encoded as ordinary bytes (``backend.encode_special_tokens = True``), so data can
    never forge document boundaries.  Special ids are inserted by id (``eos_id``), never by text.
    ``decode`` keeps special tokens, so for byte-level BPE ``decode(encode(s)) == s`` for every
    string ``s``, and ``count_token_bytes(encode(s)) == utf8_len(s)``.

    ``add_bos`` says whether the tokenizer's own configuration puts a BOS in front of a text (a
    Llama-3 / 2B4T ``tokenizer.json`` post-processor ``<|begin_of_text|> $A``, or a GGUF's
    ``tokenizer.ggml.add_bos_token``).  ``encode(text, add_special_tokens=True)`` then prepends
    ``bos_id`` once; a leading literal BOS text (a chat template's ``{{ bos_token }}``) is that BOS,
    never a second one.  bitlm's own tokenizers configure none, so for them it is plain ``encode``.
    """

    def __init__(
        self,
        backend: Any,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool | None = None,
    ):
        self.backend = backend
        if hasattr(backend, "encode_special_tokens"):  # tokenizers >= 0.19
            backend.encode_special_tokens = True
        eos_token = eos_token or self._find_special(
            (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
        )
        if eos_token is None or backend.token_to_id(eos_token) is None:
            raise DataError("tokenizer has no end-of-text token (looked for <|endoftext|>, </s>, <eos> ...)")
        self.eos_token = eos_token
        self.eos_id: int = backend.token_to_id(eos_token)
        bos = bos_token if bos_token and backend.token_to_id(bos_token) is not None else eos_token
        self.bos_token = bos
        self.bos_id: int = backend.token_to_id(bos)
        pad = pad_token or self._find_special((PAD_TOKEN, "<pad>", "[PAD]"))
        self.pad_token = pad
        self.pad_id: int | None = backend.token_to_id(pad) if pad else None
        self._token_bytes: np.ndarray | None = None
        # tokenizer.json's post-processor decides, as in transformers' fast tokenizers: the tokens
        # it puts in front of a probe text (Llama-3: <|begin_of_text|>) are what it adds to every text
        lead: list[int] = []
        if backend.post_processor is not None:
            bare, full = (backend.encode("a", add_special_tokens=f).ids for f in (False, True))
            lead = next((full[:k] for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), [])
        if lead and not (bos_token and backend.token_to_id(bos_token) is not None):
            self.bos_id, self.bos_token = lead[0], backend.id_to_token(lead[0])  # BOS named only there
        self.add_bos: bool = bool(lead[:1] == [self.bos_id]) if add_bos is None else bool(add_bos)

    def _find_special(self, names: Sequence[str]) -> str | None:
        for n in names:
            if self.backend.token_to_id(n) is not None:
                return n
        return None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` a leading BOS where ``add_bos`` says so."""
        if not (add_special_tokens and self.add_bos):
            return self.backend.encode(text, add_special_tokens=False).ids
        if text.startswith(self.bos_token):  # the text brings its own BOS (a chat template's)
            text = text[len(self.bos_token) :]
        return [self.bos_id, *self.backend.encode(text, add_special_tokens=False).ids]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

    def hash(self) -> str:
        """sha256 of the serialised tokenizer: identifies it in token-cache keys."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` (``path`` ending in .json) or a folder that Hugging Face
        ``AutoTokenizer.from_pretrained`` can read (tokenizer.json + tokenizer_config.json)."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_bytes(path, self.backend.to_str(pretty=True).encode("utf-8"))
            return path
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "add_bos_token": self.add_bos,  # what tokenizer.json's post-processor does
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        atomic_write_bytes(path / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
        # tokenizer.json last: its presence is what marks a cached folder complete
        atomic_write_bytes(path / "tokenizer.json", self.backend.to_str(pretty=True).encode("utf-8"))
        return path

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of every token id (0 for special tokens); cached."""
        if self._token_bytes is None:
            self._token_bytes = _compute_token_bytes(self)
        return self._token_bytes

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


def _compute_token_bytes(tok: Tokenizer) -> np.ndarray:
    backend = tok.backend
    n = tok.vocab_size
    out = np.zeros(n, dtype=np.int32)
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    alphabet = _byte_level_alphabet()
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i >= n or token in special:
            continue
        if all(c in alphabet for c in token):  # byte-level vocabulary: one char per byte
            out[i] = len(token)
        else:  # other models (WordPiece, Metaspace): measure the decoded piece
            out[i] = len(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def _train_bpe(texts: Iterable[str], vocab_size: int, total: int | None = None) -> Any:
    """Train a GPT-2-style byte-level BPE: ByteLevel pre-tokenizer (GPT-2 split regex, no prefix
    space), all 256 byte symbols in the initial alphabet so every string is encodable."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=total)
    return tok


def train_tokenizer(
    corpus: Corpus | Sequence[str],
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike[str] | None = None,
    max_chars: int | None = None,
) -> Tokenizer:
    """Train (or load from cache) a byte-level BPE on the corpus' *training* split.

    Cache key: sha256 of (training text, vocab size, ``TOKENIZER_TAG``, ``max_chars``).  Training
    on all of the default corpus (9.8 M characters) takes ~1.2 s at vocab 4096 and ~2-3 s at
    8192 on 2 cores (tokenizers 0.23), so by default everything is used.  ``max_chars`` caps it for big corpora
    with a deterministic subsample: the leading ``max_chars/total`` share of every 64 KiB block
    of every document, so all documents and all parts of them are represented.
    """
    if vocab_size < 256 + 2:
        raise DataError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    texts = [d.text for d in corpus.train] if isinstance(corpus, Corpus) else list(corpus)
    total_chars = sum(len(t) for t in texts)
    if total_chars == 0:
        raise DataError("cannot train a tokenizer on empty text")
    if max_chars is not None and total_chars > max_chars:
        block = 65536
        take = max(1, block * max_chars // total_chars)
        texts = [t[i : i + take] for t in texts for i in range(0, len(t), block)]
    h = hashlib.sha256(f"{TOKENIZER_TAG}\x00{vocab_size}\x00{max_chars}\x00{len(texts)}".encode())
    for t in texts:
        h.update(f"\x01{len(t)}:".encode())
        h.update(t.encode("utf-8", "surrogatepass"))
    folder = cache_root(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{h.hexdigest()[:20]}"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    backend = _train_bpe(texts, vocab_size, total=len(texts))
    tok = Tokenizer(backend, EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    tok.save(folder)
    return tok


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or a folder holding one (Hugging Face layout; the
    ``eos_token``/``bos_token``/``pad_token`` of its ``tokenizer_config.json`` are honoured)."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path).expanduser()
    cfg: dict[str, Any] = {}
    if p.is_dir():
        cfg_p = p / "tokenizer_config.json"
        if cfg_p.is_file():
            try:
                cfg = json.loads(cfg_p.read_text(encoding="utf-8"))
            except ValueError as e:
                raise DataError(f"{cfg_p}: invalid JSON ({e})") from None
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"{p}: tokenizer file not found (need a tokenizer.json or a folder holding one)")
    try:
        backend = HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(
            f"{p}: not a tokenizers JSON file ({str(e).splitlines()[0] if str(e) else e})"
        ) from None

    def tok_name(key: str) -> str | None:
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    return Tokenizer(backend, tok_name("eos_token"), tok_name("bos_token"), tok_name("pad_token"))


# ------------------------------------------------------------------------------------------------
# Token cache (memory-mapped .npy)
# ------------------------------------------------------------------------------------------------


def _token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any]]:
    return np.uint16 if vocab_size <= 65535 else np.uint32


def _encode_docs(docs: Sequence[Document], tok: Tokenizer, dtype: Any, desc: str) -> np.ndarray:
    """EOS d1 EOS d2 ... EOS dn EOS, as one array."""
    pieces: list[np.ndarray] = [np.array([tok.eos_id], dtype=dtype)]
    eos = np.array([tok.eos_id], dtype=dtype)
    step = 64  # encode_batch parallelises across documents; batches keep the progress bar alive
    for i in _progress(range(0, len(docs), step), desc=desc, unit="batch"):
        for ids in tok.encode_batch([d.text for d in docs[i : i + step]]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(eos)
    return np.concatenate(pieces)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(path, write)


def tokenize_corpus(
    corpus: Corpus, tok: Tokenizer, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays (train, val) for a corpus, memory-mapped from the cache (built on a miss).

    Key: sha256 of (corpus fingerprint, tokenizer hash); files ``train.npy``, ``val.npy`` and
    ``meta.json`` (written last: its presence marks a complete entry).
    """
    key = hashlib.sha256(f"{corpus.fingerprint()}:{tok.hash()}".encode()).hexdigest()[:24]
    d = cache_root(cache_dir) / "tokens" / key
    meta_p = d / "meta.json"
    if not meta_p.is_file():
        d.mkdir(parents=True, exist_ok=True)
        dtype = _token_dtype(tok.vocab_size)
        counts = {}
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            arr = _encode_docs(docs, tok, dtype, f"tokenize {split}")
            _save_npy_atomic(d / f"{split}.npy", arr)
            counts[split] = int(arr.size)
        meta = {
            "corpus": corpus.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": np.dtype(dtype).name,
            "tokens": counts,
            "chars": {"train": corpus.stats.get("train_chars"), "val": corpus.stats.get("val_chars")},
        }
        atomic_write_bytes(meta_p, (json.dumps(meta, indent=2) + "\n").encode())
    return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy", mmap_mode="r")


@dataclass
class TokenData:
    """Everything training and evaluation need: token arrays, tokenizer, corpus statistics."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    stats: dict[str, Any]

    def batch(
        self, step: int, batch_size: int, block_size: int, seed: int = 0, rank: int = 0, device: Any = None
    ):
        """Training batch ``step`` (see ``get_batch``)."""
        return get_batch(self.train, batch_size, block_size, seed=seed, step=step, rank=rank, device=device)

    def val_batches(
        self, batch_size: int, block_size: int, max_batches: int | None = None, device: Any = None
    ):
        """Sequential validation batches (see ``iter_eval_batches``)."""
        return iter_eval_batches(self.val, batch_size, block_size, max_batches=max_batches, device=device)


def prepare_data(
    source: str = "default",
    *,
    vocab_size: int = 8192,
    tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    text_field: str = "text",
    hf_kwargs: dict[str, Any] | None = None,
) -> TokenData:
    """Load ``source``, train (or load) the tokenizer, and return cached token arrays."""
    corpus = load_text_source(
        source, val_fraction, cache_dir=cache_dir, text_field=text_field, hf_kwargs=hf_kwargs
    )
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_tokenizer(corpus, vocab_size, cache_dir)
    train, val = tokenize_corpus(corpus, tok, cache_dir)
    stats = {
        **corpus.stats,
        "corpus": corpus.name,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
    }
    return TokenData(train, val, tok, stats)


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------

_BATCH_SALT = 0xB17_1A  # separates this RNG stream from any other use of (seed, step)


def _to_torch(x: np.ndarray, device: Any) -> torch.Tensor:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
    return t.to(device) if device is not None else t


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    *,
    seed: int,
    step: int,
    rank: int = 0,
    device: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows ``(x, y)``, each ``(batch_size, block_size)`` int64, ``y`` = ``x``
    shifted by one.  The window starts depend on (seed, step, rank) only: no iterator state, so
    resuming at ``step`` reproduces the batches of an uninterrupted run exactly (for a given
    numpy version, whose PCG64 + SeedSequence streams are the source of randomness)."""
    n = int(tokens.shape[0])
    if n < block_size + 1:
        raise DataError(f"token array has {n} tokens, fewer than block_size + 1 = {block_size + 1}")
    if step < 0 or rank < 0:
        raise DataError(f"step and rank must be non-negative (got step={step}, rank={rank})")
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, step, rank, _BATCH_SALT]))
    starts = rng.integers(0, n - block_size, size=batch_size, dtype=np.int64)
    idx = starts[:, None] + np.arange(block_size + 1, dtype=np.int64)  # (B, T+1)
    win = np.asarray(tokens[idx], dtype=np.int64)
    return _to_torch(win[:, :-1], device), _to_torch(win[:, 1:], device)


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    *,
    max_batches: int | None = None,
    device: Any = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over ``tokens`` in order: window ``i`` predicts tokens
    ``i*T+1 .. i*T+T`` from ``i*T .. i*T+T-1``.  The final partial window (< T targets) is dropped;
    the last batch may hold fewer than ``batch_size`` windows."""
    n = int(tokens.shape[0])
    n_windows = (n - 1) // block_size
    if n_windows == 0:
        raise DataError(f"validation has {n} tokens, fewer than block_size + 1 = {block_size + 1}")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for b0 in range(0, n_windows, batch_size):
        b1 = min(b0 + batch_size, n_windows)
        win = np.asarray(tokens[b0 * block_size : b1 * block_size + 1], dtype=np.int64)
        x = win[:-1].reshape(b1 - b0, block_size)  # (B, T)
        y = win[1:].reshape(b1 - b0, block_size)
        yield _to_torch(x, device), _to_torch(y, device)


# ------------------------------------------------------------------------------------------------
# Bits per byte
# ------------------------------------------------------------------------------------------------


def utf8_len(text: str) -> int:
    """Number of UTF-8 bytes of ``text``."""
    return len(text.encode("utf-8", "surrogatepass"))


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id, 0 for special tokens (EOS/PAD contribute no bytes)."""
    return tok.token_bytes()


def count_token_bytes(tokens: Any, tok: Tokenizer) -> int:
    """UTF-8 bytes that a token range stands for (byte-level BPE: exactly ``utf8_len(decode)``
    minus the special tokens).  ``tokens`` may be a list, numpy array or torch tensor."""
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens, dtype=np.int64)
    return int(tok.token_bytes()[ids].sum())


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """bpb = total NLL in nats / (ln 2 · bytes)."""
    if n_bytes <= 0:
        raise DataError("bits_per_byte needs a positive byte count")
    return float(total_nll_nats) / (math.log(2) * n_bytes)
