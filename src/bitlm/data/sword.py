"""SWORD zText modules (``sword-text-web``, ``sword-text-kjv``), stdlib only.

``{ot,nt}.bzs`` holds 12-byte ``<III`` records (offset, size, uncompressed size) of zlib blocks in
``{ot,nt}.bzz``; ``{ot,nt}.bzv`` holds 10-byte ``<IIH`` records (block, offset, size) of one verse
inside the decompressed block.  Verse text is OSIS XML: ``<note>`` and non-canonical ``<title>``
elements are dropped, other tags stripped, entities unescaped (``osis_to_text``).  One verse per
line; a document per book (books are found from the OSIS ``<div type="book" sID=…>`` markers, so
no versification table is needed).
"""

from __future__ import annotations

import bisect
import html
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from .common import DataError

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
