"""bitlm's packed kernels inside transformers: every BitNet projection of a loaded transformers
model (``BitLinear`` / ``AutoBitLinear`` from ``transformers.integrations.bitnet``) swapped in
place for :class:`BitlmLinear`, an ``nn.Module`` backed by a packed i2 weight and the native
kernels.  The model stays a transformers model: ``generate``, ``model(input_ids)``, the cache
classes, ``GenerationConfig`` and pipelines are untouched; only the projections change.

Two entry points:

* ``accelerate(model)`` — swap a model already loaded by ``from_pretrained`` (either
  ``weight_scale`` convention, offline-packed or online-quantised).  Everything is checked and
  packed first; if any projection cannot be represented, ``BitlmIntegrationError`` names it and
  the model is left untouched.
* ``BitlmConfig`` — a quantization method registered with transformers' public hooks
  (``register_quantization_config`` / ``register_quantizer``, method name ``"bitlm"``):
  ``from_pretrained(path, quantization_config=BitlmConfig())`` loads the projections as
  transformers' BitNet layers would, then swaps them.  transformers keeps a checkpoint's own
  ``quantization_config`` when one is stored (a different method raises), so for a
  pre-quantized BitNet checkpoint pass ``config=BitlmConfig.model_config(path)`` as well (or
  call :func:`from_pretrained`).

What a swapped projection computes (transformers' three layer kinds, in their own words):

* ``BitLinear`` (``linear_class="bitlinear"``, packed uint8 + ``weight_scale`` that divides):
  ``y = F.linear(q, T) / (weight_scale · a)``;
* ``AutoBitLinear`` offline (``"autobitlinear"``, 2B4T: unpacked T, ``weight_scale``
  multiplies): ``y = F.linear(q / a, T, bias) · weight_scale``;
* ``AutoBitLinear`` online (latent float W): ``β = 1 / mean|W|`` (clamp 1e-5, per tensor),
  ``T = clamp(round(W·β), -1, 1)``, ``y = F.linear(q / a, T / β)``;

each with ``a = 127 / max(max|x|, 1e-5)`` per token and ``q = clamp(round(x·a), -128, 127)``
(round half to even), after the layer's optional ``rms_norm``.  bitlm computes the same
integers ``Σ q·T`` exactly and one float epilogue ``y = float32(Σ q·T) · (s / a)`` with
``s = mean|W|`` (from ``bitlm.io.hf.hf_scale_to_absmean``).  The documented differences are
float rounding only: bitlm's activation scale is ``(1 / max|x|) · 127`` (the kernel's), which
may differ from ``127 / max|x|`` in the last bit and so, rarely, move one ``x·a`` across a
rounding boundary of the int8 quantiser (one activation off by one step); and the epilogue
rounds in its own order (~1e-7 relative).  In a bf16 / fp16 model transformers rounds ``q/a``
and the product to that dtype; bitlm computes in float32 and rounds the output once.

Per decode step the swap also cuts calls: siblings reading one input (q/k/v, gate/up) are one
packed weight and one native call per input (:class:`SharedProjection`; every sibling's rows equal
its own product bit for bit), a bf16 projection is one call from bf16 to bf16
(``kernels.linear_bf16``), and transformers' ``BitNetRMSNorm`` modules become
:class:`BitlmRMSNorm` (one native call; the norm factor may differ in its last bit).

At decode (one new token, batch 1) each decoder layer goes further: :class:`BitlmDecoderLayer`
(the class a swapped ``BitNetDecoderLayer`` takes; same submodules) runs it in two native calls
(``kernels.native.HfLayer``: norm → q/k/v → RoPE; then, after transformers' own cache update and
attention, the rest of the layer), rounding to the model dtype where the per-module path rounds,
so its bits are that path's; prefill, batches and anything unusual stay on the per-module path.

The swapped model is inference-only (no gradient flows to the packed weights) and CPU-only.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import kernels, memory
from ..io.hf import hf_scale_to_absmean, unpack_ternary_hf
from ..kernels import native
from ..packing import TILE_N, PackedWeight, pack_weight

try:  # the integration is useless without transformers: fail at import with the extra named
    import transformers  # noqa: F401
    from transformers.activations import ReLUSquaredActivation
    from transformers.cache_utils import DynamicCache, DynamicLayer
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, replace_with_bitnet_linear
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bitnet.modeling_bitnet import (
        BitNetDecoderLayer,
        BitNetModel,
        eager_attention_forward,
    )
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import BitNetQuantConfig, QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("bitlm.integrations.transformers needs transformers>=5.0 (pip install 'bitlm[transformers]')"
                      ) from e

__all__ = ["BitlmLinear", "BitlmBf16Head", "BitlmRMSNorm", "SharedProjection", "BitlmDecoderLayer", "BitlmIntegrationError", "accelerate", "BitlmConfig", "BitlmHfQuantizer",
           "from_pretrained", "METHOD"]

#: The quantization method name registered with transformers.
METHOD = "bitlm"


class BitlmIntegrationError(ValueError):
    """A projection bitlm cannot represent (the model is left untouched)."""


def _project(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) → (..., N) in x's dtype: a bf16 x in one native call (``kernels.linear_bf16``:
    quantise the exact float32 values, packed matmul, one rounding to bf16), float32 as
    ``quantize_rows`` + ``matmul``, any other dtype through float32."""
    if x.requires_grad:
        x = x.detach()
    if x.dtype == torch.bfloat16:
        return kernels.linear_bf16(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.K)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    q, a = kernels.quantize_rows(x2)
    y = kernels.matmul(q, a, w, bias).view(*lead, w.N)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.cache
