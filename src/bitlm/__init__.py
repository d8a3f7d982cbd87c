"""bitlm — BitNet (1-bit / 1.58-bit) language models: training, packed CPU inference, interop.

Nothing heavy happens at import: submodules (and torch) load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "preset": "config",
    "BitLinear": "layers",
    "prepare": "layers",
    "set_quant_lambda": "layers",
    "BitNetModel": "model",
    "load": "io",
    "save": "io",
    "pack": "engine",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'bitlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
