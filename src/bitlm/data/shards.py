"""Token shards: a corpus tokenized once into fixed-size files that training memory-maps.

``bitlm data prepare --data SRC --out DIR`` writes (one atomic folder, ``bitlm.io.atomic``):

    DIR/index.json       {"format": "bitlm-shards", "version": 1, "dtype": "uint16" | "uint32",
                          "vocab_size", "eos_id", "shard_tokens", "source",
                          "splits": {"train": [{"file", "tokens", "sha256"}...], "val": [...]},
                          "tokens": {"train": n, "val": n}, "content_sha256": "sha256:..."}
    DIR/train_00000.bin  raw little-endian tokens, ``shard_tokens`` each (the last one shorter)
    DIR/val_00000.bin
    DIR/tokenizer.json

The token layout is the token cache's (``bitlm.data.tokens``): ``EOS d1 EOS d2 … EOS dn EOS``,
uint16 when the vocabulary fits, else uint32; the train / val split is the corpus's fixed one.
``content_sha256`` hashes the dtype and every split's tokens in order (not file names or the
shard size), so two preparations of the same text with the same tokenizer agree.

Training (``--data DIR``) opens ``ShardData``: every shard is memory-mapped, nothing is read
until a batch needs it.  A step's global batch is drawn as ``streams`` data streams (world size ×
grad_accum; rank r's micro-batch m is stream r·grad_accum + m) and stream s draws its windows
only from its own contiguous slice s of the training tokens, so each rank reads only its slice
and one process with grad_accum k sees exactly the batches of k ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_dir
from .common import DataError, progress

FORMAT = "bitlm-shards"
VERSION = 1
INDEX = "index.json"
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MiB of uint16 per file

__all__ = ["prepare_shards", "ShardData", "is_shard_dir", "load_shards", "FORMAT"]


def is_shard_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / INDEX).is_file()


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: Any, shard_tokens: int, content: Any) -> None:
        self.folder, self.split, self.dtype, self.size = folder, split, np.dtype(dtype), shard_tokens
        self.content = content
        self.buf: list[np.ndarray] = []
        self.fill = 0
        self.files: list[dict[str, Any]] = []

    def add(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr, dtype=self.dtype)
        while arr.size:
            take = min(arr.size, self.size - self.fill)
            self.buf.append(arr[:take])
            self.fill += take
            arr = arr[take:]
            if self.fill == self.size:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        data = np.concatenate(self.buf).astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        name = f"{self.split}_{len(self.files):05d}.bin"
        tmp = self.folder  # the temp folder of prepare_shards' atomic_dir: visible only when complete
        (tmp / name).write_bytes(data)
        self.content.update(data)
        self.files.append({"file": name, "tokens": self.fill, "sha256": "sha256:" + hashlib.sha256(data).hexdigest()})
        self.buf, self.fill = [], 0

    @property
    def tokens(self) -> int:
        return sum(f["tokens"] for f in self.files)


def prepare_shards(source: str, out: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None,
                   vocab_size: int = 8192, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   cache_dir: str | os.PathLike[str] | None = None, text_field: str = "text") -> dict[str, Any]:
    """Tokenize ``source`` (any ``--data`` spec) once into shards under ``out``; returns the index."""
    from .corpus import DEFAULT_VAL_FRACTION, load_text_source
    from .tokenizer import load_tokenizer, train_tokenizer
    from .tokens import _token_dtype

    if shard_tokens < 1024:
        raise DataError(f"--shard-tokens must be >= 1024, got {shard_tokens}")
    corpus = load_text_source(source, DEFAULT_VAL_FRACTION, cache_dir=cache_dir, text_field=text_field)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else train_tokenizer(corpus, vocab_size, cache_dir)
    dtype = np.dtype(_token_dtype(tok.vocab_size))
    content = hashlib.sha256(f"{FORMAT}:{dtype.name}".encode())
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                             "eos_id": tok.eos_id, "shard_tokens": shard_tokens, "source": source, "splits": {},
                             "tokens": {}, "corpus": corpus.name}
    with atomic_dir(out) as tmp:
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            content.update(f":{split}:".encode())
            w = _ShardWriter(tmp, split, dtype, shard_tokens, content)
            eos = np.array([tok.eos_id], dtype=dtype)
            w.add(eos)
            step = 64  # encode_batch parallelises across documents; batches keep the bar moving
            for i in progress(range(0, len(docs), step), desc=f"tokenize {split}", unit="batch"):
                for ids in tok.encode_batch([d.text for d in docs[i : i + step]]):
                    w.add(np.asarray(ids, dtype=dtype))
                    w.add(eos)
            w.flush()
            index["splits"][split] = w.files
            index["tokens"][split] = w.tokens
        index["content_sha256"] = "sha256:" + content.hexdigest()
        tok.save(tmp / "tokenizer.json")
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


class _Concat:
    """Read-only views over a list of memory-mapped shards as one token sequence."""

    def __init__(self, maps: list[np.ndarray]) -> None:
        self.maps = maps
        self.offsets = np.cumsum([0] + [m.shape[0] for m in maps])
        self.n = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, need = [], length
        while need > 0:
            m = self.maps[i]
            lo = start - int(self.offsets[i])
            piece = m[lo : lo + need]
            pieces.append(piece)
            need -= piece.shape[0]
            start += piece.shape[0]
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class ShardData:
    """``TokenData``'s interface over a shard folder (``batch``, ``val_batches``, ``tokenizer``)."""

    def __init__(self, folder: str | os.PathLike[str], streams: int = 1) -> None:
        from .tokenizer import load_tokenizer

        self.folder = Path(folder)
        f = self.folder / INDEX
        try:
            idx = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{f}: cannot read the shard index ({e})") from None
        if not isinstance(idx, dict) or idx.get("format") != FORMAT or idx.get("version") != VERSION:
            raise DataError(f"{f}: not a bitlm shard index (format {FORMAT} version {VERSION})")
        self.index = idx
        dtype = np.dtype(idx["dtype"]).newbyteorder("<")
        splits = {}
        for split in ("train", "val"):
            maps = []
            for entry in idx["splits"].get(split, []):
                p = self.folder / entry["file"]
                if not p.is_file():
                    raise DataError(f"{p}: missing (listed in {f})")
                if p.stat().st_size != entry["tokens"] * dtype.itemsize:
                    raise DataError(f"{p}: {p.stat().st_size} bytes, expected {entry['tokens'] * dtype.itemsize} "
                                    f"({entry['tokens']} {dtype.name} tokens, {f}); prepare the shards again")
                maps.append(np.memmap(p, dtype=dtype, mode="r"))
            if not maps:
                raise DataError(f"{f}: no {split} shards")
            splits[split] = _Concat(maps)
        self._train, self._val_parts = splits["train"], splits["val"]
        self.tokenizer = load_tokenizer(self.folder / "tokenizer.json")
        self.stats = {"corpus": idx.get("corpus"), "train_tokens": self._train.n, "val_tokens": self._val_parts.n,
                      "content_sha256": idx.get("content_sha256")}
        self.streams = streams

    @property
    def val(self) -> np.ndarray:
        return np.concatenate(self._val_parts.maps) if len(self._val_parts.maps) > 1 else self._val_parts.maps[0]

    def verify(self) -> None:
        """Check every shard's SHA-256 against the index (reads every byte)."""
        for split in ("train", "val"):
            for entry in self.index["splits"][split]:
                p = self.folder / entry["file"]
                h = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
                if h != entry["sha256"]:
                    raise DataError(f"{p}: corrupt (SHA-256 differs from {self.folder / INDEX}); prepare the shards again")

    def slice_of(self, stream: int, block_size: int) -> tuple[int, int]:
        """[lo, hi) token range of data stream ``stream`` (its window starts lie in [lo, hi - T - 1])."""
        n, s = self._train.n, self.streams
        if stream >= s:
            raise DataError(f"data stream {stream} of {s}: set ShardData.streams to world size × grad_accum")
        lo, hi = stream * n // s, (stream + 1) * n // s
        if hi - lo < block_size + 1:
            raise DataError(f"{self.folder}: {n} training tokens are too few for {s} data streams of "
                            f"{block_size + 1}-token windows")
        return lo, hi

    def batch(self, step: int, batch_size: int, block_size: int, seed: int = 0, rank: int = 0, device: Any = None):
        """Training batch ``step`` of data stream ``rank``: random windows of its slice, drawn from
        an RNG seeded by (seed, step, stream) alone (bit-identical resume)."""
        from .tokens import _BATCH_SALT, _to_torch

        lo, hi = self.slice_of(rank, block_size)
        rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, step, rank, _BATCH_SALT]))
        starts = lo + rng.integers(0, hi - lo - block_size, size=batch_size, dtype=np.int64)
        win = np.stack([np.asarray(self._train.read(int(s), block_size + 1), dtype=np.int64) for s in starts])
        return _to_torch(win[:, :-1], device), _to_torch(win[:, 1:], device)

    def val_batches(self, batch_size: int, block_size: int, max_batches: int | None = None, device: Any = None):
        from .tokens import iter_eval_batches

        return iter_eval_batches(self.val, batch_size, block_size, max_batches=max_batches, device=device)


def load_shards(folder: str | os.PathLike[str], streams: int = 1) -> ShardData:
    return ShardData(folder, streams)


# ---------------------------------------------------------------------------------------------
# CLI: bitlm data prepare
# ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("prepare", help="tokenize a corpus once into memory-mapped token shards for training")
    c.add_argument("--data", default="default",
                   help="'default' (bundled corpus), a .txt/.jsonl/.parquet path, or hf:NAME (streamed)")
    c.add_argument("--out", required=True, help="shard folder to write (train with --data OUT)")
    c.add_argument("--tokenizer", default=None, help="tokenizer.json or HF folder (default: train a BPE)")
    c.add_argument("--vocab-size", type=int, default=8192, help="BPE size when training a tokenizer")
    c.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    c.add_argument("--text-field", default="text", help="JSONL / parquet / HF field holding the text")


def run(args) -> int:
    idx = prepare_shards(args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         shard_tokens=args.shard_tokens, text_field=args.text_field)
    print(f"wrote {args.out}: {idx['tokens']['train']:,} train + {idx['tokens']['val']:,} val tokens ({idx['dtype']}) "
          f"in {len(idx['splits']['train'])} + {len(idx['splits']['val'])} shards; content {idx['content_sha256']}")
    return 0