def _memcmp():
    try:
        f = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return f


class _Pending:
    """One shared product waiting for its siblings: the input (held, so identity means the same
    tensor), how to tell it was not modified since, the fused output, who has taken its slice.

    Not modified: the tensor's ``_version`` is unchanged; an inference tensor has no version
    counter, so its bytes are compared with a copy taken at compute time (``memcmp`` on glibc,
    ~1 µs for a decode token; ``torch.equal`` elsewhere) — a bitwise compare, stricter than ``==``."""

    __slots__ = ("x", "version", "copy", "bytewise", "y", "taken")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: int, scratch: list) -> None:
        self.x, self.y, self.taken = x, y, {index}
        self.version = self.copy = None
        self.bytewise = False
        if not x.is_inference():
            self.version = x._version
        elif x.is_contiguous() and _memcmp() is not None:
            n = x.numel() * x.element_size()
            buf = scratch[0] if scratch and scratch[0].numel() == n else None
            if buf is None:
                buf = torch.empty(n, dtype=torch.uint8)
                scratch[:] = [buf]
            ctypes.memmove(buf.data_ptr(), x.data_ptr(), n)
            self.copy, self.bytewise = buf, True
        else:
            self.copy = x.clone()

    def unchanged(self, x: torch.Tensor) -> bool:
        if self.x is not x:
            return False
        if self.version is not None:
            return x._version == self.version
        if self.bytewise:
            return _memcmp()(self.copy.data_ptr(), x.data_ptr(), self.copy.numel()) == 0
        return torch.equal(x, self.copy)


class SharedProjection:
    """Sibling projections that read the same input — a layer's q/k/v, or gate/up — packed as ONE
    weight (their ternary rows stacked, each sibling's scale on equal row groups of gcd(N_i)
    rows), so that the siblings' forward calls make one quantisation and one kernel call.

    The first sibling called computes the fused product for its input and keeps it; a sibling
    called with the SAME input tensor (identity, and its ``_version`` unchanged — for inference
    tensors, which have no version counter, its values equal to a copy taken at compute time)
    returns its slice of that result; once every sibling has taken its slice the result is
    dropped.  No other call gets a kept result: a sibling called with another input while a round
    it has not joined is pending computes alone on its own rows of the packed weight (a view, no
    copy) and leaves that round to the others; a sibling that already took its slice (a second
    call), or finds no pending round, starts a new round.  Every row of the fused product equals
    the sibling's own product bit for bit (same integers, same ``s_i / a`` epilogue), so sharing
    changes no number.
    """

    def __init__(self, weight: PackedWeight, sizes: list[int], bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
        self._pending: _Pending | None = None
        self._scratch: list = []  # the input copy's buffer (inference tensors), reused

    def forward(self, index: int, x: torch.Tensor, own: BitlmLinear) -> torch.Tensor:
        p = self._pending
        if p is not None and index not in p.taken:
            if p.unchanged(x):
                p.taken.add(index)
                if len(p.taken) == len(self.bounds):
                    self._pending = None
                lo, hi = self.bounds[index]
                return p.y[..., lo:hi]
            return _project(x, own.packed, own.bias_f32)  # another input while a round is pending
        y = _project(x, self.weight, self.bias)
        self._pending = _Pending(x, y, index, self._scratch)
        lo, hi = self.bounds[index]
        return y[..., lo:hi]


class BitlmLinear(nn.Module):
    """A transformers BitNet projection on bitlm's packed weight and native kernels.

    ``forward(x)``: (optional ``rms_norm``, the source layer's own module) → per-token int8
    absmax quantisation → exact packed matmul with the float32 epilogue
    ``float32(Σ q·T) · (s / a) (+ bias)`` → the input's dtype (bf16 in and out in one native
    call, ``kernels.linear_bf16``).  Siblings reading the same input (q/k/v, gate/up) share one
    packed weight and one kernel call per input (:class:`SharedProjection`); ``packed`` is then
    this module's own rows of the shared weight.  Inference only.
    """

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, rms_norm: nn.Module | None = None,
                 source: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = weight.K, weight.N
        self.packed = weight  # PackedWeight: not a buffer, so model.to(dtype) cannot cast its scale
        self.bias_f32 = None if bias is None else bias.detach().float().contiguous()
        self.rms_norm = rms_norm
        self.source = source  # "bitlinear", "autobitlinear/offline", "autobitlinear/online"
        self.shared: SharedProjection | None = None  # set by _share (not a submodule)
        self.shared_index = 0

    def extra_repr(self) -> str:
        shared = "" if self.shared is None else f", shared={self.shared_index + 1}/{len(self.shared.bounds)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_f32 is not None}, "
                f"format={self.packed.format}, source={self.source}{shared}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.forward(self.shared_index, x, self)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return _project(x, self.packed, self.bias_f32)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise BitlmIntegrationError(
            f"{prefix.rstrip('.')}: a bitlm-accelerated model has no transformers state dict; save the model "
            "before bitlm.integrations.transformers.accelerate() (or save it with bitlm.save)")


