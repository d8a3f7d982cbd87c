"""bitlm — BitNet (1-bit / 1.58-bit) language models: training, packed CPU inference, interop.

Nothing heavy happens at import: submodules (and torch) load on first attribute access.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# torch's OpenMP threads spin for a while after every parallel op.  On a machine with few cores
# that spinning takes the cores the native kernel pool needs: a 2B4T decode step ran 22 ms
# instead of 17 ms at 2 threads (sampling ops on 128k logits run in parallel between steps),
# and training steps 10-15x slower whenever another process held a core.  Passive waiting costs
# nothing measurable.  OpenMP reads this once, when torch loads, so it only takes effect when
# bitlm is imported first (the `bitlm` CLI always is); set it yourself otherwise.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "ModelConfig": "config",
    "preset": "config",
    "BitLinear": "layers",
    "prepare": "layers",
    "set_quant_lambda": "layers",
    "BitNetModel": "model",
    "load": "loading",
    "save": "loading",
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
