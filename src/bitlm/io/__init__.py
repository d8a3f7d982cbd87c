"""Model file formats, one module each:

    io.checkpoint   a bitlm checkpoint folder (native)
    io.hf           a Hugging Face BitNetForCausalLM folder
    io.gguf         a GGUF file (llama.cpp, bitnet.cpp, ik_llama.cpp)
    io.gguf_types   the BitNet runtimes' GGUF tensor types (I2_S, IQ2_BN, IQ2_BN_R4, IQ1_BN)
    io.packed       a ``.bitlm`` packed model file (the container; ``bitlm.engine`` gives it meaning)
    io.atomic       the one atomic-write helper every writer uses

Choosing the format (``bitlm.load`` / ``bitlm.save``) is ``bitlm.loading``'s; nothing here
imports it, nor the engine, the Llama converter or LoRA (tests/test_structure.py).

Scale conventions of foreign formats (e.g. HF's weight_scale = 1/mean|W|) are converted only
inside these modules; everything else in bitlm uses W ≈ s · T with s = mean|W|.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["require_bitnet_graph", "read_json"]


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """A JSON file's value (a folder's config.json, say); invalid JSON raises ``error`` naming the
    file and the line.  Torch-free: ``bitlm.loading`` sniffs formats with it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def require_bitnet_graph(cfg, target: str) -> None:
    """Refuse to export a model that the target format's BitNet graph cannot express: converted
    LLaMA-style models without SubLN norms or with q/k/v biases would be read back (by
    transformers / llama.cpp) as a different function, silently."""
    if not getattr(cfg, "sub_norm", True):
        raise ValueError(f"cannot export to {target}: the model has no attn_sub_norm/ffn_sub_norm (sub_norm=False, "
                         "a converted LLaMA); convert with --sub-norms rmsnorm to get the BitNet graph")
    if getattr(cfg, "qkv_bias", False):
        raise ValueError(f"cannot export to {target}: q/k/v biases are not part of the BitNet graph")
    from ..model import inference_blockers  # group norm / η / grouped activations: no runtime computes them

    if blockers := inference_blockers(cfg, target):
        hint = ("; export with requantize=True (bitlm export --requantize) to drop the groups"
                if blockers[0].startswith(("norm_groups", "act_groups")) else "")
        raise ValueError(f"cannot export to {target}: {blockers[0]}{hint}")
