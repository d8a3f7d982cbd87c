"""Documents and corpora: the named Debian sources, local files, Hugging Face datasets, and the
fixed validation split.

* ``load_text_source(spec)`` takes ``"default"`` (real English text from Debian packages), a named
  Debian source or a ``+`` combination of them (``"default+kjv"``), a local ``.txt`` file or
  directory of ``.txt`` files, a ``.jsonl[.gz]`` file (field ``text`` by default), a ``.parquet``
  file (column ``text``, needs pyarrow), or ``"hf:name[:config]"`` (Hugging Face
  ``datasets.load_dataset``, only when asked for explicitly).
* **The fixed validation split.**  Every document is cut into chunks of about ``CHUNK_CHARS``
  characters at line ends; chunk *j* of document *name* is held out iff
  ``sha256(f"{name}\\0{j}")`` read as a fraction in [0, 1) is below ``val_fraction`` (default 3 %).
  The rule depends only on the text and the document names, so it never changes between runs,
  and validation text is spread over every source (same register as training text).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import DataError, progress
from .fetch import fetch_debian_package
from .rdata import _STRSXP, RVector, read_r_lazyload
from .sword import _sword_module_dirs, read_ztext_module

# Bump when the corpus readers' output changes, so cached token arrays are not reused wrongly
# (the token-cache key hashes the text itself, so this is belt and braces for the split rule).
SPLIT_TAG = "bitlm-split-v1"

CHUNK_CHARS = 8192  # validation-split granularity (~2k tokens, longer than typical eval windows)
DEFAULT_VAL_FRACTION = 0.03


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
    for n in progress(names, desc="corpus sources", unit="src"):
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
            f"{p}: reading .parquet needs the optional package 'pyarrow', which is not installed: "
            "pip install 'bitlm[datasets]'"
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
            f"{spec}: Hugging Face datasets need the optional package 'datasets', which is not installed: "
            "pip install 'bitlm[datasets]' (or pip install datasets)"
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
