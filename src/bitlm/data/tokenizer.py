"""The tokenizer: byte-level BPE trained with the ``tokenizers`` library on the training split,
cached by hash of (training text, vocab size, ``TOKENIZER_TAG``); or a ``tokenizer.json`` / Hugging
Face tokenizer folder.  ``<|endoftext|>`` (id 0) is both EOS and BOS, ``<|pad|>`` is id 1.
``Tokenizer.token_bytes`` gives each token's UTF-8 byte count (0 for special tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_write_bytes
from .common import DataError, cache_root
from .corpus import Corpus

# Bump when the tokenizer recipe below changes: it is part of the tokenizer cache key.
TOKENIZER_TAG = "bitlm-bpe-v1"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


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
