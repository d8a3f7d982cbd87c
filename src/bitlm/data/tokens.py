"""Token arrays: the memory-mapped token cache, ``TokenData``, batches and bits per byte.

* **Token cache**: ``.npy`` arrays (uint16 when the vocabulary fits, else uint32) under
  ``$BITLM_CACHE/tokens/<hash>/``, opened with ``np.load(mmap_mode="r")``.  Layout:
  ``EOS d1 EOS d2 … EOS dn EOS`` so every document starts right after an EOS acting as BOS.
* **Batches**: ``get_batch(tokens, B, T, seed=, step=)`` draws random windows with an RNG seeded
  by (seed, step, rank) alone, so a resumed run sees exactly the batches an uninterrupted one
  would; ``iter_eval_batches`` walks validation tokens in non-overlapping windows.
* **Bits per byte**: ``token_byte_lengths(tokenizer)`` gives each token's UTF-8 byte count (0 for
  special tokens), so bpb = total NLL (nats) / (ln 2 · bytes) over the same targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.atomic import atomic_write, atomic_write_bytes
from .common import DataError, cache_root, progress
from .corpus import DEFAULT_VAL_FRACTION, Corpus, Document, load_text_source
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import torch


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
    for i in progress(range(0, len(docs), step), desc=desc, unit="batch"):
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