class BitlmBf16Head(nn.Module):
    """A bf16 output head (``lm_head``) on bitlm's native bf16 kernel: the same weight tensor (a
    tied embedding stays shared), ``y = Σ x·float32(w)`` in float32 in the kernel's fixed order,
    rounded to bf16 once — what torch's bf16 ``F.linear`` computes up to summation order, read at
    2 bytes per weight without converting the matrix."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight_bf16 = weight.detach()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=bfloat16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, self.in_features).float()
        return kernels.dense_bf16_matmul(x2, self.weight_bf16).view(*lead, self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        BitlmLinear._save_to_state_dict(self, destination, prefix, keep_vars)


class BitlmRMSNorm(nn.Module):
    """transformers' ``BitNetRMSNorm`` in one native call (``kernels.rms_norm``) instead of its
    eight torch ops (to float32, pow, mean, add, rsqrt, mul, to dtype, mul).

    Same weight tensor, same formula and the same two roundings of a bf16 model
    (``n = bf16(x · r)``, ``y = bf16(weight · n)``); what differs is the norm factor ``r``: bitlm
    sums x² in float64 (the order of ``kernels.quantize_rows``) and takes ``float32(1 / sqrt(Σx²/K
    + eps))``, where transformers takes a float32 mean and ``rsqrt`` — ``r`` may differ in its
    last bit, which moves a float32 output by ~1e-7 relative and rarely a bf16 output by one bf16
    step.  Inputs of another dtype than the weight's (or not float32 / bf16) run transformers'
    own formula."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = weight  # the source module's Parameter itself (not copied; model.to() still casts it)
        self.variance_epsilon = float(eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu":
            return kernels.rms_norm(x.detach() if x.requires_grad else x, self.weight, self.variance_epsilon)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        BitlmLinear._save_to_state_dict(self, destination, prefix, keep_vars)


try:  # where transformers' output capturing keeps what it records (a private name: checked, not relied on)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - another transformers layout: the fused layer is never used
    _active_collector = None


def _collecting_attentions() -> bool:
    """Whether transformers' output capturing wants the attention weights now (``output_attentions``):
    the fused layer does not run ``self_attn``, whose output hook records them.  True (the
    per-module path) when this transformers keeps them elsewhere."""
    if _active_collector is None:  # pragma: no cover
        return True
    c = _active_collector.get()
    return bool(c) and "attentions" in c


class BitlmDecoderLayer(BitNetDecoderLayer):
    """transformers' ``BitNetDecoderLayer`` whose decode step (one new token, batch 1) runs in two
    native calls around transformers' own cache update and attention; the class of a swapped layer
    (:func:`accelerate`, ``layers=True``) — same submodules, state-dict names and hooks.

    Decode: (a) ``native.HfLayer.qkv``: input norm → q/k/v (one packed pass) → RoPE with the
    model's ``position_embeddings``; (b) ``cache.update(k, v, layer_idx, ...)`` — the transformers
    Cache object stays the source of truth (DynamicCache, StaticCache, ...) — and the model's
    attention function (``config._attn_implementation``, SDPA by default) exactly as
    ``BitNetAttention`` calls them, with torch at one thread meanwhile (``torch.set_num_threads``,
    restored after: process-wide, so other threads' torch ops run on one thread for that moment);
    (c) ``native.HfLayer.out``: attn_sub_norm → o_proj → residual
    → post_attention_layernorm → gate/up → ReLU²·up → ffn_sub_norm → down → residual, the pool's
    workers prefetching the next pass's weights as ``bitlm_decode_step`` does.  Every value is
    rounded to the model dtype where the per-module path (:class:`BitlmRMSNorm`,
    :class:`BitlmLinear`, transformers' RoPE / ReLU² / adds) rounds it: the same bits.

    Anything else — prefill (q_len > 1), batch > 1, gradients, training mode, ``output_attentions``,
    a dtype or weight the fused state was not built for, ``bitlm_fused = False`` — runs
    transformers' own forward over the swapped modules (the per-module path)."""

    bitlm_fused = True

    def _bitlm_state(self, dtype: torch.dtype) -> native.HfLayer | None:
        """The native layer for this dtype and the submodules now in place (rebuilt when a
        submodule, a norm weight or the dtype changed — e.g. ``model.to(...)`` or a projection
        swapped back — and None when they can no longer be fused)."""
        st = self.__dict__.get("_bitlm_hf")
        if st is None:
            return None
        m = self._modules
        try:
            a, f = m["self_attn"]._modules, m["mlp"]._modules
            norms = (m["input_layernorm"], a["attn_sub_norm"], m["post_attention_layernorm"], f["ffn_sub_norm"])
            ws = [x._parameters.get("weight") for x in norms]
            key = (dtype, *norms, a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], f["gate_proj"], f["up_proj"],
                   f["down_proj"], f["act_fn"], *(None if w is None else (w.data_ptr(), w.dtype) for w in ws))
        except (KeyError, AttributeError):  # a submodule removed or replaced by something else
            return None
        if st.key != key:
            st.build(self, key)
        return st.layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        if cache is None and "past_key_values" in kwargs:  # transformers' deprecated name
            cache = kwargs.pop("past_key_values")
        x = hidden_states
        hf = None
        if (self.bitlm_fused and x.dim() == 3 and x.shape[0] == 1 and x.shape[1] == 1 and position_embeddings is not None
                and not self.training and not (x.requires_grad and torch.is_grad_enabled())
                and not _collecting_attentions()):
            hf = self._bitlm_state(x.dtype)
        cos, sin = position_embeddings if hf is not None else (None, None)
        if hf is None or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == x.dtype
                              and sin.dtype == x.dtype and cos.numel() == hf.head_dim and sin.numel() == hf.head_dim):
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                   use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        attn = self.self_attn
        q, k, v = hf.qkv(x, cos, sin)
        akw = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}  # what BitNetAttention passes on
        # torch at one thread for the cache update and the attention of one token: waking torch's
        # OpenMP pool for these tiny ops beside bitlm's spinning workers cost ~7 ms per token
        # (2B4T: cache update 7.0 -> 2.2 ms, attention 5.4 -> 3.2; the same bits, one query row)
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            if cache is not None:
                k, v = cache.update(k, v, attn.layer_idx, kwargs=akw)
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
            o, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **akw)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        return hf.out(x, o.reshape(1, 1, -1).contiguous())


