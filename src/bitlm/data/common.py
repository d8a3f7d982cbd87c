"""What every part of ``bitlm.data`` shares: ``DataError`` (the one-line user-facing error), the
cache root (``$BITLM_CACHE``, default ``~/.cache/bitlm``) and the progress bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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
