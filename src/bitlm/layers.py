"""BitLinear — the quantisation-aware linear layer of BitNet — and ``prepare()``.

``BitLinear`` keeps latent high-precision weights (mixed-precision training, 2310.11453 §2.2) and
fake-quantises weights and activations in every forward pass with the straight-through estimator
(see ``bitlm.quant``).  Optionally it normalises its input first (the FAQ's "BitLinear has a
built-in RMSNorm"; the b1 paper's LN/SubLN), parameter-free so that ``prepare()`` never has to
invent new weights.  ``set_quant_lambda`` and ``lambda_schedule`` give the λ warm-up (HF "Fine-tuning
LLMs to 1.58bit"): λ ramps the fake quantisation in from 0 to 1.

The fast QAT step (``BITLM_QAT_FAST``, on by default) computes the same thing with less work: the
weight codes (T, s) are cached per weight version — once per optimizer step, however many
micro-batches and evaluations use them — and the common training case (λ = 1, int8 absmax
activations per token or per tensor, no groups or activation variants, float32 on the CPU) runs its projection as
an exact int8 × ternary integer matmul (``_Int8Projection``), with the STE's float gradients;
projections fed the same tensor (q/k/v, gate/up) share one activation quantisation and one
X_fq (``shared_activation_codes``), and the element passes around the products are native
(``kernels.qat_*``, ``csrc/qat.c``) into reused buffers.
Every other case, torch.compile, tensor-parallel shards and autocast keep the fake-quant path.

``prepare(model)`` swaps ``nn.Linear`` modules for ``BitLinear`` *copying* the existing weights
(peers that re-initialise them destroy the pretrained model), skipping output heads by default.
"""

from __future__ import annotations

import fnmatch
import math
import os
import threading
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant as Q

__all__ = ["BitLinear", "FrozenTernaryLinear", "prepare", "set_quant_lambda", "lambda_schedule", "LAMBDA_SCHEDULES",
           "ternary_latent", "thaw", "NORMS"]

NORMS = (None, "layernorm", "rmsnorm")
ACT_QUANTS = ("absmax", "absmean")

#: The fast QAT step (``BITLM_QAT_FAST``, default on): the weight codes cached per weight version
#: and the integer forward of :class:`_Int8Projection`.  ``BITLM_QAT_FAST=0`` (read at import; tests
#: and ``benchmarks/bench_train.py`` set this attribute) runs the fake-quant float path of every
#: forward, exactly as before the fast step existed.
QAT_FAST = os.environ.get("BITLM_QAT_FAST", "1").strip().lower() not in ("0", "false", "no", "off")

#: The fast step's integer product: "native" (bitlm's W8A8 kernel on the cached int8 codes, the
#: same int32 sums and epilogue in one pass) when the native kernels are loaded, else "torch"
#: (``torch._int_mm`` then the epilogue in torch).  The same bits either way (tested);
#: ``BITLM_QAT_MATMUL=torch`` forces torch's (``benchmarks/bench_train.py`` times both).
QAT_MATMUL = os.environ.get("BITLM_QAT_MATMUL", "native").strip().lower()


