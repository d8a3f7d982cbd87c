"""Data layer of bitlm (being split into modules; see bitlm.data.corpus for now)."""

from .corpus import *  # noqa: F403
from .corpus import (  # noqa: F401
    CHUNK_CHARS,
    EOS_TOKEN,
    PAD_TOKEN,
    __all__,
    _extract_deb,
    _read_austen,
    _read_mobydick,
    _read_sword_source,
    _token_dtype,
    _train_bpe,
)
