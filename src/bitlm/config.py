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
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-2b4t")
QUANTS = ("fp", "b1", "b1.58")


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
    act_granularity: str = "token"  # "token" or "tensor" (b1 paper's training variant)
    weight_groups: int = 1
    act_groups: int = 1
    init_std: float = 0.02
    # For models converted from LLaMA-family checkpoints (bitlm.convert); defaults = the papers' graph.
    sub_norm: bool = True  # False: nn.Identity in place of attn_sub_norm / ffn_sub_norm (no SubLN)
    qkv_bias: bool = False  # bias on q/k/v (Qwen2); o/gate/up/down never have one

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
        if self.act_granularity not in ("token", "tensor"):
            raise ConfigError(f"act_granularity must be 'token' or 'tensor', got {self.act_granularity!r}")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s): {', '.join(unknown)}")
        check_field_types(cls, d, source)
        return cls(**d)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


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
        d.update(model)
    d.update(parse_overrides(overrides))
    d.update({k: v for k, v in kw.items() if v is not None})
    return ModelConfig.from_dict(d, source=str(file or name or "config"))


__all__ = ["ARCHS", "QUANTS", "ConfigError", "ModelConfig", "PRESETS", "preset", "build_config", "parse_overrides",
           "read_config_file", "check_field_types"]