class BitlmBitNetModel(BitNetModel):
    """transformers' ``BitNetModel`` whose decode step (one token, batch 1, a ``DynamicCache``)
    runs every decoder layer in one native call (``native.HfStack``: per layer the fused
    layer's two halves with the attention between them in C); the class of the model inside a
    swapped ``BitNetForCausalLM`` (:func:`accelerate`, ``layers=True``).

    The ``DynamicCache`` stays the cache: each layer's keys / values become views of the first
    ``T + 1`` rows of a buffer with spare rows (grown by a quarter when full), so appending a
    token writes one row instead of ``torch.cat`` copying the whole cache, and what
    transformers reads from the cache (``get_seq_length``, ``crop``, a later ``update``) is the
    same tensor values as after its own update — the keys and values themselves are the fused
    layer's bits.  The attention is bitlm's (float32 sums over the cached values, softmax, the
    output rounded to the model dtype), not ``config._attn_implementation``'s: the same maths as
    SDPA, float rounding apart.  Anything else — prefill, batch > 1, another cache class, a
    padding mask, ``output_hidden_states`` / ``output_attentions``, hooks of one's own on a decoder layer,
    gradients, a layer that cannot be fused, ``bitlm_fused = False`` — runs transformers'
    forward over the fused layers (:class:`BitlmDecoderLayer`)."""

    bitlm_fused = True

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs: Any):
        if cache is None and "past_key_values" in kwargs:  # transformers' deprecated name
            cache = kwargs.pop("past_key_values")
        out = self._bitlm_decode(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs)
        if out is not None:
            return out
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)

    def _bitlm_decode(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                      kwargs: dict) -> BaseModelOutputWithPast | None:
        """The one-call decode step, or None where it does not apply."""
        cfg = self.config
        if (not self.bitlm_fused or self.training or inputs_embeds is not None or input_ids is None
                or input_ids.shape != (1, 1) or type(cache) is not DynamicCache
                or not (use_cache if use_cache is not None else cfg.use_cache)
                or any(kwargs.get(k, getattr(cfg, k, False)) for k in ("output_attentions", "output_hidden_states"))
                or set(kwargs) - _DECODE_KWARGS or kwargs.get("return_dict") is False
                or (torch.is_grad_enabled() and self.embed_tokens.weight.requires_grad)):
            return None
        layers = self.layers[: cfg.num_hidden_layers]
        if len(cache.layers) != len(layers):
            return None
        pos, dtype = None, self.embed_tokens.weight.dtype
        for layer, cl in zip(layers, cache.layers):
            if (type(layer) is not BitlmDecoderLayer or not layer.bitlm_fused or _user_hooks(layer)
                    or type(cl) is not DynamicLayer or not cl.is_initialized
                    or cl.keys is None or cl.keys.dim() != 4 or cl.keys.shape[0] != 1 or cl.keys.dtype != dtype
                    or cl.values.dtype != dtype or cl.keys.device.type != "cpu"):
                return None
            t = cl.keys.shape[-2]
            if pos is None:
                pos = t
            elif t != pos:
                return None
        if attention_mask is not None and (attention_mask.shape != (1, pos + 1) or not bool(attention_mask.all())):
            return None
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.tensor([[pos]], device=x.device)
        cos, sin = self.rotary_emb(x, position_ids=position_ids)
        stack = self._bitlm_stack(x.dtype, layers)
        if stack is None or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
                                 and cos.dtype == x.dtype and sin.dtype == x.dtype):
            return None
        keys, values = [], []
        for cl in cache.layers:
            kb, vb = _kv_rows(cl, pos)
            keys.append(kb)
            values.append(vb)
        y = stack.decode(x, cos, sin, keys, values, pos, layers[0].self_attn.scaling)
        for cl, kb, vb in zip(cache.layers, keys, values):
            cl.keys, cl.values = kb[:, :, : pos + 1], vb[:, :, : pos + 1]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(y), cache=cache)

    def _bitlm_stack(self, dtype: torch.dtype, layers) -> native.HfStack | None:
        """The native stack over every layer's fused state for ``dtype`` (rebuilt when one of them
        was), or None when some layer cannot be fused."""
        states = [m._bitlm_state(dtype) for m in layers]
        if any(st is None for st in states):
            return None
        got = self.__dict__.get("_bitlm_hfstack")
        if got is None or len(got.layers) != len(states) or any(a is not b for a, b in zip(got.layers, states)):
            got = native.HfStack(states)
            self.__dict__["_bitlm_hfstack"] = got
        return got


def _user_hooks(m: nn.Module) -> bool:
    """Forward (pre-)hooks on ``m`` other than transformers' own output-capturing ones (installed
    for good the first time ``output_hidden_states`` / ``output_attentions`` is asked for; they
    record nothing unless a call asks, and such a call takes transformers' forward)."""
    return bool(m._forward_pre_hooks) or any(
        getattr(h, "__module__", "") != "transformers.utils.output_capturing" for h in m._forward_hooks.values())


#: keyword arguments BitNetForCausalLM.forward / generate may pass to the model that the one-call
#: decode step honours (the rest send it to transformers' forward)
_DECODE_KWARGS = frozenset({"output_attentions", "output_hidden_states", "return_dict"})


