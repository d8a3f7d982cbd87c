"""ModelConfig and its named presets; config loading (preset → file → ``k=v`` overrides).

Three architectures share one transformer implementation (``bitlm.model``):

  * ``bitnet``        — BitNet 2023 (2310.11453): LayerNorm, SubLN (a LayerNorm before every
                        BitLinear input, including o_proj and the FFN down projection), GELU FFN of
                        width 4d, multi-head attention.  Positions use RoPE (the paper does not say).
  * ``bitnet-b1.58``  — BitNet b1.58 2024 (2402.17764): LLaMA-alike — RMSNorm, SwiGLU, RoPE, no biases;
                        every BitLinear input is RMS-normalised (the FAQ's "built-in RMSNorm"),
                        realised as pre-norms plus sub-norms before o_proj and down_proj.
  * ``bitnet-2b4t``   — microsoft/bitnet-b1.58-2B-4T exactly as transformers' BitNetForCausalLM
                        computes it: RMSNorm pre-norms, attn_sub_norm before o_proj, ReLU²-gated FFN
                        with ffn_sub_norm before down_proj, GQA, RoPE θ = 500000, tied embeddings.

``quant`` is orthogonal: "fp" (plain nn.Linear — the baseline every comparison uses), "b1" or
"b1.58".  Embeddings, norms and the output head are never quantised.

Activation granularity follows the papers: b1 quantises activations per tensor in training and per
token at inference (2310.11453 §2), b1.58 per token throughout; ``act_granularity`` (training
mode, None = the quant's paper default) and ``act_granularity_eval`` (eval mode) hold the split.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-2b4t")
QUANTS = ("fp", "b1", "b1.58")

# Activation variants (``ModelConfig.act_variant``): per projection site, the BitLinear activation
# options (bits, act_quant, act_topk, hadamard).  Sites: "qkv" (q/k/v: attention input), "o" (o_proj:
# the attention output), "ffn_in" (gate/up, or up of the bitnet GELU FFN), "down" (down_proj).
# ``None`` bits = ModelConfig.act_bits (8 by default).  Sources: BitNet a4.8 (arXiv 2411.04965 §2.1,
# Eq. 1, 7; top-K 50 % on o_proj only, down_proj stays int8 — its sparsity comes from ReLU²) and
# BitNet v2 (arXiv 2504.18415 §2: H-BitLinear on o_proj and down_proj; "a8" = the 8-bit stage with the
# Hadamard layers already in place, "a4" = 4-bit absmean everywhere).  Embeddings and the head stay
# high precision (v2 §2).  The variants change no parameter: a checkpoint trained with one loads
# into any other (the papers' recipe: 8-bit first, then continue with 4-bit, ``train --act-variant``).
ACT_VARIANTS: dict[str, dict[str, tuple[int | None, str, float | None, bool]]] = {
    "a8": {site: (None, "absmax", None, False) for site in ("qkv", "o", "ffn_in", "down")},
    "a4.8": {"qkv": (4, "absmean", None, False), "o": (8, "absmax", 0.5, False),
             "ffn_in": (4, "absmean", None, False), "down": (8, "absmax", None, False)},
    "v2-a8": {"qkv": (8, "absmax", None, False), "o": (8, "absmax", None, True),
              "ffn_in": (8, "absmax", None, False), "down": (8, "absmax", None, True)},
    "v2-a4": {"qkv": (4, "absmean", None, False), "o": (4, "absmean", None, True),
              "ffn_in": (4, "absmean", None, False), "down": (4, "absmean", None, True)},
}


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model (unknown preset/arch, bad field)."""


