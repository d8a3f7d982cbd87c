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

Modules (this package re-exports their public names; ``from bitlm.data import X`` is the API)
------------------------------------------------------------------------------------------
``common``     DataError, the cache root, the progress bar
``fetch``      Debian packages: apt-get download + dpkg -x, cached
``sword``      SWORD zText reader, OSIS → text
``rdata``      R serialisation / lazy-load reader
``corpus``     Document, Corpus, the named sources, local files / HF datasets, the fixed split
``tokenizer``  Tokenizer, train / load a tokenizer, token byte lengths
``tokens``     the token cache, TokenData, prepare_data, batches, bits per byte
``shards``     ``bitlm data prepare``: fixed-size token shards with an index; ShardData for training
"""


from __future__ import annotations

from .common import DataError, cache_root
from .corpus import (
    CHUNK_CHARS,
    DEFAULT_SOURCES,
    DEFAULT_VAL_FRACTION,
    SOURCES,
    SPLIT_TAG,
    Corpus,
    Document,
    Source,
    load_corpus,
    load_text_source,
    split_documents,
)
from .fetch import fetch_debian_package
from .rdata import REnvironment, RPairList, RSpecial, RSymbol, RVector, r_unserialize, read_r_lazyload
from .shards import ShardData, is_shard_dir, load_shards, prepare_shards
from .sword import osis_to_text, read_ztext_module
from .tokenizer import EOS_TOKEN, PAD_TOKEN, TOKENIZER_TAG, Tokenizer, load_tokenizer, train_tokenizer
from .tokens import (
    TokenData,
    bits_per_byte,
    count_token_bytes,
    get_batch,
    iter_eval_batches,
    prepare_data,
    token_byte_lengths,
    tokenize_corpus,
    utf8_len,
)

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
    "prepare_shards",
    "load_shards",
    "is_shard_dir",
    "ShardData",
    "get_batch",
    "iter_eval_batches",
    "utf8_len",
    "token_byte_lengths",
    "count_token_bytes",
    "bits_per_byte",
    # constants and reader types, importable as before the split
    "CHUNK_CHARS",
    "DEFAULT_VAL_FRACTION",
    "SPLIT_TAG",
    "TOKENIZER_TAG",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "Source",
    "RSymbol",
    "RVector",
    "RPairList",
    "REnvironment",
    "RSpecial",
]
