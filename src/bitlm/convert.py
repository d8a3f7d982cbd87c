"""Pretrained LLaMA-family checkpoints → BitNet b1.58 models for quantisation-aware fine-tuning.

The recipe (training-anchors a.3, c.8):

  1. *Replace every Linear of attention and SwiGLU by BitLinear* (the FAQ's conversion recipe) —
     here by building a ``bitnet-b1.58`` :class:`~bitlm.model.BitNetModel` (LLaMA-alike: RMSNorm
     pre-norms, SwiGLU, RoPE rotate_half, GQA) and **copying** every pretrained tensor into it:
     embeddings, norms, q/k/v/o, gate/up/down, head.  Peers that re-initialise (kyegomez) throw the
     pretrained model away; :func:`convert_llama` is a copy, checked tensor by tensor in the tests.
  2. *The norms BitLinear needs.*  BitNet wants every BitLinear input RMS-normalised.  For q/k/v
     and gate/up the LLaMA pre-norms already are that norm (the FAQ removes them only because its
     BitLinear carries its own).  o_proj and down_proj have no norm in LLaMA; bitlm's architecture
     has the SubLN sites ``attn_sub_norm`` / ``ffn_sub_norm`` there.  An RMSNorm at those sites
     rescales every token's input by g/rms(x): ``o_proj(RMSNorm(a)) = o_proj(a)·(g/rms(a))`` for
     scalar g — a per-token factor that no choice of weights can undo, so *with* sub-norms the
     float function is no longer the pretrained one.  Two choices (``sub_norms=``):

       * ``"identity"`` (default, exact): ``ModelConfig.sub_norm=False`` puts ``nn.Identity`` at
         both sites.  With λ = 0 (or ``quant="fp"``) the converted model *is* the pretrained model
         (logits equal to fp32 rounding, tested against transformers).  Nothing is lost for the
         quantiser: per-token absmax int8 is scale-invariant per token (quant(c·x) = c·quant(x)),
         so a norm before o_proj/down_proj changes only the output scale, not which values
         round where.  What identity gives up is the SubLN variance control of from-scratch
         training (2310.11453 Eq. 7-10) and export to HF ``BitNetForCausalLM``, whose graph always
         has the sub-norms.
       * ``"rmsnorm"``: the papers' graph (sub-norms present).  Their weights start at g = c·1 with
         c the mean per-token RMS of that site's input measured on ``calibration`` tokens with the
         original function (c = 1 without calibration data).  That is the least-squares scalar
         for ``c/rms(a) ≈ 1`` when the output norm grows with the input's, so tokens of typical
         magnitude are reproduced and the error is the spread of rms(a) around its mean.

     Measured on the tests' pre-trained tiny Llama (val loss; fp original 0.936): identity λ=0
     0.936 (exact), λ=1 1.312; rmsnorm uncalibrated λ=0 2.677, λ=1 2.501; rmsnorm calibrated λ=0
     0.987, λ=1 1.215.  After 60 QAT steps all three reach 0.923-0.926.

  3. *Warm-up quantisation* (HF "Fine-tuning LLMs to 1.58bit"): naive ternarisation of a pretrained
     model starts at the loss of a random one; ramping λ in ``x + λ·(q(x) − x).detach()`` from 0 to 1
     lets the model adapt gradually.  ``bitlm.layers.lambda_schedule`` gives the blog's ramps and
     ``TrainConfig.quant_warmup`` / ``quant_warmup_steps`` apply them in ``bitlm.train``.  (The blog
     saw little benefit at SmolLM-135M scale; on the tests' tiny model a linear warm-up and none end
     within 0.005 of each other after 60 steps.  It is meant for large pretrained models.)

Supported folders: ``LlamaForCausalLM``, ``MistralForCausalLM`` (same graph; a sliding window
caps ``max_seq_len`` at the window, where full causal attention is identical) and
``Qwen2ForCausalLM`` (q/k/v biases → ``ModelConfig.qkv_bias``).  config.json + safetensors (single
file or sharded); pickled ``.bin`` files are refused (loading them could run code).  Refused with a
one-line error naming the field: RoPE scaling other than Llama 3.1's ``llama3`` (which is
computed: ``ModelConfig.rope_scaling``), head_dim ≠ hidden/heads, o_proj/MLP biases, a
non-SiLU activation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import QUANTS, ModelConfig, check_rope_scaling
from .io.hf import HFFormatError, _read_float, _Tensors
from .layers import LAMBDA_SCHEDULES, BitLinear, lambda_schedule  # re-exported: the schedule lives in layers
from .model import BitNetModel, RMSNorm

__all__ = [
    "ConvertError",
    "SUPPORTED_ARCHITECTURES",
    "SUB_NORMS",
    "LAMBDA_SCHEDULES",
    "is_llama_family",
    "read_llama_config",
    "convert_llama",
    "calibrate_sub_norms",
    "lambda_schedule",
    "add_arguments",
    "run",
]

#: HF architecture class → model_type; all three compute the LLaMA graph (Qwen2 adds q/k/v biases).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUB_NORMS = ("identity", "rmsnorm")
# Tensors some writers add that carry no information (RoPE tables are recomputed).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
# transformers' class defaults where config.json omits a field (LlamaConfig / MistralConfig / Qwen2Config)
_DEFAULT_MAX_POS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


class ConvertError(HFFormatError):
    """A folder that cannot be converted: not LLaMA-family, an unsupported feature, bad tensors."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _family(raw: dict[str, Any]) -> str | None:
    """'llama' / 'mistral' / 'qwen2' when config.json describes one of the supported classes."""
    for arch in raw.get("architectures") or []:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    mt = raw.get("model_type")
    return mt if mt in SUPPORTED_ARCHITECTURES.values() and not raw.get("architectures") else None


