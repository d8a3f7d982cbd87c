"""Hugging Face ``BitNetForCausalLM`` folders in and out: :func:`load_hf`, :func:`save_hf`.

The format is the one transformers (``models/bitnet``, ``integrations/bitnet.py``,
``BitNetQuantConfig``) reads, and the one microsoft/bitnet-b1.58-2B-4T ships.

Folder
------
``config.json``
    ``architectures: ["BitNetForCausalLM"]``, ``model_type: "bitnet"``, and the shape fields:
    hidden_size → d_model, intermediate_size → d_ff, num_hidden_layers, num_attention_heads,
    num_key_value_heads (null → MHA), vocab_size, max_position_embeddings → max_seq_len,
    rms_norm_eps → norm_eps, RoPE θ from ``rope_parameters.rope_theta`` (transformers 5.x) or
    ``rope_theta`` (4.x), tie_word_embeddings (class default **false**; 2B4T sets true).
    ``hidden_act`` picks the bitlm architecture: ``relu2`` → ``bitnet-2b4t`` (2B4T's ReLU²-GLU),
    ``silu`` → ``bitnet-b1.58`` (SwiGLU; the 1bitLLM-style model that llama.cpp's ``bitnet``
    graph computes; ``swish`` is the same function).  Both have the same SubLN skeleton, which is
    why both are this class.  transformers accepts any of its activations here (its BitNet tests
    use ``gelu``); bitlm refuses the others with an error naming the field.
    LLaMA folders are refused: they lack attn_sub_norm / ffn_sub_norm, so no bitlm
    architecture computes the same function.
    Optional ``quantization_config``: ``{"quant_method": "bitnet", "linear_class":
    "bitlinear" | "autobitlinear", "quantization_mode": "offline" | "online"}``.
``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor: file}}``).  Pickled
``pytorch_model.bin`` files are refused (loading them could run code).
``tokenizer.json`` etc.
    Not read here; ``load_hf`` records the folder as ``model.hf_folder`` for the tokenizer loader.

Tensors (names equal bitlm's ``BitNetModel`` parameter names)
--------------------------------------------------------------
``model.embed_tokens.weight`` [vocab, d], ``model.norm.weight`` [d], ``lm_head.weight``
[vocab, d] only when untied; per layer N under ``model.layers.N.``: ``input_layernorm``,
``post_attention_layernorm``, ``self_attn.attn_sub_norm`` [d], ``mlp.ffn_sub_norm`` [d_ff] (all
``.weight``) and the seven projections ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
stored in one of three variants:

(a) packed (any ``bitnet`` quantization_config except autobitlinear + online): ``.weight`` uint8
    [ceil(out/4), in] and ``.weight_scale`` [1] in the model dtype (autobitlinear files may also
    hold T already unpacked as float [out, in]; accepted).  Layout ("hf", 2 bits per weight, one scale per
    tensor): with R = ceil(out/4) and code = T + 1 ∈ {0, 1, 2},
    ``packed[r, c] = Σ_{i=0..3} code[i·R + r, c] << 2i`` — the four codes of a byte come from
    the row blocks r, r+R, r+2R, r+3R (dim 0, *not* adjacent rows), block 0 in the low bits;
    padding rows hold code 0; code 3 never occurs.  transformers itself needs out % 4 == 0.
(b) float weights: with ``autobitlinear`` + ``online``, latent weights that transformers
    ternarises by absmean in every forward; *without* quantization_config, plain float weights
    that transformers runs unquantised (``load_hf`` does the same by default, ``quant="b1.58"``
    reads them as latent weights instead).
(c) either of the above split over shards.

The scale trap
--------------
``weight_scale`` means opposite things depending on ``linear_class``: transformers' ``BitLinear``
(``"bitlinear"``, the default when absent) divides, W ≈ T / weight_scale, so it stores 1/mean|W|;
``AutoBitLinear`` (``"autobitlinear"``, 2B4T's config) multiplies, W ≈ T · weight_scale.
:func:`hf_scale_to_absmean` / :func:`absmean_to_hf_scale` are the only places that know this;
everything else uses bitlm's W ≈ s·T, s = mean|W|.  Because trained absmeans are ≪ 1, an effective
s > 1 on load triggers a warning that the file probably uses the other convention.

Scale pinning
-------------
A packed tensor is loaded as :class:`~bitlm.layers.FrozenTernaryLinear`, which stores W = s·T and s itself.
Re-quantising s·T by absmean would give the right T but the wrong scale, mean|s·T| = s·p with p the
fraction of non-zeros (≈ 0.69 for Gaussian weights), so the scale must be pinned, as transformers'
offline layers also keep ``weight_scale``.  To fine-tune a packed model instead, ``quant="b1.58"``
loads ordinary ``BitLinear`` latents (s/p)·T, which re-quantise to exactly T and to s up to float
rounding of the mean (:func:`~bitlm.layers.ternary_latent`); :func:`~bitlm.layers.thaw` does the same
to a loaded model.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..layers import BitLinear, FrozenTernaryLinear, ternary_latent, thaw  # re-exported (__all__)
from ..model import BitNetModel
from ..packing import pack_tensor, unpack_tensor
from . import require_bitnet_graph
from .atomic import atomic_dir

__all__ = [
    "HFFormatError",
    "HFSource",
    "FrozenTernaryLinear",
    "load_hf",
    "save_hf",
    "read_hf_config",
    "hf_scale_to_absmean",
    "absmean_to_hf_scale",
    "pack_ternary_hf",
    "unpack_ternary_hf",
    "ternary_latent",
    "thaw",
    "hf_config_dict",
    "LINEAR_CLASSES",
]

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# hidden_act <-> bitlm architecture (the rest of the graph is identical, see the module docstring)
_ACT_TO_ARCH = {"relu2": "bitnet-2b4t", "silu": "bitnet-b1.58", "swish": "bitnet-b1.58"}
_ARCH_TO_ACT = {"bitnet-2b4t": "relu2", "bitnet-b1.58": "silu"}
# Tensors some writers add that carry no information (RoPE tables are recomputed).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CODE_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class HFFormatError(ValueError):
    """A Hugging Face folder bitlm cannot read: bad config, unsupported model, bad tensors."""


# ---------------------------------------------------------------------------------------------
# The scale convention (the only place that knows what weight_scale means)
# ---------------------------------------------------------------------------------------------


def _scale_multiplies(linear_class: str | None) -> bool:
    lc = "bitlinear" if linear_class is None else linear_class  # transformers' default class
    if lc not in LINEAR_CLASSES:
        raise HFFormatError(f"unknown quantization_config.linear_class {linear_class!r}; "
                            f"expected one of {', '.join(LINEAR_CLASSES)}")
    return lc == "autobitlinear"


def hf_scale_to_absmean(weight_scale: torch.Tensor | float, linear_class: str | None) -> torch.Tensor:
    """bitlm's s = mean|W| (float32, shape (1,)) from a stored ``weight_scale``.

    ``autobitlinear``: W ≈ T · weight_scale, so s = weight_scale.
    ``bitlinear`` or None (transformers' default): W ≈ T / weight_scale, so s = 1 / weight_scale.
    """
    ws = torch.as_tensor(weight_scale).detach().float().reshape(-1)
    return ws.clone() if _scale_multiplies(linear_class) else torch.reciprocal(ws)


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def absmean_to_hf_scale(s: torch.Tensor | float, linear_class: str | None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``weight_scale`` tensor (shape (1,), ``dtype``) to store for absmean ``s``.

    For ``bitlinear`` the stored value r is read back as s' = fl(1/r).  About one float32 in eight
    is not fl(1/r) of any float r, so a first trip can move such an s by one ulp.  Every s that
    came from a file is of that form, though, and then one of the neighbours of fl(1/s) reads back
    exactly; they are tried in turn, which makes HF → bitlm → HF → bitlm bit-exact (and
    ``autobitlinear`` is exact from the start).  transformers divides by a value within an ulp or
    two of 1/s either way.
    """
    s = torch.as_tensor(s).detach().float().reshape(-1)
    if s.numel() != 1:
        raise ValueError(f"the HF BitNet format has one scale per tensor, got {s.numel()}")
    if _scale_multiplies(linear_class):
        return s.to(dtype)
    r = (1.0 / s.double()).to(dtype)
    bits = r.view(_INT_VIEW[dtype])
    for k in (0, -1, 1, -2, 2):  # positive floats: integer neighbours of the bits are float neighbours
        cand = (bits + k).view(dtype)
        if torch.equal(hf_scale_to_absmean(cand, linear_class), s):
            return cand
    return r


def _check_scales(effective: list[tuple[str, float]], linear_class: str | None, source: str) -> None:
    """Warn when effective absmeans look like the other convention (trained absmeans are ≪ 1)."""
    bad = [(n, s) for n, s in effective if s > 1.0]
    if bad:
        name, s = bad[0]
        warnings.warn(
            f"{source}: {len(bad)}/{len(effective)} projections have an effective absmean > 1 "
            f"(first: {name} → {s:.4g}) under linear_class={linear_class or 'bitlinear (default)'}; the "
            "file may store weight_scale in the other convention (check quantization_config.linear_class)",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# The "hf" 2-bit packing (row-block interleave along the output dimension)
# ---------------------------------------------------------------------------------------------


def pack_ternary_hf(t: torch.Tensor) -> torch.Tensor:
    """T ∈ {-1,0,1} of shape [out, in] → uint8 [ceil(out/4), in]; byte-identical to
    transformers' ``pack_weights``.  The layout is :mod:`bitlm.packing`'s ``"hf"`` format (its one
    implementation); this accepts integral float tensors too."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        t = t.to(torch.int16)
    return pack_tensor(t, "hf")


def unpack_ternary_hf(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 [ceil(out/4), in] → int8 T of shape [out_features, in] (inverse of :func:`pack_ternary_hf`)."""
    if packed.dim() != 2:
        raise ValueError(f"expected a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    return unpack_tensor(packed, "hf", out_features, packed.shape[1])


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


@dataclass
class HFSource:
    """What a loaded folder stored, so that :func:`save_hf` writes it back unchanged by default:
    the dtype of every float tensor, the raw ``weight_scale`` values and their ``linear_class``
    (None for master-weight folders)."""

    dtypes: dict[str, torch.dtype]
    weight_scales: dict[str, torch.Tensor]
    linear_class: str | None


@dataclass
class HFConfig:
    """What bitlm takes from a BitNetForCausalLM config.json."""

    model: dict[str, Any]  # ModelConfig fields (arch, shapes, θ, eps, tie)
    quantized: bool  # quantization_config with quant_method "bitnet" present
    linear_class: str | None
    mode: str | None  # "offline" | "online" | None
    raw: dict[str, Any]

    @property
    def packed(self) -> bool:
        """Does transformers expect pre-quantised (packed) projections?  Only autobitlinear+online
        takes master weights; BitLinear is always built with uint8 buffers."""
        return self.quantized and not (self.linear_class == "autobitlinear" and self.mode == "online")


def _field(raw: dict, key: str, typ: type | tuple, path: Path, default: Any = ..., nullable: bool = False) -> Any:
    if key not in raw:
        if default is ...:
            raise HFFormatError(f"{path}: missing field {key!r}")
        return default
    v = raw[key]
    if v is None and nullable:
        return default if default is not ... else None
    ok = isinstance(v, typ) and not isinstance(v, bool) if typ in (int, float, (int, float)) else isinstance(v, typ)
    if not ok:
        raise HFFormatError(f"{path}: field {key!r} has the wrong type ({type(v).__name__}: {v!r})")
    return v


def read_hf_config(folder: str | Path) -> HFConfig:
    """Parse and check ``folder/config.json`` (HFFormatError naming the file on any problem)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path}: missing (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HFFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")

    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != "bitnet" and "BitNetForCausalLM" not in archs:
        what = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
        raise HFFormatError(
            f"{path}: unsupported architecture {what}; bitlm reads BitNetForCausalLM (model_type 'bitnet') "
            "folders only (LLaMA-style models have no attn_sub_norm/ffn_sub_norm, so no bitlm architecture "
            "computes the same function)"
        )
    act = _field(raw, "hidden_act", str, path, "relu2")
    if act not in _ACT_TO_ARCH:
        raise HFFormatError(f"{path}: hidden_act {act!r} is not supported; transformers' BitNet gates the FFN "
                            "with any of its activations, bitlm's graphs with relu2 (bitnet-2b4t) or silu/swish "
                            "(bitnet-b1.58) only")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise HFFormatError(f"{path}: {key}=true is not supported (bitlm projections have no bias)")
    if raw.get("rope_scaling"):
        raise HFFormatError(f"{path}: rope_scaling {raw['rope_scaling']!r} is not supported (plain RoPE only)")
    rope = raw.get("rope_parameters")
    theta = _field(raw, "rope_theta", (int, float), path, 500000.0, nullable=True)  # BitNetConfig.default_theta
    if rope is not None:
        if not isinstance(rope, dict):
            raise HFFormatError(f"{path}: field 'rope_parameters' must be an object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise HFFormatError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported (plain RoPE only)")
        theta = _field(rope, "rope_theta", (int, float), path, theta)

    heads = _field(raw, "num_attention_heads", int, path)
    model = dict(
        arch=_ACT_TO_ARCH[act],
        vocab_size=_field(raw, "vocab_size", int, path),
        d_model=_field(raw, "hidden_size", int, path),
        d_ff=_field(raw, "intermediate_size", int, path),
        n_layers=_field(raw, "num_hidden_layers", int, path),
        n_heads=heads,
        n_kv_heads=_field(raw, "num_key_value_heads", int, path, heads, nullable=True),
        max_seq_len=_field(raw, "max_position_embeddings", int, path, 2048),  # BitNetConfig default
        rope_theta=float(theta),
        norm_eps=float(_field(raw, "rms_norm_eps", (int, float), path, 1e-5)),
        tie_embeddings=_field(raw, "tie_word_embeddings", bool, path, False),  # class default is False
        init_std=float(_field(raw, "initializer_range", (int, float), path, 0.02)),
    )
    head_dim = raw.get("head_dim")
    if head_dim is not None and model["d_model"] % heads == 0 and head_dim != model["d_model"] // heads:
        raise HFFormatError(f"{path}: head_dim={head_dim} != hidden_size/num_attention_heads is not supported")

    qc = raw.get("quantization_config")
    lc = mode = None
    if qc is not None:
        if not isinstance(qc, dict):
            raise HFFormatError(f"{path}: quantization_config must be an object, got {qc!r}")
        if qc.get("quant_method") != "bitnet":
            raise HFFormatError(f"{path}: unsupported quantization_config.quant_method {qc.get('quant_method')!r} "
                                "(bitlm reads 'bitnet')")
        lc = qc.get("linear_class", "bitlinear")
        if lc not in LINEAR_CLASSES:
            raise HFFormatError(f"{path}: unknown quantization_config.linear_class {lc!r}")
        mode = qc.get("quantization_mode", "offline")
        if mode not in ("offline", "online"):
            raise HFFormatError(f"{path}: unknown quantization_config.quantization_mode {mode!r}")
        if qc.get("use_rms_norm"):
            raise HFFormatError(f"{path}: quantization_config.use_rms_norm=true (an extra norm inside every "
                                "projection) is not supported")
        skip = qc.get("modules_to_not_convert")
        if skip is not None and (not isinstance(skip, list) or not any("lm_head" in str(p) for p in skip)
                                 or any(_matches(f"model.layers.0.{proj}", skip) for proj in PROJECTIONS)):
            raise HFFormatError(f"{path}: quantization_config.modules_to_not_convert={skip!r} is not supported "
                                "(bitlm quantises exactly the seven projections and keeps lm_head in float)")
    return HFConfig(model=model, quantized=qc is not None, linear_class=lc, mode=mode, raw=raw)


def _matches(name: str, patterns: list) -> bool:
    """Rough form of transformers' should_convert_module test: suffix or module-boundary prefix."""
    return any(name.endswith(str(p)) or name.startswith(f"{p}.") for p in patterns)


# ---------------------------------------------------------------------------------------------
# safetensors (single file or shards)
# ---------------------------------------------------------------------------------------------


class _Tensors:
    """Name → (file, handle) over one file or an index of shards; every read names its file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index_map: dict[str, str] | None = None
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
            self.source = str(single)
        elif index.is_file():
            files = self._read_index(index)
            self.source = str(index)
        else:
            pickled = [p.name for p in folder.glob("pytorch_model*.bin")]
            hint = f" ({pickled[0]} found: pickled checkpoints are not read, convert to safetensors)" if pickled else ""
            raise HFFormatError(f"{single}: missing (no model.safetensors or model.safetensors.index.json){hint}")
        self.handles: dict[Path, Any] = {}
        self.where: dict[str, Path] = {}
        for f in files:
            h = self._open(f)
            for name in h.keys():
                if name in self.where:
                    raise HFFormatError(f"{f}: tensor {name!r} also appears in {self.where[name]}")
                self.where[name] = f
        if self.index_map is not None:  # the index must agree with the shards' own headers
            for name, fname in self.index_map.items():
                if self.where.get(name) != folder / fname:
                    raise HFFormatError(f"{folder / fname}: tensor {name!r} listed in {index.name} is not in that file")

    def _read_index(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text())
            wm = data["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise HFFormatError(f"{index}: malformed index ({e})") from None
        self.index_map = wm
        files = []
        for fname in dict.fromkeys(wm.values()):
            p = self.folder / fname
            if Path(fname).name != fname or not p.is_file():
                raise HFFormatError(f"{p}: shard listed in {index.name} is missing")
            files.append(p)
        return files

    def _open(self, f: Path):
        try:
            h = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{f}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None
        self.handles[f] = h
        return h

    def names(self) -> set[str]:
        return set(self.where)

    def info(self, name: str) -> tuple[str, list[int]]:
        sl = self.handles[self.where[name]].get_slice(name)
        return sl.get_dtype(), list(sl.get_shape())

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self.handles[f].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise HFFormatError(f"{f}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None

    def close(self) -> None:
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles.clear()

    def err(self, name: str, msg: str) -> HFFormatError:
        return HFFormatError(f"{self.where.get(name, self.source)}: tensor {name!r} {msg}")


# ---------------------------------------------------------------------------------------------
# load_hf
# ---------------------------------------------------------------------------------------------


def _proj_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    return {
        "self_attn.q_proj": (cfg.n_heads * hd, d), "self_attn.k_proj": (cfg.kv_heads * hd, d),
        "self_attn.v_proj": (cfg.kv_heads * hd, d), "self_attn.o_proj": (d, cfg.n_heads * hd),
        "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
    }


def _float_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every non-projection tensor and its shape."""
    d = cfg.d_model
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        out[p + "self_attn.attn_sub_norm.weight"] = (cfg.n_heads * cfg.head_dim,)
        out[p + "mlp.ffn_sub_norm.weight"] = (cfg.ffn_dim,)
    return out


def _read_float(src: _Tensors, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    code, got = src.info(name)
    if code not in _FLOAT_CODES:
        hint = " (packed weights need a 'bitnet' quantization_config in config.json)" if code == "U8" else ""
        raise src.err(name, f"has dtype {code}; expected a float dtype{hint}")
    if tuple(got) != tuple(shape):
        raise src.err(name, f"has shape {got}; config.json implies {list(shape)}")
    t = src.get(name)
    if not bool(torch.isfinite(t).all()):
        raise src.err(name, "contains inf or nan")
    return t.to(dtype)


def _read_ternary(src: _Tensors, name: str, out: int, inp: int, linear_class: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T int8 [out, in], s float32 (1,)) from a packed (or already unpacked ternary) projection."""
    wname, sname = name + ".weight", name + ".weight_scale"
    code, shape = src.info(wname)
    if code in ("U8", "I8"):  # transformers casts int8-stored packs to uint8 (same bits)
        if shape != [(out + 3) // 4, inp]:
            raise src.err(wname, f"has packed shape {shape}; config.json implies [{(out + 3) // 4}, {inp}] "
                                 f"(ceil({out}/4) rows of 4 ternary values)")
        packed = src.get(wname)
        try:
            t = unpack_ternary_hf(packed.view(torch.uint8), out)
        except ValueError as e:
            raise src.err(wname, str(e)) from None
    elif code in _FLOAT_CODES and shape == [out, inp]:  # autobitlinear offline also accepts unpacked T
        w = src.get(wname).float()
        if not bool(((w == -1) | (w == 0) | (w == 1)).all()):
            raise src.err(wname, "is a float tensor in an offline-quantised checkpoint but not ternary")
        t = w.to(torch.int8)
    else:
        raise src.err(wname, f"has dtype {code} and shape {shape}; quantization_config says packed: expected "
                             f"uint8 [{(out + 3) // 4}, {inp}]")
    scode, sshape = src.info(sname)
    if scode not in _FLOAT_CODES or math.prod(sshape) != 1:
        raise src.err(sname, f"has dtype {scode} and shape {sshape}; expected one float")
    s = hf_scale_to_absmean(src.get(sname), linear_class)
    if not (bool(torch.isfinite(s).all()) and float(s) > 0):
        raise src.err(sname, f"gives the non-positive or non-finite absmean {float(s)!r}")
    return t, s


def assemble_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], frozen: dict[str, nn.Module], source: str,
                   error: type[ValueError]) -> BitNetModel:
    """A ``BitNetModel`` built on the meta device (no init, no memory) with ``frozen`` modules
    swapped in and every tensor of ``sd`` assigned (strict); shared by the HF and GGUF loaders."""
    with torch.device("meta"):
        model = BitNetModel(cfg)  # shapes only: no random init, no memory
    for name, mod in frozen.items():
        model.set_submodule(name, mod)
        for k, v in mod.state_dict().items():
            sd[f"{name}.{k}"] = v
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # would mean a bitlm module with state this loader does not know about
        raise error(f"{source}: no data for {leftover[0]!r}")
    return model.eval()


def load_hf(folder: str | Path, quant: str | None = None, *, dtype: torch.dtype = torch.float32) -> BitNetModel:
    """Load a local BitNetForCausalLM folder as a :class:`~bitlm.model.BitNetModel` (eval mode).

    ``quant`` chooses the projection modules:

      * None (default): what transformers computes.  Packed checkpoints →
        :class:`FrozenTernaryLinear` (exactly the stored T and s); master weights with an
        ``online`` quantization_config → trainable ``BitLinear`` b1.58 (ready for QAT); a folder
        *without* quantization_config → plain ``nn.Linear`` ("fp"), because transformers runs
        such a folder (e.g. its own BitNet test configs) with float linear layers.
      * "b1.58": trainable ``BitLinear`` everywhere; packed weights become latents
        (s/p)·T (:func:`ternary_latent`) that re-quantise to the stored T and s, and the float
        weights of a folder without quantization_config are read as b1.58 latent weights.
      * "fp": plain ``nn.Linear`` (packed weights dequantised to s·T, activations unquantised).
      * "b1": binary ``BitLinear`` — master-weight folders only.

    A folder without quantization_config says which reading it got with a ``UserWarning``.
    The folder is recorded as ``model.hf_folder`` (tokenizer files stay there), the raw config as
    ``model.hf_config`` and what it stored as ``model.hf_source`` (:class:`HFSource`, used by
    :func:`save_hf`).  Raises :class:`HFFormatError` naming the file and tensor.
    """
    folder = Path(folder)
    if quant not in (None, "fp", "b1", "b1.58"):
        raise ValueError(f"quant must be None, 'fp', 'b1' or 'b1.58', got {quant!r}")
    hc = read_hf_config(folder)
    cfg_path = folder / "config.json"
    if not hc.quantized:
        if quant is None:
            quant = "fp"
            warnings.warn(f"{cfg_path}: no quantization_config: loading the float weights unquantised (quant='fp'), "
                          "as transformers computes this folder; load_hf(..., quant='b1.58') reads them as b1.58 "
                          "latent weights instead", stacklevel=2)
        elif quant != "fp":
            warnings.warn(f"{cfg_path}: no quantization_config: reading the float weights as {quant} latent weights "
                          f"(quant={quant!r}); transformers runs this folder unquantised", stacklevel=2)
    try:
        cfg = ModelConfig(**hc.model, quant=quant or "b1.58")
    except ValueError as e:
        raise HFFormatError(f"{cfg_path}: {e}") from None
    if hc.packed and quant == "b1":
        raise HFFormatError(f"{cfg_path}: a ternary (packed) checkpoint cannot be loaded as binary b1 weights")

    src = _Tensors(folder)
    try:
        return _load(folder, hc, cfg, src, quant, dtype)
    finally:
        src.close()


def _load(folder: Path, hc: HFConfig, cfg: ModelConfig, src: _Tensors, quant: str | None,
          dtype: torch.dtype) -> BitNetModel:
    floats = _float_shapes(cfg)
    projs = _proj_shapes(cfg)
    expected = set(floats)
    for i in range(cfg.n_layers):
        for proj in PROJECTIONS:
            expected.add(f"model.layers.{i}.{proj}.weight")
            if hc.packed:
                expected.add(f"model.layers.{i}.{proj}.weight_scale")
    present = src.names()
    missing = sorted(expected - present)
    if missing:
        raise HFFormatError(f"{src.source}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    # A tied folder may still carry a copy of the embedding as lm_head (transformers ignores it).
    extra = sorted(n for n in present - expected
                   if not n.endswith(_IGNORABLE_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise src.err(extra[0], f"is unexpected ({len(extra)} unexpected tensors; config.json describes "
                                f"{cfg.n_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")

    sd: dict[str, torch.Tensor] = {n: _read_float(src, n, shape, dtype) for n, shape in floats.items()}
    frozen: dict[str, FrozenTernaryLinear] = {}
    scales: list[tuple[str, float]] = []
    # What save_hf needs to write the folder back unchanged: every float tensor's stored dtype
    # and the stored weight_scale values (fl(1/r) is not injective, so s alone may not give r back).
    source_dtypes = {n: _CODE_DTYPE[src.info(n)[0]] for n in sorted(expected) if src.info(n)[0] in _CODE_DTYPE}
    raw_scales: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        for proj, (out, inp) in projs.items():
            name = f"model.layers.{i}.{proj}"
            if not hc.packed:
                sd[name + ".weight"] = _read_float(src, name + ".weight", (out, inp), dtype)
            else:
                t, s = _read_ternary(src, name, out, inp, hc.linear_class)
                scales.append((name, float(s)))
                raw_scales[name + ".weight_scale"] = src.get(name + ".weight_scale").reshape(1).clone()
                if quant is None:
                    frozen[name] = FrozenTernaryLinear.from_ternary(t, s, dtype)
                    continue
                sd[name + ".weight"] = ternary_latent(t, s, dtype) if quant == "b1.58" else (t.float() * s).to(dtype)
            if cfg.quant != "fp":
                sd[name + ".quant_lambda"] = torch.tensor(1.0)
    if hc.packed:
        _check_scales(scales, hc.linear_class, src.source)
    model = assemble_model(cfg, sd, frozen, src.source, HFFormatError)
    model.hf_folder = folder
    model.hf_config = hc.raw
    model.hf_source = HFSource(dtypes=source_dtypes, weight_scales=raw_scales,
                               linear_class=(hc.linear_class or "bitlinear") if hc.packed else None)
    return model


# ---------------------------------------------------------------------------------------------
# save_hf
# ---------------------------------------------------------------------------------------------


def _export_check(name: str, m: nn.Module, weight_groups_ok: bool = False) -> None:
    """HF's layers quantise activations per token to int8 absmax, one weight scale per tensor
    (``weight_groups_ok``: the caller's format holds weight groups, GGUF TQ)."""
    if getattr(m, "bias", None) is not None:
        raise ValueError(f"{name}: projections with bias cannot be saved as BitNetForCausalLM")
    if not isinstance(m, BitLinear):
        return
    if m.weight_groups != 1 and not weight_groups_ok:
        raise ValueError(f"{name}: weight_groups={m.weight_groups} (weight_group_dim={m.weight_group_dim!r}): the HF "
                         "BitNet format holds one weight scale per tensor; export with requantize=True "
                         "(bitlm export --requantize) to re-quantise to one scale and report the validation loss change")
    got = (m.act_bits, m.act_granularity_eval, m.act_groups, m.norm, 1 if weight_groups_ok else m.weight_groups)
    if got != (8, "token", 1, None, 1):  # inference: eval granularity
        raise ValueError(f"{name}: (act_bits, act_granularity_eval, act_groups, norm, weight_groups)={got}; the HF BitNet "
                         "format computes (8, 'token', 1, None, 1)")


def _ternary_of(name: str, m: nn.Module, weight_groups_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if not hasattr(m, "quantized_weight"):
        raise ValueError(f"{name}: {type(m).__name__} has no quantized weight (an fp model: use packed=False)")
    if isinstance(m, BitLinear) and m.weight_quant == "fp":
        raise ValueError(f"{name}: BitLinear with weight_quant='fp' cannot be packed (use packed=False)")
    t, s = m.quantized_weight()
    if s.numel() != 1 and not weight_groups_ok:
        raise ValueError(f"{name}: {s.numel()} weight groups; the HF BitNet format has one scale per tensor")
    return t, s.reshape(-1).float()


def hf_config_dict(cfg: ModelConfig, *, packed: bool, linear_class: str, dtype: torch.dtype,
                   bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json for ``cfg``: readable by transformers 5.x (rope_parameters, dtype) and 4.x
    (rope_theta, torch_dtype)."""
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": _ARCH_TO_ACT[cfg.arch],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if packed:
        out["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                      "quantization_mode": "offline"}
    elif cfg.quant != "fp":  # master weights that transformers must ternarise in every forward
        out["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "online"}
    return out


def save_hf(
    model: BitNetModel,
    folder: str | Path,
    packed: bool = True,
    linear_class: str | None = None,
    dtype: torch.dtype | None = None,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write ``model`` as a BitNetForCausalLM folder that transformers loads; returns the folder.

    ``packed=True``: every projection as uint8 [ceil(out/4), in] + ``weight_scale`` in the
    ``linear_class`` convention (``"bitlinear"``: 1/s, transformers' default class, which
    unpacks in every forward; ``"autobitlinear"``: s, 2B4T's choice, unpacked once at load), and
    ``quantization_mode: offline``.  ``packed=False``: float master weights; b1.58 models get an
    ``autobitlinear``/``online`` quantization_config so transformers ternarises them as bitlm
    does (``linear_class`` is then ignored), fp models get none.

    ``dtype=None`` (default) is lossless: every tensor is stored in the dtype the model carries
    (float32 for bitlm-trained models), or, for a model loaded by :func:`load_hf`, in the dtype the
    source folder stored it in (``model.hf_source``), so HF → bitlm → HF gives back the same
    tensors.  A float ``dtype`` (e.g. ``torch.bfloat16``, as Microsoft's release) stores
    embeddings, norms, lm_head, float weights and scales in it.  ``linear_class=None``: the loaded
    folder's class, else ``"bitlinear"``.  ``tokenizer``: a ``tokenizers.Tokenizer``, an object with
    ``save_pretrained``, or a path to a tokenizer file / folder to copy.  The folder is written
    to a temp sibling and renamed into place (an existing folder is replaced).
    """
    cfg = model.config
    require_bitnet_graph(cfg, "Hugging Face BitNetForCausalLM")
    if cfg.arch not in _ARCH_TO_ACT:
        raise ValueError(f"arch {cfg.arch!r} cannot be saved as BitNetForCausalLM (LayerNorm/GELU graph); "
                         f"only {', '.join(_ARCH_TO_ACT)} can")
    source: HFSource | None = getattr(model, "hf_source", None)
    if linear_class is None:
        linear_class = (source.linear_class if source is not None else None) or "bitlinear"
    _scale_multiplies(linear_class)  # validates the name
    if cfg.rope_scaling:
        raise ValueError(f"rope_scaling {cfg.rope_scaling.get('rope_type')!r} (scaled RoPE frequencies) cannot be "
                         "saved as BitNetForCausalLM by bitlm; only plain RoPE models can")
    if packed and cfg.quant == "fp":
        raise ValueError("an fp model has no ternary weights to pack; use packed=False")
    if not packed and cfg.quant == "b1":
        raise ValueError("binary (b1) models must be saved packed: transformers' online mode ternarises")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a float dtype, got {dtype}")

    def store_dtype(name: str, carried: torch.dtype) -> torch.dtype:
        """``dtype`` if given, else the source folder's dtype of ``name``, else the model's."""
        if dtype is not None:
            return dtype
        return source.dtypes.get(name, carried) if source is not None else carried

    def scale_tensor(name: str, s: torch.Tensor, carried: torch.dtype) -> torch.Tensor:
        sdt = store_dtype(name, carried)
        raw = source.weight_scales.get(name) if source is not None and source.linear_class == linear_class else None
        if raw is not None and raw.dtype == sdt and torch.equal(hf_scale_to_absmean(raw, linear_class), s.reshape(1)):
            return raw  # the stored value itself (several r can share fl(1/r) = s)
        return absmean_to_hf_scale(s, linear_class, sdt)
    if packed and any(out % 4 for out, _ in _proj_shapes(cfg).values()):
        raise ValueError("transformers' packed layers need every projection's out_features divisible by 4")

    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if name.startswith("model.layers.") and any(f".{proj}." in name for proj in PROJECTIONS):
            continue  # projections below
        if name.startswith(("model.", "lm_head.")) and name.endswith(".weight"):
            tensors[name] = p.detach().to(store_dtype(name, p.dtype)).contiguous()
    warm = []
    for i in range(cfg.n_layers):
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.{proj}"
            m = model.get_submodule(name)
            _export_check(name, m)
            lam = getattr(m, "quant_lambda", None)
            if lam is not None and float(lam) != 1.0:
                warm.append(name)
            wdt = store_dtype(name + ".weight", m.weight.dtype)
            if packed:
                t, s = _ternary_of(name, m)
                tensors[name + ".weight"] = pack_ternary_hf(t)
                tensors[name + ".weight_scale"] = scale_tensor(name + ".weight_scale", s, m.weight.dtype)
            elif isinstance(m, FrozenTernaryLinear):  # s·T would re-quantise to s·p: store a latent
                t, s = m.quantized_weight()
                tensors[name + ".weight"] = ternary_latent(t, s, wdt)
            else:
                tensors[name + ".weight"] = m.weight.detach().to(wdt).contiguous()
    if warm:
        warnings.warn(f"{len(warm)} projections (first: {warm[0]}) have quant_lambda < 1 (warm-up not finished); "
                      "the saved model is fully quantised", stacklevel=2)

    config = hf_config_dict(cfg, packed=packed, linear_class=linear_class, dtype=tensors["model.embed_tokens.weight"].dtype,
                            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        _write_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
    return folder


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None) -> None:
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():  # greedy, in state-dict order; a big tensor gets its own shard
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(tokenizer: Any, folder: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        p = Path(tokenizer)
        if p.is_file():
            # bitlm's single-file models keep "<name>.tokenizer.json" beside them
            shutil.copy2(p, folder / ("tokenizer.json" if p.name.endswith("tokenizer.json") else p.name))
            return
        files = [p / f for f in TOKENIZER_FILES if (p / f).is_file()] if p.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{p}: no tokenizer file found ({', '.join(TOKENIZER_FILES[:2])}, ...)")
        for f in files:
            shutil.copy2(f, folder / f.name)
    elif hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer
        tokenizer.save_pretrained(str(folder))
    elif hasattr(tokenizer, "save"):  # a tokenizers.Tokenizer
        tokenizer.save(str(folder / "tokenizer.json"))
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