def _kv_rows(cl, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) buffers of a DynamicLayer holding its ``pos`` rows with at least one spare:
    the ones its tensors are views of when they still are, else new ones (a quarter more rows,
    at least 128) holding a copy."""
    got = cl.__dict__.get("_bitlm_kv")
    k, v = cl.keys, cl.values
    if got is not None:
        kb, vb = got
        if (pos < kb.shape[2] and k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
                and k.stride() == kb.stride() and v.stride() == vb.stride() and k.dtype == kb.dtype
                and v.dtype == vb.dtype and v.shape == k.shape):
            return kb, vb
    cap = pos + 1 + max(128, pos // 4)
    kb = k.new_empty((1, k.shape[1], cap, k.shape[3]))
    vb = v.new_empty((1, v.shape[1], cap, v.shape[3]))
    kb[:, :, :pos].copy_(k)
    vb[:, :, :pos].copy_(v)
    cl.__dict__["_bitlm_kv"] = (kb, vb)
    return kb, vb


class _FusedState:
    """One swapped layer's native description (:class:`native.HfLayer`), built for the dtype and
    norm weights it last saw (``key``) and linked to the next swapped layer's for prefetch."""

    def __init__(self, layers: list) -> None:
        self.layers = layers  # every fused layer of the model in order (shared list)
        self.key: tuple | None = None
        self.layer: native.HfLayer | None = None

    def build(self, m: BitlmDecoderLayer, key: tuple) -> None:
        dtype = key[0]
        self.key, self.layer = key, None
        if not _fusable(m) or kernels.backend() != "native":
            return
        norms = [x.weight for x in key[1:5]]
        if dtype not in (torch.float32, torch.bfloat16) or any(w.dtype != dtype or w.device.type != "cpu" for w in norms):
            return
        a, f = m.self_attn, m.mlp
        lin = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": f.gate_proj, "up": f.up_proj,
               "down": f.down_proj}
        eps = [m.input_layernorm.variance_epsilon, a.attn_sub_norm.variance_epsilon,
               m.post_attention_layernorm.variance_epsilon, f.ffn_sub_norm.variance_epsilon]
        cfg = a.config
        self.layer = native.HfLayer(dtype=dtype, n_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                                    head_dim=a.head_dim, linears={k: (v.packed, v.bias_f32) for k, v in lin.items()},
                                    norms=[w.detach() for w in norms], eps=eps)
        i = next(j for j, x in enumerate(self.layers) if x is m)
        nxt = self.layers[i + 1].__dict__["_bitlm_hf"] if i + 1 < len(self.layers) else None
        self.layer.link(None if nxt is None or nxt.key is None or nxt.key[0] != dtype else nxt.layer)
        prev = self.layers[i - 1].__dict__["_bitlm_hf"] if i > 0 else None
        if prev is not None and prev.layer is not None and prev.key[0] == dtype:
            prev.layer.link(self.layer)