@dataclass
class ModelConfig:
    arch: str = "bitnet-b1.58"
    quant: str = "b1.58"
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None → n_heads (multi-head attention)
    d_ff: int | None = None  # None → 4d (bitnet) or the LLaMA rule 8d/3 rounded up to 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    act_bits: int = 8
    # Activation absmax granularity.  ``act_granularity`` applies in training mode (model.train());
    # None = the paper's choice for the quant: "tensor" for b1 (2310.11453: "per tensor during
    # training"), "token" otherwise (b1.58: per token throughout).  ``act_granularity_eval`` applies
    # in eval mode (eval, generation; pack/export require "token", the only inference granularity
    # of both papers).  Files written before act_granularity_eval existed evaluate with their
    # act_granularity, as they did then (see from_dict).
    act_granularity: str | None = None
    act_granularity_eval: str = "token"
    # Group quantisation / normalisation (2310.11453 Eq. 13-15, "model-parallel"): parameters
    # computed per group, never across groups.  weight_groups split each projection's weight
    # along weight_group_dim: "out" (output rows, every projection), "in" (input columns, every
    # projection) or "parallel" (the Megatron partition: output rows for the column-parallel
    # q/k/v/gate/up, input columns for the row-parallel o/down).  act_groups: absmax γ (and η)
    # per group of input features of every projection.  norm_groups: mean/variance (LayerNorm) or
    # mean square (RMSNorm) per group of features in every norm in front of a projection
    # (input, post-attention and the two sub-norms; the final norm before the head stays whole).
    # group_scope: where act_groups and norm_groups apply — "all" (every projection input and the
    # four block norms) or "parallel" (the tensor-parallel partition of Eq. 13-15: only the inputs
    # of the row-parallel o/down and the sub-norms right before them, whose features are split
    # across ranks; q/k/v/gate/up see replicated inputs, so their γ and norms stay whole).
    weight_groups: int = 1
    weight_group_dim: str = "out"
    act_groups: int = 1
    norm_groups: int = 1
    group_scope: str = "all"
    # The non-negative (η) activation variant of 2310.11453 Eq. 6 on the inputs of the projections
    # whose output feeds the FFN non-linearity (up_proj of the bitnet GELU FFN, gate_proj of the
    # gated FFNs).  The paper's "activations before the non-linear functions" is read as the
    # BitLinear inputs on the path into the non-linearity: BitLinear inputs are the only
    # activations the paper quantises (quantising the non-linearity's own input would add a
    # quantiser no matmul consumes).  See bitlm.quant for the γ used.  The b1.58 paper dropped
    # the zero point ("all activations to [-Q_b, Q_b]"); off by default, and packing refuses it.
    act_nonneg: bool = False
    # Activation variant (see ACT_VARIANTS): "a8" (b1.58: int8 absmax everywhere, the default and
    # what files written before this field computed), "a4.8" (BitNet a4.8), "v2-a8" / "v2-a4"
    # (BitNet v2's H-BitLinear on o/down, 8- or 4-bit).  The others need per-token activations,
    # act_bits=8, no act_groups / act_nonneg, and a quantised model (quant b1 / b1.58).
    act_variant: str = "a8"
    init_std: float = 0.02
    # For models converted from LLaMA-family checkpoints (bitlm.convert); defaults = the papers' graph.
    sub_norm: bool = True  # False: nn.Identity in place of attn_sub_norm / ffn_sub_norm (no SubLN)
    qkv_bias: bool = False  # bias on q/k/v (Qwen2); o/gate/up/down never have one
    # RoPE frequency scaling in transformers' rope_parameters spelling: None = plain RoPE, or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"} (Llama 3.1 / 3.2; applied by bitlm.model.rope_inv_freq)
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "bitnet":
            return 4 * self.d_model
        return ((8 * self.d_model // 3) + 63) // 64 * 64

    @property
    def gated_ffn(self) -> bool:
        return self.arch != "bitnet"

    @property
    def train_act_granularity(self) -> str:
        """``act_granularity`` with None resolved: per tensor for b1 (the b1 paper), else per token."""
        if self.act_granularity is not None:
            return self.act_granularity
        return "tensor" if self.quant == "b1" else "token"

    @property
    def linear_params(self) -> int:
        """Weights of the projections (attention and FFN), i.e. parameters without embeddings,
        head and norms — the size measure the training recipes' size rows are chosen by."""
        d, hd = self.d_model, self.head_dim
        attn = 2 * d * self.n_heads * hd + 2 * d * self.kv_heads * hd
        ffn = (3 if self.gated_ffn else 2) * d * self.ffn_dim
        return self.n_layers * (attn + ffn)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.quant not in QUANTS:
            raise ConfigError(f"unknown quant {self.quant!r}; choose one of {', '.join(QUANTS)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "act_bits"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.act_granularity not in (None, "token", "tensor"):
            raise ConfigError(f"act_granularity must be 'token', 'tensor' or None, got {self.act_granularity!r}")
        if self.weight_group_dim not in ("out", "in", "parallel"):
            raise ConfigError(f"weight_group_dim must be 'out', 'in' or 'parallel', got {self.weight_group_dim!r}")
        if self.group_scope not in ("all", "parallel"):
            raise ConfigError(f"group_scope must be 'all' or 'parallel', got {self.group_scope!r}")
        widths = {"d_model": self.d_model, "ffn width": self.ffn_dim}
        for name, widths_split in (("weight_groups", {**widths, "k/v width": self.kv_heads * self.head_dim}),
                                   ("act_groups", widths), ("norm_groups", widths)):
            g = getattr(self, name)
            if int(g) < 1:
                raise ConfigError(f"{name} must be positive, got {g}")
            for what, n in widths_split.items():
                if n % g:
                    raise ConfigError(f"{name}={g} does not divide the {what} {n}")
        if self.act_granularity_eval not in ("token", "tensor"):
            raise ConfigError(f"act_granularity_eval must be 'token' or 'tensor', got {self.act_granularity_eval!r}")
        if self.act_variant not in ACT_VARIANTS:
            raise ConfigError(f"unknown act_variant {self.act_variant!r}; choose one of {', '.join(ACT_VARIANTS)}")
        if self.act_variant != "a8":
            v = f"act_variant={self.act_variant!r}"
            if self.quant == "fp":
                raise ConfigError(f"{v} needs a quantised model (quant b1 or b1.58), got quant='fp'")
            if self.act_bits != 8:
                raise ConfigError(f"{v} fixes its own activation bits; it needs act_bits=8, got {self.act_bits}")
            if self.act_groups != 1 or self.act_nonneg:
                raise ConfigError(f"{v} quantises whole tokens symmetrically: it needs act_groups=1 and act_nonneg=False")
            if self.train_act_granularity != "token" or self.act_granularity_eval != "token":
                raise ConfigError(f"{v} quantises per token: set act_granularity='token' (and act_granularity_eval)")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields, with ``act_granularity`` resolved: a file stores the granularity its model
        trained with, whatever the default for its quant becomes later."""
        d = dataclasses.asdict(self)
        d["act_granularity"] = self.train_act_granularity
        return d

    def __eq__(self, other: object) -> bool:  # equal when they build the same model (None = its resolved value)
        if not isinstance(other, ModelConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like any non-frozen dataclass

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config", *, saved: bool = True) -> ModelConfig:
        """A config from a dict.  ``saved``: ``d`` is a config as a file stores it (to_dict of some
        bitlm version), so fields added since get the value that reproduces that version's numerics."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s): {', '.join(unknown)}")
        check_field_types(cls, d, source)
        return cls(**(upgrade_saved(d) if saved else d))

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(rs: Any) -> None:
    """``ModelConfig.rope_scaling``: only ``rope_type: "llama3"`` with its four numbers
    (transformers' own checks: factor ≥ 1, low_freq_factor < high_freq_factor)."""
    if not isinstance(rs, dict) or rs.get("rope_type") != "llama3":
        raise ConfigError(f"rope_scaling must be None or a dict with rope_type 'llama3', got {rs!r}")
    extra = sorted(set(rs) - {"rope_type", *ROPE_SCALING_KEYS})
    if extra:
        raise ConfigError(f"rope_scaling: unknown key(s) {', '.join(extra)}")
    for k in ROPE_SCALING_KEYS:
        v = rs.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"rope_scaling.{k} must be a positive number, got {v!r}")
    if rs["factor"] < 1 or rs["low_freq_factor"] >= rs["high_freq_factor"]:
        raise ConfigError(f"rope_scaling needs factor >= 1 and low_freq_factor < high_freq_factor, got {rs!r}")


def upgrade_saved(d: dict[str, Any]) -> dict[str, Any]:
    """Fill fields that a stored config predates with the values its writer computed with.

    * ``act_granularity_eval`` (added with the b1 paper's train/inference split): before it, one
      ``act_granularity`` applied in training and in eval, so an old file evaluates with it.
    """
    d = dict(d)
    if "act_granularity" in d and "act_granularity_eval" not in d:
        d["act_granularity_eval"] = d["act_granularity"] or "token"
    return d


# ---------------------------------------------------------------------------------------------
# Presets.  Paper shapes come from 2310.11453 Table 5 (b1), the b1.58 FAQ Table 1, and the
# 2B4T config; the small ones are for tests, laptops and the demo.
# ---------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-scale presets (the same code path as the big ones)
    "tiny": dict(arch="bitnet-b1.58", vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "small": dict(arch="bitnet-b1.58", vocab_size=4096, d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "base": dict(arch="bitnet-b1.58", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=512),
    "tiny-2b4t": dict(
        arch="bitnet-2b4t", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160,
        max_seq_len=128, rope_theta=500000.0, tie_embeddings=True,
    ),
    "tiny-bitnet": dict(arch="bitnet", quant="b1", vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    # BitNet b1 paper shapes (Table 5); FFN 4d, MHA
    **{
        f"bitnet-{name}": dict(arch="bitnet", quant="b1", vocab_size=16384, d_model=d, n_layers=L, n_heads=H,
                               max_seq_len=2048)
        for name, d, L, H in [
            ("125m", 768, 12, 12), ("350m", 1024, 24, 16), ("760m", 1536, 24, 16), ("1.3b", 2048, 24, 32),
            ("2.7b", 2560, 32, 32), ("6.7b", 4096, 32, 32), ("13b", 5120, 40, 40), ("30b", 7168, 48, 56),
        ]
    },
    # BitNet b1.58 FAQ Table 1 shapes (LLaMA-alike, SwiGLU)
    **{
        f"b1.58-{name}": dict(arch="bitnet-b1.58", vocab_size=32000, d_model=d, d_ff=f, n_layers=L, n_heads=H,
                              max_seq_len=2048)
        for name, d, f, H, L in [
            ("700m", 1536, 4096, 24, 24), ("1.3b", 2048, 5460, 32, 24), ("3b", 3200, 8640, 32, 26),
            ("3.9b", 3200, 12800, 32, 26),
        ]
    },
    # microsoft/bitnet-b1.58-2B-4T (config.json of the released model)
    "2b4t": dict(
        arch="bitnet-2b4t", vocab_size=128256, d_model=2560, d_ff=6912, n_layers=30, n_heads=20, n_kv_heads=5,
        max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    d = {**PRESETS[name], **overrides}
    return ModelConfig(**d)


def parse_overrides(pairs: list[str] | None, target: type = ModelConfig) -> dict[str, Any]:
    """Parse ``["d_model=512", "quant=b1"]`` into typed values using the dataclass field types."""
    types = {f.name: f.type for f in dataclasses.fields(target)}
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in types:
            raise ConfigError(f"--set: unknown field {key!r} for {target.__name__}")
        out[key] = _coerce(raw.strip(), str(types[key]), key)
    return out


def _coerce(raw: str, typ: str, key: str) -> Any:
    if raw.lower() in ("none", "null") and "None" in typ:
        return None
    try:
        if typ.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} as {typ}") from None
    return raw


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON config file as a dict; errors name the file."""
    p = Path(path)
    try:
        loaded = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a JSON config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid JSON ({getattr(e, 'msg', e)}"
                          + (f" at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ")")) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return loaded


def check_field_types(cls: type, d: dict[str, Any], source: str) -> None:
    """Refuse values of the wrong JSON type for ``cls``'s fields (a string where an int belongs), so
    that the error names the field instead of surfacing later as an arithmetic TypeError."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, v in d.items():
        typ = types.get(key)
        if typ is None or (v is None and "None" in typ):
            continue
        if typ.startswith("bool"):
            ok = isinstance(v, bool)
        elif typ.startswith("int"):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif typ.startswith("float"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif typ.startswith("str"):
            ok = isinstance(v, str)
        else:  # tuples, dicts: not checked here
            ok = True
        if not ok:
            raise ConfigError(f"{source}: field {key!r} must be {typ}, got {type(v).__name__} {v!r}")


def build_config(
    name: str | None = None, file: str | Path | None = None, overrides: list[str] | None = None, **kw: Any
) -> ModelConfig:
    """preset → JSON file → ``k=v`` overrides → keyword overrides, validated once at the end."""
    d: dict[str, Any] = {}
    if name:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        d.update(PRESETS[name])
    if file:
        loaded = read_config_file(file)
        # {"model": {...}, "train": {...}}, or the model fields at the top level (beside "train")
        model = loaded["model"] if "model" in loaded else {k: v for k, v in loaded.items() if k != "train"}
        if not isinstance(model, dict):
            raise ConfigError(f"{file}: section 'model' must be a JSON object")
        d.update(upgrade_saved(model))
    d.update(parse_overrides(overrides))
    d.update({k: v for k, v in kw.items() if v is not None})
    return ModelConfig.from_dict(d, source=str(file or name or "config"), saved=False)


__all__ = ["ARCHS", "QUANTS", "ConfigError", "ModelConfig", "PRESETS", "preset", "build_config", "parse_overrides",
           "read_config_file", "check_field_types"]