class BitLinear(nn.Linear):
    """y = Quant_w(W) · Quant_a(Norm(x)) (+ b), with STE in the backward pass.

    Args:
        weight_quant: "b1.58" (ternary absmean), "b1" (binary, mean-centred sign) or "fp" (none).
        act_bits: activation bits (8 in the papers); ``None`` keeps activations in high precision.
        act_granularity: absmax granularity in training mode — "token" (b1.58) or "tensor" (the
            b1 paper: "per tensor during training").
        act_granularity_eval: granularity in eval mode (``module.eval()``); None = the same as
            ``act_granularity``.  Both papers quantise per token at inference, which is what the
            packed engine computes; ``bitlm.model`` passes the config's value ("token" by default).
        weight_groups / act_groups: group quantisation (2310.11453 Eq. 13-15).
        weight_group_dim: "out" (weight groups split output rows: the column-parallel partition)
            or "in" (input columns: the row-parallel partition).
        act_nonneg: quantise the input with the non-negative (η, zero-point) variant of Eq. 6,
            x ≈ q/a + η with η = min x and γ = max x - η (``bitlm.quant`` explains the γ).
        norm: None, "layernorm" or "rmsnorm" — parameter-free normalisation before quantisation;
            with act_groups > 1 it is the group normalisation of Eq. 15.
        quant_lambda: λ of warm-up quantisation, 1.0 = fully quantised (a buffer, saved with the
            model, so that a resumed fine-tune continues with the same λ).
        act_quant: "absmax" (the papers' int8: γ = max|x|) or "absmean" (BitNet a4.8 / v2 4-bit:
            β = mean|x|, a = √7/β, q in [-8, 7]; per token only).
        act_topk: None, or the fraction of features kept per token before absmax quantisation
            (BitNet a4.8's sparsified o_proj input, 0.5 in the paper; STE through the mask).
        hadamard: apply the orthonormal Walsh–Hadamard transform after the norm and before the
            activation quantiser (BitNet v2's H-BitLinear, Eq. 7).  No parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        weight_quant: str = "b1.58",
        act_bits: int | None = 8,
        act_granularity: str = "token",
        act_granularity_eval: str | None = None,
        weight_groups: int = 1,
        act_groups: int = 1,
        norm: str | None = None,
        norm_eps: float = 1e-5,
        quant_lambda: float = 1.0,
        weight_group_dim: str = "out",
        act_nonneg: bool = False,
        act_quant: str = "absmax",
        act_topk: float | None = None,
        hadamard: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if weight_quant not in Q.WEIGHT_QUANTS:
            raise ValueError(f"weight_quant must be one of {Q.WEIGHT_QUANTS}, got {weight_quant!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        act_granularity_eval = act_granularity if act_granularity_eval is None else act_granularity_eval
        for name, g in (("act_granularity", act_granularity), ("act_granularity_eval", act_granularity_eval)):
            if g not in ("token", "tensor"):
                raise ValueError(f"{name} must be 'token' or 'tensor', got {g!r}")
        if weight_group_dim not in Q.GROUP_DIMS:
            raise ValueError(f"weight_group_dim must be one of {Q.GROUP_DIMS}, got {weight_group_dim!r}")
        split = out_features if weight_group_dim == "out" else in_features
        if weight_groups < 1 or split % weight_groups:
            raise ValueError(f"{'out' if weight_group_dim == 'out' else 'in'}_features={split} not divisible by "
                             f"weight_groups={weight_groups}")
        if in_features % act_groups:
            raise ValueError(f"in_features={in_features} not divisible by act_groups={act_groups}")
        if act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
        if act_topk is not None and not 0.0 < act_topk <= 1.0:
            raise ValueError(f"act_topk must be None or in (0, 1], got {act_topk!r}")
        if (act_quant != "absmax" or act_topk is not None) and (
                act_nonneg or act_groups != 1 or "tensor" in (act_granularity, act_granularity_eval)):
            raise ValueError("act_quant='absmean' and act_topk quantise per token, without act_groups or act_nonneg")
        if act_quant == "absmean" and act_topk is not None:
            raise ValueError("act_topk applies to absmax (int8) activations, not act_quant='absmean'")
        self.weight_quant = weight_quant
        self.act_bits = act_bits
        self.act_granularity = act_granularity
        self.act_granularity_eval = act_granularity_eval
        self.weight_groups = weight_groups
        self.weight_group_dim = weight_group_dim
        self.act_nonneg = bool(act_nonneg)
        self.act_quant = act_quant
        self.act_topk = act_topk
        self.hadamard = bool(hadamard)
        self.act_groups = act_groups
        self.norm = norm
        self.norm_eps = norm_eps
        self.register_buffer("quant_lambda", torch.tensor(float(quant_lambda)), persistent=True)
        # cache the weight codes per weight version (``cached_quantized_weight``); False where the
        # weight's storage is rewritten without a version bump (``parallel.wrap_model`` under FSDP2)
        self.weight_cache = True

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_quant={self.weight_quant}, act_bits={self.act_bits}, "
            f"act={self.act_granularity}/{self.act_granularity_eval}{', nonneg' if self.act_nonneg else ''}, "
            f"groups=({self.weight_groups}/{self.weight_group_dim},{self.act_groups}), norm={self.norm}"
            + (f", act_quant={self.act_quant}" if self.act_quant != "absmax" else "")
            + (f", act_topk={self.act_topk}" if self.act_topk is not None else "")
            + (", hadamard" if self.hadamard else "")
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "layernorm":
            return Q.group_layer_norm(x, self.act_groups, self.norm_eps)
        if self.norm == "rmsnorm":
            return Q.group_rms_norm(x, self.act_groups, self.norm_eps)
        return x

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer weight and its per-group scale, ``W ≈ s · T`` (what packing stores).

        A weight sharded by FSDP2 (a DTensor, outside the forward) is quantised shard by shard
        without gathering it — T keeps the weight's placements — with the *whole* tensor's
        absmean as s (``bitlm.parallel.global_absmean``: Σ|w| and the element count all-reduced,
        exact for uneven shards), never a shard's own mean.  Other sharded cases are gathered."""
        w = self.weight
        if _is_dtensor(w):
            if self.weight_quant == "b1.58" and self.weight_groups == 1:
                from torch.distributed.tensor import DTensor

                from .parallel import global_absmean

                s = global_absmean(w).clamp(min=Q.SCALE_EPS).reshape(1)
                t = Q.round_half_even(w.to_local().detach().float() / s).clamp(-1, 1).to(torch.int8)
                return DTensor.from_local(t, w.device_mesh, w.placements, shape=w.shape, stride=w.stride()), s
            w = w.full_tensor()
        return Q.weight_quantize(w, self.weight_quant, self.weight_groups, self.weight_group_dim)

    def _lambda(self) -> float | torch.Tensor:
        """λ as a Python float (so that λ = 1 takes the short STE path), read from the buffer only
        when the buffer has changed (its version counter: no device sync per forward on CUDA).
        Under torch.compile the buffer itself (compiled code fuses the multiply anyway)."""
        lam = self.quant_lambda
        if torch.compiler.is_compiling():
            return lam
        key = (lam._version, lam.data_ptr())
        if getattr(self, "_lam_key", None) != key:
            self._lam_key, self._lam_value = key, float(lam)
        return self._lam_value

    def cached_quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``weight_quantize(weight)`` = (T, s), computed once per weight version: the cache key is
        the weight's version counter (bumped by every in-place update: the optimizer step,
        ``load_state_dict``, ``copy_``), its storage pointer, dtype and shape, so the micro-batches of
        one optimizer step and the evaluation between steps quantise it once.  ``None`` where no
        cache applies (the fast step turned off, a DTensor weight, torch.compile, an inference
        tensor without a version counter, ``fp``, ``weight_cache`` False): the caller quantises as
        before."""
        codes = self._cached_weight_codes()
        return None if codes is None else (codes.t, codes.s)

    def _cached_weight_codes(self) -> _WeightCodes | None:
        """The cache entry behind :meth:`cached_quantized_weight`: (T, s) of the weight's version."""
        w = self.weight
        if (not QAT_FAST or not getattr(self, "weight_cache", True) or self.weight_quant == "fp"
                or torch.compiler.is_compiling() or _is_dtensor(w) or w.is_inference()):
            return None
        key = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape))
        hit = self.__dict__.get("_wq_cache")
        # codes made under inference_mode are inference tensors, which autograd cannot save: a
        # training forward after generation quantises again
        if hit is not None and hit[0] == key and (torch.is_inference_mode_enabled() or not hit[1].t.is_inference()):
            return hit[1]
        if self.weight_groups == 1:
            codes = _WeightCodes(*quantize_weight_codes(w, self.weight_quant))
        else:
            codes = _WeightCodes(*Q.weight_quantize(w, self.weight_quant, self.weight_groups, self.weight_group_dim))
        self.__dict__["_wq_cache"] = (key, codes)
        self.__dict__["weight_quantizations"] = self.__dict__.get("weight_quantizations", 0) + 1
        return codes

    def _fast_path(self, x: torch.Tensor, lam: float | torch.Tensor) -> bool:
        """The common case that :class:`_Int8Projection` computes: λ = 1, absmax int8 activations
        (per token or per tensor) without groups or variants, one weight scale, float32 on the CPU (where
        ``torch._int_mm`` runs on the int8 units) without autocast; never while compiling."""
        return (QAT_FAST and not isinstance(lam, torch.Tensor) and lam == 1.0 and self.act_bits == 8
                and self.weight_quant != "fp" and self.act_quant == "absmax" and self.act_topk is None
                and not self.hadamard and not self.act_nonneg and self.act_groups == 1 and self.weight_groups == 1
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and (self.bias is None or self.bias.dtype == torch.float32)
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and not _is_dtensor(self.weight) and not _is_dtensor(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp_forward = self.__dict__.get("tp_forward")
        if tp_forward is not None:  # tensor-parallel shards: bitlm.tensor_parallel computes the scales
            return tp_forward(self, x)
        lam = self._lambda()
        x = self.normalize(x)
        if self._fast_path(x, lam):
            wcodes = self._cached_weight_codes()
            if wcodes is None:
                wcodes = _WeightCodes(*quantize_weight_codes(self.weight, self.weight_quant))
            gran = self.act_granularity if self.training else self.act_granularity_eval
            # a backward will run (and release the codes): count it, so that the X_fq buffer goes
            # back to the pool only once no backward needs it any more
            backward = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or (
                self.bias is not None and self.bias.requires_grad))
            acodes = shared_activation_codes(x, gran, backward)
            return _Int8Projection.apply(x, self.weight, self.bias, acodes, wcodes)
        if self.hadamard:
            x = Q.hadamard_transform(x)
        if self.act_bits is not None:
            gran = self.act_granularity if self.training else self.act_granularity_eval
            if self.act_quant == "absmean":
                x = Q.fake_quant_activation_absmean(x, self.act_bits, lam)
            elif self.act_topk is not None:
                x = Q.fake_quant_activation_topk(x, self.act_bits, self.act_topk, lam)
            elif self.act_nonneg:
                x = Q.fake_quant_activation_nonneg(x, self.act_bits, gran, self.act_groups, lam)
            else:
                x = Q.fake_quant_activation(x, self.act_bits, gran, self.act_groups, lam)
        cached = self.cached_quantized_weight()
        if cached is None:
            w = Q.fake_quant_weight(self.weight, self.weight_quant, self.weight_groups, lam, self.weight_group_dim)
        else:  # fake_quant_weight with the cached (T, s): the same values
            w = Q.ste(self.weight, Q.dequantize_weight(*cached, self.weight.dtype, self.weight_group_dim), lam)
        return F.linear(x, w, self.bias)


def quantize_activation_rows(x2: torch.Tensor, granularity: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 codes of a float32 (M, K) tensor: ``bitlm.quant.activation_quantize`` (8 bits)
    as int8 codes and (M,) scales.  Per token: one fused pass per row in the native kernels
    (``bitlm_quantize_rows``, bit-identical to the torch ops), the torch ops otherwise; per tensor
    (the b1 paper's training granularity): the torch ops, one scale repeated over the M rows."""
    from . import kernels

    native = kernels.backend() == "native"
    if granularity == "token" and native:
        return kernels.quantize_rows(x2)
    if granularity == "tensor" and native:
        q, a = kernels.qat_quantize_tensor(x2)  # two passes instead of six torch ops, the same bits
        return q, a.expand(x2.shape[0])
    q, a = Q.activation_quantize(x2, 8, granularity)
    return q.to(torch.int8), a.reshape(-1).expand(x2.shape[0])


def quantize_weight_codes(w: torch.Tensor, weight_quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitlm.quant.weight_quantize(w, weight_quant)`` (one weight group) = (T, s), the same
    bits, with b1.58's T = clamp(round(w / s), -1, 1) in one pass (``kernels.qat_ternary``) where
    torch takes four (divide, round, clamp, cast), b1's T = Sign(w - α) likewise
    (``kernels.qat_binary``) — the fast step quantises every weight once per optimizer step.
    s (and α) are torch's reductions, as ``bitlm.quant`` computes them."""
    if weight_quant in ("b1.58", "b1") and w.dtype == torch.float32 and w.device.type == "cpu":
        from . import kernels

        rows = w.detach().reshape(1, -1)  # one group: the rows of quant._grouped_rows
        buf = _SCRATCH.take(tuple(rows.shape))  # |w| in a reused buffer (no fresh pages), the same values
        s = torch.abs(rows, out=buf).mean(dim=1).clamp(min=Q.SCALE_EPS)  # ternary_quantize's s = b1's β
        _SCRATCH.give(buf)
        if weight_quant == "b1.58":
            return kernels.qat_ternary(w.detach(), s), s
        return kernels.qat_binary(w.detach(), rows.mean(dim=1)), s  # binary_quantize's α
    return Q.weight_quantize(w, weight_quant)


def int8_product(q: torch.Tensor, a: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 (M, N) = float32(q · Tᵀ) · (s / a[m]): int8 codes (M, K) × int8 weights (N, K),
    exact int32 sums, the kernels' epilogue order.  ``QAT_MATMUL`` picks the native W8A8 kernel
    (one pass, no int32 (M, N) intermediate) or ``torch._int_mm``; the same bits."""
    if QAT_MATMUL == "native" and q.shape[1] < 131072:
        from . import kernels

        if kernels.backend() == "native":
            return kernels.dense_int8a8_matmul(q, a, t, s.reshape(1).expand(t.shape[0]).contiguous())
    acc = torch._int_mm(q, t.t())  # int32 (M, N), exact
    return acc.to(torch.float32).mul_((s / a).unsqueeze(1))  # f[m] = s / a[m]: the kernels' epilogue order


def dequantize_activation_rows(q: torch.Tensor, a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """X_fq = q / a as float32 (M, K) — ``fake_quant_activation``'s forward value, the STE's grad_W
    operand — from int8 codes (M, K) and (M,) scales: ``kernels.qat_rows_to_f32`` (torch: a float
    copy, then an in-place divide; ``torch.div(int8, float)`` would take a slow mixed-dtype loop),
    into ``out`` when given."""
    from . import kernels

    return kernels.qat_rows_to_f32(q, a, "div", out)  # one pass on the native backend, the same bits


class _BufferPool:
    """Float32 scratch tensors of the fast step's backward and weight quantiser (X_fq, W_fq, |w|),
    reused across calls and steps: each lives for one use (X_fq: from the first backward of its
    input's projections to the last), then its memory comes back here instead of to the
    allocator, which hands big blocks back to the OS so that every new one costs a page fault per
    4 KB.  At most ``keep`` free tensors per shape."""

    def __init__(self, keep: int = 2) -> None:
        self.keep, self.free = keep, {}
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, int]) -> torch.Tensor:
        with self.lock:
            got = self.free.get(shape)
            if got:
                return got.pop()
        with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode:
            return torch.empty(shape, dtype=torch.float32)  # it may come back for a training step

    def give(self, t: torch.Tensor) -> None:
        with self.lock:
            got = self.free.setdefault(tuple(t.shape), [])
            if len(got) < self.keep:
                got.append(t)


_SCRATCH = _BufferPool()


class _WeightCodes:
    """(T, s) of one weight version (the per-version cache entry), and W_fq = s·T in float32 — the
    STE's grad_x operand, ``dequantize_weight`` — made by each backward into a reused buffer
    (``dequantized`` / ``give_back``): one pass, no fresh pages, and no float copy of every weight
    kept between steps."""

    __slots__ = ("t", "s")

    def __init__(self, t: torch.Tensor, s: torch.Tensor) -> None:
        self.t, self.s = t, s

    def dequantized(self) -> torch.Tensor:
        if self.s.numel() == 1 and self.t.dim() == 2:  # dequantize_weight(t, s, float32), in one pass
            from . import kernels

            return kernels.qat_rows_to_f32(self.t, self.s, "mul", _SCRATCH.take(tuple(self.t.shape)))
        return Q.dequantize_weight(self.t, self.s, torch.float32)

    @staticmethod
    def give_back(wdq: torch.Tensor) -> None:
        _SCRATCH.give(wdq)


class _ActCodes:
    """Absmax int8 codes (q, a) of one BitLinear input, shared by every projection that reads the
    same tensor (q/k/v read one normed input, gate/up another): quantised once in the forward, and
    X_fq = q / a (float32) made once in the backward for all of them — by the first backward that
    needs it, in a pooled buffer (``_SCRATCH``) that goes back to the pool after the last
    (``users`` counts the forwards that will run a backward)."""

    __slots__ = ("q", "a", "users", "_xdq", "__weakref__")

    def __init__(self, q: torch.Tensor, a: torch.Tensor) -> None:
        self.q, self.a, self.users, self._xdq = q, a, 0, None

    def dequantized(self) -> torch.Tensor:
        if self._xdq is None:
            self._xdq = dequantize_activation_rows(self.q, self.a, _SCRATCH.take(tuple(self.q.shape)))
        return self._xdq

    def release(self) -> None:
        """One user's backward is done with X_fq; after the last, its buffer returns to the pool
        (the caller holds no reference to it any more: grad_W is a new tensor)."""
        self.users -= 1
        if self.users <= 0 and self._xdq is not None:
            _SCRATCH.give(self._xdq)
            self._xdq = None


# The last input quantised by a fast BitLinear: (weakref to it, its version, its storage,
# granularity, codes).  A weak reference: it never keeps the input alive; the version counter and
# the storage pointer catch an in-place change or a freed-and-reused address.
_LAST_CODES: list = [None]


def shared_activation_codes(x: torch.Tensor, granularity: str, backward: bool = False) -> _ActCodes:
    """:func:`quantize_activation_rows` of a float32 (..., K) input, as an :class:`_ActCodes`
    reused while the same tensor, unchanged, is fed to the next projection (the q/k/v and
    gate/up projections of a block read one tensor each): the same codes every call would
    compute, computed once.  ``backward``: the caller's graph will run a backward that releases
    the codes (counted in ``users``)."""
    codes = None
    key = None
    if not x.is_inference():
        key = (x._version, x.data_ptr(), granularity)
        last = _LAST_CODES[0]
        if last is not None and last[0]() is x and last[1] == key:
            codes = last[2]
    if codes is None:
        k = x.shape[-1]
        x2 = x.detach().reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        codes = _ActCodes(*quantize_activation_rows(x2, granularity))  # int8 (M, K), float32 (M,)
        if key is not None:
            _LAST_CODES[0] = (weakref.ref(x), key, codes)
    codes.users += backward
    return codes


class _Int8Projection(torch.autograd.Function):
    """The BitLinear projection of the common training case, as exact integer arithmetic.

    Forward: x → (q, a) absmax int8 codes per token (or per tensor: b1's training granularity;
    x ≈ q / a; ``shared_activation_codes``: once per input tensor), acc = q · Tᵀ in int32
    (exact, |acc| ≤ 128 K), y = float(acc) · (s / a) (+ bias) — the fake-quant
    float path ``F.linear(q / a, s·T, bias)`` up to the rounding of its float sums and of the final
    scale multiply.  Backward: the straight-through estimator's gradients exactly as that path
    computes them — grad_x = grad_y · W_fq, grad_w = grad_yᵀ · X_fq, grad_b = Σ grad_y with
    W_fq = s·T (``_WeightCodes``) and X_fq = q / a rebuilt from the
    int8 codes, which are all that is saved (1 byte per activation instead of a float32 copy),
    once for all projections of one input (``_ActCodes``).  T and s come from the per-version
    weight cache.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, acodes, wcodes):
        q, a, t, s = acodes.q, acodes.a, wcodes.t, wcodes.s
        y = int8_product(q, a, t, s)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(q, a, t, s)
        ctx.acodes, ctx.wcodes = acodes, wcodes
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], t.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the STE's gradient has no useful second derivative
    def backward(ctx, grad_y):
        acodes, wcodes = ctx.acodes, ctx.wcodes
        g2 = grad_y.reshape(-1, wcodes.t.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            wdq = wcodes.dequantized()
            grad_x = (g2 @ wdq).reshape(ctx.x_shape)
            wcodes.give_back(wdq)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ acodes.dequantized()
        acodes.release()
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """Set the warm-up quantisation factor λ ∈ [0, 1] on every BitLinear of ``model``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quant lambda must be in [0, 1], got {lam}")
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.quant_lambda.fill_(lam)


# λ warm-up schedules (HF "Fine-tuning LLMs to 1.58bit", warm-up quantisation)

LAMBDA_SCHEDULES = ("none", "linear", "exponential", "sigmoid")
_DEFAULT_K = {"exponential": 4.0, "sigmoid": 100.0}


def lambda_schedule(kind: str, step: int, warmup_steps: int, *, k: float | None = None) -> float:
    """λ for optimizer step ``step`` (0-based) of a warm-up over ``warmup_steps`` steps.

    With t = step / warmup_steps (λ = 1 exactly once step ≥ warmup_steps, and always when
    warmup_steps ≤ 0), the blog's schedules are:

      * ``linear``:       λ = t                              (their best: min(step/1000, 1))
      * ``exponential``:  λ = 1 − (1 − t)^k,  k = 4 default  (they tried k ∈ {4, 6, 8, 10})
      * ``sigmoid``:      λ = 1 / (1 + e^(−k (t − 0.5))),  k = 100 default (their released
                          sigmoid model; they tried k ∈ {15, 20, 25, 40, 100})
      * ``none``:         λ = 1 (no warm-up: fully quantised from the first step)

    ``kind`` may carry k as ``"sigmoid:25"`` / ``"exponential:6"`` (how ``TrainConfig.quant_warmup``
    spells it).  A pure function of the step, so a resumed run sees the same λ sequence.
    """
    kind, _, k_text = kind.partition(":")
    if kind not in LAMBDA_SCHEDULES:
        raise ValueError(f"unknown quant warm-up schedule {kind!r}; choose one of {', '.join(LAMBDA_SCHEDULES)}")
    if k_text:
        if kind not in _DEFAULT_K:
            raise ValueError(f"quant warm-up {kind!r} takes no k (got {k_text!r})")
        try:
            k = float(k_text)
        except ValueError:
            raise ValueError(f"quant warm-up {kind}:{k_text}: k must be a number") from None
    if k is not None and not (math.isfinite(k) and k > 0):
        raise ValueError(f"quant warm-up k must be a positive number, got {k}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind == "none" or warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    t = step / warmup_steps
    if kind == "linear":
        return t
    k = _DEFAULT_K[kind] if k is None else k
    if kind == "exponential":
        return 1.0 - (1.0 - t) ** k
    z = k * (t - 0.5)  # sigmoid, written to never overflow exp()
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


DEFAULT_SKIP = ("lm_head", "*.lm_head", "output", "*.output", "embed_out", "*.embed_out")


def prepare(
    model: nn.Module,
    *,
    weight_quant: str = "b1.58",
    act_bits: int | None = 8,
    act_granularity: str = "token",
    weight_groups: int = 1,
    act_groups: int = 1,
    norm: str | None = None,
    norm_eps: float = 1e-5,
    quant_lambda: float = 1.0,
    weight_group_dim: str = "out",
    skip: tuple[str, ...] = DEFAULT_SKIP,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``BitLinear`` holding the same
    weights and bias.  Modules whose qualified name matches a ``skip`` pattern (fnmatch), and any
    Linear whose weight is tied to an embedding, are left alone (the output head stays high
    precision, as in every BitNet paper).  Returns ``model``.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear:  # exact type: never re-wrap a BitLinear
                continue
            if any(fnmatch.fnmatch(full, pat) for pat in skip) or id(child.weight) in embedding_weights:
                continue
            targets.append((parent, child_name, full, child))
    for parent, child_name, _full, lin in targets:
        new = BitLinear(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            weight_quant=weight_quant,
            act_bits=act_bits,
            act_granularity=act_granularity,
            weight_groups=weight_groups,
            act_groups=act_groups,
            norm=norm,
            norm_eps=norm_eps,
            quant_lambda=quant_lambda,
            weight_group_dim=weight_group_dim,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new.train(lin.training)
        setattr(parent, child_name, new)
    return model


# ---------------------------------------------------------------------------------------------
# Frozen ternary weights (packed HF / GGUF checkpoints: T and s fixed, s pinned)
# ---------------------------------------------------------------------------------------------


def ternary_latent(t: torch.Tensor, s: torch.Tensor | float, dtype: torch.dtype = torch.float32,
                   groups: int = 1, dim: str = "out") -> torch.Tensor:
    """A latent weight whose absmean quantisation returns exactly T and (to float rounding) s.

    W = (s / p)·T with p the fraction of non-zeros: mean|W| = s, and |W/s| ∈ {0, 1/p ≥ 1} rounds
    and clips back to T.  (s·T itself would re-quantise to the scale s·p.)  ``groups`` > 1: one
    latent per weight group along ``dim`` (``bitlm.quant``), ``s`` holding the G scales.
    """
    if groups > 1:
        axis = 0 if dim == "out" else 1
        sg = torch.as_tensor(s, dtype=torch.float32).reshape(-1)
        return torch.cat([ternary_latent(tg, sg[g], dtype) for g, tg in enumerate(t.chunk(groups, dim=axis))], dim=axis)
    tf = t.float()
    p = tf.abs().mean()
    if float(p) == 0.0:
        return torch.zeros_like(tf, dtype=dtype)
    s = torch.as_tensor(s, dtype=torch.float32).reshape(())
    return (tf * (s / p)).to(dtype)


class FrozenTernaryLinear(BitLinear):
    """A :class:`~bitlm.layers.BitLinear` whose ternary weight T and scale s are fixed.

    ``weight`` holds s·T (exact: T ∈ {-1,0,1}) with ``requires_grad=False``; the ``weight_scale``
    buffer pins s, so :meth:`quantized_weight` returns exactly (T, s) — which absmean
    re-quantisation of s·T would not (mean|s·T| = s·p, p the fraction of non-zeros).  The forward is the same
    per-token absmax int8 fake-quantisation of activations as BitLinear, then ``F.linear`` with
    s·T.  ``quant_lambda`` is ignored: this layer is for inference and export; to fine-tune,
    load with ``quant="b1.58"``.  ``model.to(dtype)`` casts ``weight`` and ``weight_scale``
    together, so the pair stays consistent.
    """

    def __init__(self, in_features: int, out_features: int, *, act_bits: int | None = 8,
                 act_granularity: str = "token", act_groups: int = 1, weight_groups: int = 1,
                 weight_group_dim: str = "out", device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, weight_quant="b1.58", act_bits=act_bits,
                         act_granularity=act_granularity, act_groups=act_groups, weight_groups=weight_groups,
                         weight_group_dim=weight_group_dim, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        self.register_buffer("weight_scale", torch.ones(weight_groups, device=device, dtype=dtype))

    @classmethod
    def from_ternary(cls, t: torch.Tensor, s: torch.Tensor | float, dtype: torch.dtype = torch.float32,
                     **kw: Any) -> FrozenTernaryLinear:
        """``s``: one scale, or ``weight_groups`` scales along ``weight_group_dim`` (given in ``kw``)."""
        m = cls(t.shape[1], t.shape[0], device="meta", **kw)
        weight, scale = _frozen_tensors(t, s, dtype, m.weight_group_dim)
        m.weight = nn.Parameter(weight, requires_grad=False)
        m.weight_scale = scale
        m.quant_lambda = torch.tensor(1.0)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen ternary, act_bits={self.act_bits}"

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.weight_scale.detach().float().reshape(-1)
        w = self.weight.detach().float()
        t = Q.round_half_even(w / Q._expand_group_scale(s, w.shape, self.weight_group_dim)).clamp(-1, 1)
        return t.to(torch.int8), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.act_bits is not None:
            x = Q.fake_quant_activation(x, self.act_bits, self.act_granularity, self.act_groups)
        return F.linear(x, self.weight)


def thaw(model: nn.Module) -> nn.Module:
    """Replace every :class:`FrozenTernaryLinear` of ``model`` (in place) by a trainable
    ``BitLinear`` holding the latent :func:`ternary_latent` (T exact, s to float rounding), so
    that the model can be fine-tuned or saved as a native checkpoint.  Returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, FrozenTernaryLinear):
            t, s = m.quantized_weight()
            new = BitLinear(m.in_features, m.out_features, bias=False, act_bits=m.act_bits,
                            act_granularity=m.act_granularity, act_groups=m.act_groups,
                            weight_groups=m.weight_groups, weight_group_dim=m.weight_group_dim,
                            device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(ternary_latent(t, s, m.weight.dtype, m.weight_groups, m.weight_group_dim))
            new.train(m.training)
            model.set_submodule(name, new)
    return model


def _frozen_tensors(t: torch.Tensor, s: torch.Tensor | float, dtype: torch.dtype,
                    dim: str = "out") -> tuple[torch.Tensor, torch.Tensor]:
    """(s·T, s) in ``dtype``: s is rounded to ``dtype`` first so that weight == weight_scale · T exactly
    (per weight group along ``dim`` when s holds several scales)."""
    sd = torch.as_tensor(s).detach().reshape(-1).to(dtype)
    if sd.numel() == 1:
        return t.to(dtype) * sd, sd
    return t.to(dtype) * Q._expand_group_scale(sd, t.shape, dim).to(dtype), sd