def _fusable(m: nn.Module) -> bool:
    """A transformers BitNetDecoderLayer whose projections and norms are all swapped (plain
    BitlmLinear without a per-layer rms_norm, BitlmRMSNorm) with the ReLU² MLP."""
    if type(m) not in (BitNetDecoderLayer, BitlmDecoderLayer):
        return False
    a, f = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    if a is None or f is None:
        return False
    lins = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [getattr(f, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    norms = [getattr(m, "input_layernorm", None), getattr(a, "attn_sub_norm", None),
             getattr(m, "post_attention_layernorm", None), getattr(f, "ffn_sub_norm", None)]
    cfg = getattr(a, "config", None)
    return (all(type(x) is BitlmLinear and x.rms_norm is None and x.packed.format in ("i2", "t1") for x in lins)
            and all(type(x) is BitlmRMSNorm for x in norms) and type(getattr(f, "act_fn", None)) is ReLUSquaredActivation
            and cfg is not None and a.head_dim * cfg.num_attention_heads == lins[0].out_features)


def _fuse_layers(model: nn.Module) -> int:
    """Make every fusable decoder layer a :class:`BitlmDecoderLayer` (its class only: modules,
    names and hooks stay).  Returns how many."""
    layers = [m for m in model.modules() if type(m) is BitNetDecoderLayer and _fusable(m)]
    for m in layers:
        m.__class__ = BitlmDecoderLayer
        m._bitlm_hf = _FusedState(layers)
    for m in model.modules():  # a model whose decoder layers are all fused: its decode step in one call
        if type(m) is BitNetModel and len(m.layers) and all(type(x) is BitlmDecoderLayer for x in m.layers):
            _set_class_keeping_output_capture(m, BitlmBitNetModel)
    return len(layers)


def _set_class_keeping_output_capture(m: nn.Module, cls: type) -> None:
    """``m.__class__ = cls`` for a transformers model: its ``output_hidden_states`` /
    ``output_attentions`` capture (hooks registered per model class name in transformers'
    output-capturing registry) carries over to the new class."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers layout: nothing registered per class to carry over
        _CAN_RECORD_REGISTRY = None
    record = None if _CAN_RECORD_REGISTRY is None else _CAN_RECORD_REGISTRY.get(m)
    m.__class__ = cls
    if record:
        _CAN_RECORD_REGISTRY[m] = record


def _norm_swaps(model: nn.Module) -> list[tuple[str, BitlmRMSNorm]]:
    """transformers' BitNetRMSNorm modules (CPU, float32 or bf16 weight) → :class:`BitlmRMSNorm`."""
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(m) is BitNetRMSNorm and isinstance(w, torch.Tensor) and w.dim() == 1 and w.device.type == "cpu" \
                and w.dtype in (torch.float32, torch.bfloat16):
            out.append((name, BitlmRMSNorm(w, m.variance_epsilon)))
    return out


def _head_swap(model: nn.Module) -> tuple[str, BitlmBf16Head] | None:
    """The bf16 ``lm_head`` (no bias, CPU) to run on bitlm's bf16 kernel, else None (kept)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.dtype != torch.bfloat16:
        return None
    if head.weight.device.type != "cpu":
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return None if name is None else (name, BitlmBf16Head(head.weight))


# ---------------------------------------------------------------------------------------------
# Reading transformers' layers (check only: nothing here modifies the model)
# ---------------------------------------------------------------------------------------------


def _scalar_scale(name: str, m: nn.Module) -> torch.Tensor:
    ws = getattr(m, "weight_scale", None)
    if not isinstance(ws, torch.Tensor) or ws.numel() != 1:
        got = "none" if ws is None else f"shape {tuple(ws.shape)}"
        raise BitlmIntegrationError(f"{name}.weight_scale: expected one per-tensor scale, got {got}")
    v = float(ws.detach().float().reshape(()))
    if not (v > 0 and v < float("inf")):
        raise BitlmIntegrationError(f"{name}.weight_scale: must be a positive finite number, got {v}")
    return ws


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise BitlmIntegrationError(f"{name}: weights are not loaded (meta tensor)")
    if t.device.type != "cpu":
        raise BitlmIntegrationError(f"{name}: on {t.device}; bitlm's kernels run on the CPU (model.to('cpu') first)")


def _ternary_of(name: str, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """(T int8 (N, K), s float32 (1,), effective bias float32 or None, source) of one layer."""
    w = m.weight
    _check_tensor(name + ".weight", w)
    bias = getattr(m, "bias", None)
    if bias is not None:
        _check_tensor(name + ".bias", bias)
    if isinstance(m, BitLinear):  # packed rows, weight_scale divides
        ws = _scalar_scale(name, m)
        if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[0] * 4 != m.out_features or w.shape[1] != m.in_features:
            raise BitlmIntegrationError(f"{name}.weight: expected packed uint8 ({m.out_features // 4}, "
                                        f"{m.in_features}), got {w.dtype} {tuple(w.shape)}")
        try:
            t = unpack_ternary_hf(w.detach(), m.out_features)
        except ValueError as e:
            raise BitlmIntegrationError(f"{name}.weight: {e}") from None
        s = hf_scale_to_absmean(ws, "bitlinear")
        return t, s, None if bias is None else bias.detach().float(), "bitlinear"
    if isinstance(m, AutoBitLinear):
        wf = w.detach().float()
        if not bool(torch.isfinite(wf).all()):
            raise BitlmIntegrationError(f"{name}.weight: has non-finite values")
        if m.online_quant:  # transformers' WeightQuant: one absmean scale per tensor, in float32
            beta = 1.0 / wf.abs().mean().clamp_(min=1e-5)
            t = (wf * beta).round().clamp(-1, 1).to(torch.int8)
            s = (1.0 / beta).reshape(1)
            return t, s, None if bias is None else bias.detach().float(), "autobitlinear/online"
        ws = _scalar_scale(name, m)
        t = wf.round()
        if not bool((t == wf).all()) or bool((t.abs() > 1).any()):
            bad = wf[(t != wf) | (t.abs() > 1)].unique()[:4].tolist()
            raise BitlmIntegrationError(f"{name}.weight: an offline AutoBitLinear holds ternary values "
                                        f"{{-1, 0, 1}}; found {bad}")
        s = hf_scale_to_absmean(ws, "autobitlinear")
        # transformers adds the bias before the weight_scale multiply: (x·T + b)·ws
        eff_bias = None if bias is None else bias.detach().float() * ws.detach().float().reshape(1)
        return t.to(torch.int8), s, eff_bias, "autobitlinear/offline"
    raise TypeError(type(m).__name__)  # not reached: callers pass BitNet layers only


def _bitnet_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, (BitLinear, AutoBitLinear)):
            yield name, m


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS.  Unpacking and packing make large short-lived
    tensors; glibc keeps their pages after free (its mmap threshold grows), which at 2B4T size
    left ~1 GB resident after the swap (measured: RSS 1595 -> 1148 MiB on a 6-layer model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: Sibling projections that read the same input tensor in transformers' BitNet (and Llama-style)
#: layers: packed as one weight each (:class:`SharedProjection`).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _sibling_groups(names: list[str]) -> list[list[str]]:
    """The layer names as packing units: each complete sibling set of one parent, else alone."""
    present = set(names)
    grouped: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for sib in SIBLINGS:
            full = [f"{parent}.{x}" if parent else x for x in sib]
            if leaf in sib and all(f in present for f in full):
                grouped[name] = full
    out, seen = [], set()
    for name in names:
        if name in seen:
            continue
        unit = grouped.get(name, [name])
        seen.update(unit)
        out.append(unit)
    return out


def _pack_unit(unit: list[tuple[str, nn.Module]], format: str) -> list[tuple[str, BitlmLinear]]:
    """Check and pack one unit (a layer, or siblings sharing their input: one weight, row groups
    carrying each sibling's scale).  Siblings with a per-layer ``rms_norm``, a bias on some but
    not all, or rows not a multiple of the packed tile stay separate weights."""
    parts = [(name, *_ternary_of(name, m), getattr(m, "rms_norm", None)) for name, m in unit]
    sizes = [t.shape[0] for _, t, *_ in parts]
    fuse = (len(parts) > 1 and all(rms is None for *_, rms in parts) and all(n % TILE_N == 0 for n in sizes)
            and len({t.shape[1] for _, t, *_ in parts}) == 1 and len({b is None for _, _, _, b, _, _ in parts}) == 1)
    if not fuse:
        return [(name, BitlmLinear(pack_weight(t, s.float().reshape(1), format), b, rms, src))
                for name, t, s, b, src, rms in parts]
    g = functools.reduce(math.gcd, sizes)
    table = torch.cat([s.float().reshape(1).repeat(n // g) for (_, _, s, *_), n in zip(parts, sizes)])
    fused = pack_weight(torch.cat([t for _, t, *_ in parts]), table, format, table.numel())
    bias = None if parts[0][3] is None else torch.cat([b.float() for _, _, _, b, _, _ in parts]).contiguous()
    shared = SharedProjection(fused, sizes, bias)
    out, lo = [], 0
    for i, ((name, _, s, b, src, _), n) in enumerate(zip(parts, sizes)):
        own = PackedWeight(fused.format, fused.version, n, fused.K, fused.data[lo // TILE_N:(lo + n) // TILE_N],
                           s.float().reshape(1), 1)
        lin = BitlmLinear(own, b, None, src)
        lin.shared, lin.shared_index = shared, i
        out.append((name, lin))
        lo += n
    return out


def _prepare(model: nn.Module, format: str) -> list[tuple[str, BitlmLinear]]:
    """Check and pack every BitNet projection; raises before anything is modified."""
    if not isinstance(model, nn.Module):
        raise BitlmIntegrationError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    layers = dict(_bitnet_layers(model))
    if not layers:
        n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
        hint = (f" (its {n_lin} nn.Linear layers run in full precision: the checkpoint has no quantization_config; "
                "load it with quantization_config=BitlmConfig() to ternarise them)") if n_lin else ""
        raise BitlmIntegrationError(f"{type(model).__name__}: no BitNet projections (transformers' BitLinear / "
                                    f"AutoBitLinear) to accelerate{hint}")
    out = []
    for unit in _sibling_groups(list(layers)):
        out.extend(_pack_unit([(name, layers[name]) for name in unit], format))
        _release_freed_memory()  # keeps the transient peak near one unit's temporaries
    return out


def _on_hugepages(model: nn.Module) -> None:
    """The packed weights and a bf16 head (with the parameters sharing its storage, e.g. a tied
    embedding) moved into one huge-page buffer where ``bitlm.memory.worth_it``: decode streams
    them all each token (as the packed engine's, 10-16 % faster than from 4 KiB pages).  The same
    tensors, values and bits; views stay views."""
    moved: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, BitlmLinear):
            for w in (m.packed, m.shared.weight if m.shared is not None else None):
                if w is not None:
                    moved += [w.data, w.scale]
        elif isinstance(m, BitlmBf16Head):
            moved.append(m.weight_bf16)
    storages = {t.untyped_storage().data_ptr() for t in moved}
    moved += [p for p in model.parameters() if p.untyped_storage().data_ptr() in storages]
    memory.relocate(moved)


def accelerate(model: nn.Module, *, format: str = "i2", head: bool = True, norms: bool = True,
               layers: bool = True) -> nn.Module:
    """Swap every transformers BitNet projection of ``model`` for a :class:`BitlmLinear`, in place.

    Accepts what transformers loads for ``BitNetForCausalLM`` (and any other model whose
    projections are ``BitLinear`` / ``AutoBitLinear``): packed ``bitlinear``, offline or online
    ``autobitlinear``.  ``format``: the packed layout, ``"i2"`` (2 bits per weight, the fastest)
    or ``"t1"`` (1.6 bits).  Every layer is checked and packed before the first swap, so an
    error (:class:`BitlmIntegrationError`, naming the layer) leaves the model as it was.
    ``head``: also run a bf16 ``lm_head`` (not a BitNet projection; for 2B4T the largest read
    per token) on bitlm's bf16 kernel (:class:`BitlmBf16Head`, same weights, float32 sums);
    float32 heads stay torch's.  ``norms``: also run transformers' ``BitNetRMSNorm`` modules on one
    native call each (:class:`BitlmRMSNorm`: same formula and roundings, the norm factor may
    differ in its last bit).  ``layers``: also run each decoder layer's decode step (one token,
    batch 1) in two native calls (:class:`BitlmDecoderLayer`; needs ``norms``; the same bits as
    the per-module path).  Returns ``model``.
    """
    if format not in ("i2", "t1"):
        raise BitlmIntegrationError(f"format must be 'i2' or 't1' (ternary, native kernels), got {format!r}")
    swaps: list[tuple[str, nn.Module]] = list(_prepare(model, format))
    if head and (h := _head_swap(model)) is not None:
        swaps.append(h)
    if norms:
        swaps.extend(_norm_swaps(model))
    for name, new in swaps:
        model.set_submodule(name, new)
    del swaps
    _on_hugepages(model)  # before _fuse_layers: the native stacks take the weights' addresses
    if layers:
        _fuse_layers(model)
    _release_freed_memory()  # the replaced layers' tensors
    return model


# ---------------------------------------------------------------------------------------------
# The registered quantization method
# ---------------------------------------------------------------------------------------------


@register_quantization_config(METHOD)
class BitlmConfig(QuantizationConfigMixin):
    """``quantization_config=BitlmConfig()``: load a BitNet model and run its projections on
    bitlm's packed kernels.

    ``linear_class`` / ``quantization_mode`` / ``use_rms_norm`` / ``rms_norm_eps`` say how the
    checkpoint stores its projections, with the meaning of transformers' ``BitNetQuantConfig``;
    ``BitlmConfig.model_config(path)`` copies them from a pre-quantized checkpoint.  Left at
    None for a checkpoint without a ``quantization_config`` (full-precision master weights), the
    projections are ternarised on load as transformers' online ``AutoBitLinear`` does (per-tensor
    absmean).  ``format``: ``"i2"`` or ``"t1"``.  ``modules_to_not_convert``: as transformers'.
    """

    def __init__(self, linear_class: str | None = None, quantization_mode: str | None = None, use_rms_norm: bool = False,
                 rms_norm_eps: float | None = 1e-6, format: str = "i2", modules_to_not_convert: list | None = None,
                 **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.linear_class = linear_class
        self.quantization_mode = quantization_mode
        self.use_rms_norm = use_rms_norm
        self.rms_norm_eps = rms_norm_eps
        self.format = format
        self.modules_to_not_convert = modules_to_not_convert
        self.post_init()

    def post_init(self) -> None:
        if self.linear_class not in (None, "bitlinear", "autobitlinear"):
            raise ValueError(f"BitlmConfig.linear_class must be 'bitlinear', 'autobitlinear' or None, "
                             f"got {self.linear_class!r}")
        if self.quantization_mode not in (None, "offline", "online"):
            raise ValueError(f"BitlmConfig.quantization_mode must be 'offline', 'online' or None, "
                             f"got {self.quantization_mode!r}")
        if self.format not in ("i2", "t1"):
            raise ValueError(f"BitlmConfig.format must be 'i2' or 't1', got {self.format!r}")

    def bitnet_config(self) -> BitNetQuantConfig:
        """transformers' own BitNet config for the layers the checkpoint is loaded into."""
        lc = self.linear_class or "autobitlinear"
        mode = self.quantization_mode or ("offline" if self.linear_class else "online")
        return BitNetQuantConfig(modules_to_not_convert=self.modules_to_not_convert, linear_class=lc,
                                 quantization_mode=mode, use_rms_norm=self.use_rms_norm, rms_norm_eps=self.rms_norm_eps)

    @classmethod
    def model_config(cls, path: Any, *, format: str = "i2", **config_kwargs: Any):
        """The checkpoint's model config with its ``bitnet`` quantization_config replaced by the
        ``bitlm`` method (same storage fields), for ``from_pretrained(path, config=...)``."""
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path, **config_kwargs)
        q = getattr(cfg, "quantization_config", None)
        if q is None:
            q = {}
        elif not isinstance(q, dict):
            q = q.to_dict()
        if q and q.get("quant_method") not in ("bitnet", METHOD):
            raise BitlmIntegrationError(f"{path}: quantization_config.quant_method is {q.get('quant_method')!r}; "
                                        "bitlm runs BitNet checkpoints ('bitnet') only")
        mine = cls(linear_class=q.get("linear_class", "bitlinear") if q else None,
                   quantization_mode=q.get("quantization_mode", "offline") if q else None,
                   use_rms_norm=q.get("use_rms_norm", False), rms_norm_eps=q.get("rms_norm_eps", 1e-6),
                   format=format, modules_to_not_convert=q.get("modules_to_not_convert"))
        cfg.quantization_config = mine.to_dict() if q else None
        return cfg


@register_quantizer(METHOD)
class BitlmHfQuantizer(HfQuantizer):
    """Loads the projections into transformers' own BitNet layers (so every stored convention
    loads exactly as transformers loads it), then :func:`accelerate` swaps them."""

    requires_calibration = False
    quantization_config: BitlmConfig
    serialized_names = {"weight": ["weight"]}  # as transformers' BitNet quantizer: the deserialize op's input

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        dm = kwargs.get("device_map")
        devices = set(dm.values()) if isinstance(dm, dict) else ({dm} if dm is not None else set())
        if devices - {"cpu", torch.device("cpu")}:
            raise ValueError(f"bitlm runs on the CPU; got device_map={dm!r}")

    def _process_model_before_weight_loading(self, model, **kwargs: Any) -> None:
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules)
        bc = self.quantization_config.bitnet_config()
        replace_with_bitnet_linear(model, modules_to_not_convert=self.modules_to_not_convert, quantization_config=bc)

    def get_load_operations(self) -> dict:
        bc = self.quantization_config.bitnet_config()
        if bc.linear_class == "autobitlinear" and bc.quantization_mode == "offline":
            from transformers.integrations.bitnet import BitNetDeserialize

            return {"deserialize": BitNetDeserialize}
        return {}

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        return accelerate(model, format=self.quantization_config.format)

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def from_pretrained(path: Any, *, format: str = "i2", model_class: Any = None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, config=BitlmConfig.model_config(path),
    quantization_config=BitlmConfig(...))`` in one call: any BitNet checkpoint (pre-quantized in
    either convention, online, or full-precision master weights) loaded onto bitlm's kernels."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    cfg_kw = {k: kwargs[k] for k in ("revision", "local_files_only", "cache_dir", "token", "trust_remote_code")
              if k in kwargs}
    cfg = BitlmConfig.model_config(path, format=format, **cfg_kw)
    if cfg.quantization_config is None:  # full-precision master weights: ternarised on load
        kwargs["quantization_config"] = BitlmConfig(format=format)
    return model_class.from_pretrained(path, config=cfg, **kwargs)