def is_llama_family(folder: str | Path) -> bool:
    """Does ``folder/config.json`` describe a Llama / Mistral / Qwen2 causal LM?  (False when
    config.json is missing or unreadable: the caller's own loader reports that.)"""
    try:
        return _family(_read_json(Path(folder) / "config.json")) is not None
    except ConvertError:
        return False


def _get(raw: dict, key: str, typ: type | tuple, path: Path, default: Any = ...) -> Any:
    """raw[key] checked against ``typ`` (bools are not ints); null → default."""
    v = raw.get(key)
    if v is None:
        if default is ...:
            raise ConvertError(f"{path}: missing field {key!r}")
        return default
    numeric = typ in (int, float, (int, float))
    if not isinstance(v, typ) or (numeric and isinstance(v, bool)):
        raise ConvertError(f"{path}: field {key!r} has the wrong type ({type(v).__name__}: {v!r})")
    return v


def read_llama_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ModelConfig fields, raw config.json)`` for a Llama / Mistral / Qwen2 folder.

    Mapping: hidden_size → d_model, intermediate_size → d_ff, num_hidden_layers → n_layers,
    num_attention_heads → n_heads, num_key_value_heads (null → MHA) → n_kv_heads, vocab_size,
    max_position_embeddings → max_seq_len (capped by an active sliding window), rms_norm_eps →
    norm_eps, RoPE θ from ``rope_parameters.rope_theta`` (transformers 5.x) or ``rope_theta`` (4.x;
    default 10000), ``rope_type: llama3`` parameters (either spelling) → rope_scaling, tie_word_embeddings (class default false), initializer_range → init_std.
    Raises :class:`ConvertError` naming config.json and the field for anything the LLaMA graph of
    bitlm does not compute.
    """
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    family = _family(raw)
    if family is None:
        what = ", ".join(map(str, raw.get("architectures") or [])) or f"model_type {raw.get('model_type')!r}"
        raise ConvertError(f"{path}: unsupported architecture {what}; bitlm converts "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)} (BitNetForCausalLM folders load with bitlm.io.hf)")
    act = _get(raw, "hidden_act", str, path, "silu")
    if act not in ("silu", "swish"):
        raise ConvertError(f"{path}: hidden_act {act!r} is not supported (the LLaMA graph is SwiGLU: silu)")
    if family == "llama" and raw.get("attention_bias"):
        raise ConvertError(f"{path}: attention_bias=true is not supported (it biases o_proj too; bitlm supports "
                           "q/k/v biases only, as in Qwen2)")
    if raw.get("mlp_bias"):
        raise ConvertError(f"{path}: mlp_bias=true is not supported (bitlm's MLP projections have no bias)")

    theta, rope_scaling = _read_rope(raw, path)

    d = _get(raw, "hidden_size", int, path)
    heads = _get(raw, "num_attention_heads", int, path)
    head_dim = raw.get("head_dim")
    if head_dim is not None and (d % heads or head_dim != d // heads):
        raise ConvertError(f"{path}: head_dim={head_dim} != hidden_size/num_attention_heads={d}/{heads} "
                           "is not supported")
    max_pos = _get(raw, "max_position_embeddings", int, path, _DEFAULT_MAX_POS[family])
    # A sliding window changes attention only for sequences longer than the window: capping
    # max_seq_len there keeps the converted model exact on everything it accepts.
    sliding = raw.get("sliding_window") if (family == "mistral" or raw.get("use_sliding_window")) else None
    if sliding is not None:
        sliding = _get(raw, "sliding_window", int, path)
        max_pos = min(max_pos, sliding)
    model = dict(
        arch="bitnet-b1.58",
        vocab_size=_get(raw, "vocab_size", int, path),
        d_model=d,
        d_ff=_get(raw, "intermediate_size", int, path),
        n_layers=_get(raw, "num_hidden_layers", int, path),
        n_heads=heads,
        n_kv_heads=_get(raw, "num_key_value_heads", int, path, heads),
        max_seq_len=max_pos,
        rope_theta=float(theta),
        norm_eps=float(_get(raw, "rms_norm_eps", (int, float), path, 1e-6)),
        tie_embeddings=_get(raw, "tie_word_embeddings", bool, path, False),
        init_std=float(_get(raw, "initializer_range", (int, float), path, 0.02)),
        qkv_bias=family == "qwen2",
        rope_scaling=rope_scaling,
    )
    return model, raw


def _read_rope(raw: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """(θ, ModelConfig.rope_scaling) from ``rope_parameters`` (transformers 5.x) or ``rope_theta`` +
    ``rope_scaling`` (4.x).  Plain RoPE and Llama 3.1's "llama3" scaling are computed; the other
    types (linear/dynamic/yarn/longrope) change the frequencies differently and are refused."""
    theta = _get(raw, "rope_theta", (int, float), path, 10000.0)  # RotaryEmbeddingConfigMixin.default_theta
    # transformers 5.x: a non-empty legacy rope_scaling replaces rope_parameters (convert_rope_params_to_dict)
    field = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(field)
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise ConvertError(f"{path}: field {field!r} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = _get(params, "rope_theta", (int, float), path, theta)
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConvertError(f"{path}: {field}.rope_type {rope_type!r} is not supported (plain RoPE and llama3 only; "
                           "linear/dynamic/yarn/longrope scaling change the frequencies differently)")
    scaling: dict[str, Any] = {"rope_type": "llama3"}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        scaling[k] = _get(params, k, (int, float), path)
    # transformers' fallback (standardize_rope_params): the model's own max_position_embeddings
    default_orig = raw.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    scaling["original_max_position_embeddings"] = _get(params, "original_max_position_embeddings", int, path,
                                                       default_orig if default_orig is not None else ...)
    try:
        check_rope_scaling(scaling)
    except ValueError as e:
        raise ConvertError(f"{path}: {field}: {e}") from None
    return float(theta), scaling


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA-family folder must hold for ``cfg`` (HF names = bitlm names)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    proj = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for name, shape in proj.items():
            out[f"{p}{name}.weight"] = shape
        if cfg.qkv_bias:
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                out[f"{p}{name}.bias"] = (proj[name][0],)
    return out


def convert_llama(
    folder: str | Path,
    *,
    quant: str | None = "b1.58",
    sub_norms: str = "identity",
    dtype: torch.dtype = torch.float32,
    quant_lambda: float = 1.0,
    calibration: torch.Tensor | None = None,
) -> BitNetModel:
    """A local Llama / Mistral / Qwen2 folder as a ``bitnet-b1.58`` :class:`BitNetModel` (eval mode).

    Args:
        quant: "b1.58" (default; None means the same), "b1" or "fp" — the projection modules.
        sub_norms: "identity" (exact: the float function of the converted model is the original's)
            or "rmsnorm" (the papers' SubLN graph; see the module docstring).
        dtype: parameter dtype (upcasting bf16/fp16 → fp32 is exact, so weights stay bit-equal).
        quant_lambda: initial λ of every BitLinear (1 = fully quantised; 0 = the float model).
            ``bitlm train`` overwrites it at every step when ``quant_warmup`` is set.
        calibration: token ids (B, T) for ``sub_norms="rmsnorm"``: sets each sub-norm's weight to
            the mean RMS of its input under the original function (:func:`calibrate_sub_norms`).

    The folder is recorded as ``model.hf_folder`` (its tokenizer stays there) and the raw config as
    ``model.hf_config``.  Raises :class:`ConvertError` naming the file and the field or tensor.
    """
    folder = Path(folder)
    quant = quant or "b1.58"
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if sub_norms not in SUB_NORMS:
        raise ValueError(f"sub_norms must be one of {', '.join(SUB_NORMS)}, got {sub_norms!r}")
    if not 0.0 <= quant_lambda <= 1.0:
        raise ValueError(f"quant_lambda must be in [0, 1], got {quant_lambda}")
    if calibration is not None and sub_norms != "rmsnorm":
        raise ValueError("calibration data is only used with sub_norms='rmsnorm'")
    fields, raw = read_llama_config(folder)
    try:
        cfg = ModelConfig(**fields, quant=quant, sub_norm=sub_norms == "rmsnorm")
    except ValueError as e:
        raise ConvertError(f"{folder / 'config.json'}: {e}") from None

    expected = _expected_shapes(cfg)
    try:
        sd = _read_tensors(folder, cfg, expected, dtype)
    except ConvertError:
        raise
    except HFFormatError as e:  # the shared safetensors reader's errors (they name file and tensor)
        raise ConvertError(str(e)) from None

    if cfg.sub_norm:  # start at g = 1; calibration below replaces it
        for i in range(cfg.n_layers):
            sd[f"model.layers.{i}.self_attn.attn_sub_norm.weight"] = torch.ones(cfg.n_heads * cfg.head_dim, dtype=dtype)
            sd[f"model.layers.{i}.mlp.ffn_sub_norm.weight"] = torch.ones(cfg.ffn_dim, dtype=dtype)
    if cfg.quant != "fp":
        for i in range(cfg.n_layers):
            for proj in _PROJ:
                sd[f"model.layers.{i}.{proj}.quant_lambda"] = torch.tensor(float(quant_lambda))
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]

    with torch.device("meta"):
        model = BitNetModel(cfg)  # shapes only: no random init, no memory
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a bitlm module with state this converter does not know about
        raise ConvertError(f"{folder}: no data for {leftover[0]!r}")
    model.eval()
    model.hf_folder = folder
    model.hf_config = raw
    if calibration is not None:
        calibrate_sub_norms(model, calibration)
    return model


def _read_tensors(folder: Path, cfg: ModelConfig, expected: dict[str, tuple[int, ...]],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every expected tensor, checked for presence, shape, dtype and finiteness; nothing extra."""
    src = _Tensors(folder)
    try:
        present = src.names()
        missing = sorted(set(expected) - present, key=_natural)
        if missing:
            raise ConvertError(f"{src.source}: missing tensor {missing[0]!r} ({len(missing)} missing; "
                               f"config.json describes {cfg.n_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")
        # A tied folder may still carry a copy of the embedding as lm_head (transformers ignores it).
        extra = sorted((n for n in present - set(expected) if not n.endswith(_IGNORABLE_SUFFIXES)
                        and not (cfg.tie_embeddings and n == "lm_head.weight")), key=_natural)
        if extra:
            raise src.err(extra[0], f"is unexpected ({len(extra)} unexpected; bitlm converts the plain LLaMA "
                                    "graph: no o_proj/MLP biases, no extra modules)")
        return {name: _read_float(src, name, shape, dtype) for name, shape in expected.items()}
    finally:
        src.close()


def _natural(name: str) -> tuple:
    """Sort key putting layer 2 before layer 10, so 'the first missing tensor' is the first in the file."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split("."))


@torch.no_grad()
def calibrate_sub_norms(model: BitNetModel, tokens: torch.Tensor) -> dict[str, float]:
    """Set every sub-norm weight to c·1, c = mean per-token RMS of the norm's input measured with the
    sub-norms bypassed and λ = 0 (i.e. under the original float function).  Returns {norm: c}.

    Why c: the norm maps a ↦ a·g/rms(a); with g = c the output equals the original input for a
    token of RMS c, and c = mean rms is the least-squares scalar when ‖W a‖ grows like rms(a).
    """
    sites = [(n, m) for n, m in model.named_modules() if n.endswith(("attn_sub_norm", "ffn_sub_norm"))]
    if not sites or not all(isinstance(m, RMSNorm) for _, m in sites):
        raise ValueError("calibrate_sub_norms needs a model with RMSNorm sub-norms (sub_norms='rmsnorm')")
    stats: dict[str, list[float]] = {n: [0.0, 0] for n, _ in sites}
    bitlinears = [m for m in model.modules() if isinstance(m, BitLinear)]
    saved_lam = [m.quant_lambda.clone() for m in bitlinears]
    was = model.training
    model.eval()
    try:
        for m in bitlinears:
            m.quant_lambda.fill_(0.0)  # λ = 0: the float function
        for name, _norm in sites:
            parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(parent, attr, _RmsProbe(stats[name]))
        model(tokens)
    finally:
        for name, norm in sites:
            parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(parent, attr, norm)
        for m, lam in zip(bitlinears, saved_lam):
            m.quant_lambda.copy_(lam)
        model.train(was)
    out = {}
    for name, norm in sites:
        total, n = stats[name]
        c = total / max(n, 1)
        norm.weight.fill_(c)
        out[name] = c
    return out


class _RmsProbe(nn.Module):
    """Identity that accumulates Σ rms(x) and the token count (calibration only)."""

    def __init__(self, acc: list) -> None:
        super().__init__()
        self.acc = acc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean(-1).sqrt()  # (B, T)
        self.acc[0] += float(rms.sum())
        self.acc[1] += rms.numel()
        return x


# ---------------------------------------------------------------------------------------------
# CLI: bitlm convert
# ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="local Llama / Mistral / Qwen2 folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="bitlm checkpoint folder to write")
    p.add_argument("--quant", choices=QUANTS, default="b1.58")
    p.add_argument("--sub-norms", choices=SUB_NORMS, default="identity",
                   help="identity: exact float function (default); rmsnorm: the papers' SubLN graph")
    p.add_argument("--calibration-text", default=None,
                   help="with --sub-norms rmsnorm: a text file whose tokens calibrate the sub-norm weights")
    p.add_argument("--lambda", dest="quant_lambda", type=float, default=1.0,
                   help="initial warm-up λ stored in the checkpoint (bitlm train --train-set quant_warmup=... "
                        "overrides it per step)")
    p.add_argument("--tokenizer-from", default=None,
                   help="folder or tokenizer.json to store with the checkpoint (default: the model folder's, if any)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def run(args) -> int:
    from .data import load_tokenizer
    from .io.checkpoint import save_checkpoint

    folder = Path(args.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: " + ("a file, not a Hugging Face model folder" if folder.exists()
                                                  else "no such folder"))
    tok_src = Path(args.tokenizer_from) if args.tokenizer_from else folder
    tokenizer = None
    if args.tokenizer_from or (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_src)
    if args.calibration_text and (tokenizer is None or args.sub_norms != "rmsnorm"):
        raise ValueError("--calibration-text needs --sub-norms rmsnorm and a tokenizer (--tokenizer-from)")
    if args.calibration_text and not Path(args.calibration_text).is_file():  # before the conversion, not after
        raise FileNotFoundError(f"{args.calibration_text}: no such file (--calibration-text)")
    model = convert_llama(folder, quant=args.quant, sub_norms=args.sub_norms, dtype=getattr(torch, args.dtype),
                          quant_lambda=args.quant_lambda)
    if args.calibration_text:
        ids = tokenizer.encode(Path(args.calibration_text).read_text(encoding="utf-8"))
        n = min(len(ids), model.config.max_seq_len, 2048)
        if n < 2:
            raise ValueError(f"{args.calibration_text}: too little text to calibrate ({len(ids)} tokens)")
        calibrate_sub_norms(model, torch.tensor(ids[:n], dtype=torch.long)[None])  # (1, T)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    out = save_checkpoint(model, args.out, tokenizer=tokenizer,
                          extra={"converted_from": {"folder": str(folder.resolve()),
                                                    "architectures": model.hf_config.get("architectures"),
                                                    "sub_norms": args.sub_norms}})
    c = model.config
    print(f"converted {folder} → {out}: {c.n_layers} layers, d={c.d_model}, ffn={c.ffn_dim}, heads={c.n_heads}/"
          f"{c.kv_heads}, vocab={c.vocab_size}, quant={c.quant}, sub-norms={args.sub_norms}, "
          f"tokenizer={'yes' if tokenizer is not None else 'none'}; fine-tune with: bitlm train --init-from {out} "
          "--train-set quant_warmup=linear --train-set quant_warmup_steps=100")
    return 0
