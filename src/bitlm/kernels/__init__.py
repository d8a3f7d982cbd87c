"""Kernel API of bitlm: packed-weight matmuls and the fused activation quantiser, with a native
(C, SIMD, threaded) backend and a pure-torch reference backend that define the same numbers.

Backend choice, per call, from ``BITLM_BACKEND``:

* unset / ``auto`` — native if the library loads, else the reference (with one loud warning
  saying why);
* ``native`` — the library must load, otherwise every call raises (CI and benchmarks use this);
* ``reference`` — always torch (slow, exact, the oracle).

The native tier and thread count are chosen by ``BITLM_KERNEL_TIER`` and ``BITLM_NUM_THREADS``
(or :func:`set_tier` / :func:`set_num_threads`).  Formats without a native kernel (``hf``) run
on the reference path.  Every op is exact integer arithmetic up to the final, documented
float32 epilogue ``y = float32(acc) · (s_g / a_m) + bias`` — see ``csrc/bitlm_kernels.h``.

    q, a = kernels.quantize_rows(x, norm_weight, eps)   # int8 (M, K), float32 (M,)
    acc = kernels.gemm(q, w)                            # int32 (M, N)
    y = kernels.matmul(q, a, w, bias)                   # float32 (M, N)
    y = kernels.linear(x, w, bias, norm_weight, eps)    # all three in one call
    logits = kernels.dense_int8_matmul(h, w8, row_scale) # int8 output head
    logits = kernels.dense_bf16_matmul(h, w_bf16)        # bf16 output head
    logits = kernels.dense_lowbit_matmul(q, a, data, scale, 4, vocab)  # 4/6-bit grouped head
    y16 = kernels.linear_bf16(x16, w, bias)             # bf16 rows in and out, one call
    h = kernels.rms_norm(x, weight, eps)                # transformers' RMSNorm, float32 or bf16
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from ..packing import PackedWeight
from . import reference

__all__ = ["gemm", "matmul", "quantize_rows", "linear", "dense_int8_matmul", "dense_bf16_matmul", "dense_int8a8_matmul",
           "dense_lowbit_matmul", "linear_bf16", "rms_norm", "hadamard", "glu_relu2", "rope_rows_", "quantize_rows_absmean", "backend", "backend_info",
           "set_num_threads", "num_threads", "set_tier", "reference"]

_warned = False


def _native_or_none() -> ModuleType | None:
    from . import native

    mode = os.environ.get("BITLM_BACKEND", "auto").lower()
    if mode == "reference":
        return None
    if native._lib is not None or native.load() is not None:
        return native
    if mode == "native":
        raise RuntimeError(f"BITLM_BACKEND=native but the native kernels are unavailable: {native.reason()}")
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"bitlm: native kernels unavailable ({native.reason()}); using the slow pure-torch "
                      "reference kernels (set BITLM_BACKEND=reference to silence this)", RuntimeWarning,
                      stacklevel=3)
    return None


def _impl(w: PackedWeight | None = None) -> ModuleType:
    nat = _native_or_none()
    if nat is None or (w is not None and w.fmt.native_id is None):
        return reference
    return nat


def backend() -> str:
    """"native" or "reference": what the next call would use (loads the library if needed)."""
    return "native" if _native_or_none() is not None else "reference"


def gemm(xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """int8 (M, K) activations × packed weight (N, K) → exact int32 (M, N) = xq · Tᵀ."""
    impl = _impl(w)
    if w.k_groups > 1:  # K-slices: the exact int32 sum of the slices' products
        kk = w.K // w.k_groups
        return sum(impl.gemm(xq[:, j * kk:(j + 1) * kk].contiguous(), wj) for j, wj in enumerate(w.slices()))
    return impl.gemm(xq, w)


def matmul(xq: torch.Tensor, a: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantised product: float32 (M, N) = float32(xq · Tᵀ) · (s_g / a_m) (+ bias).  Grouped
    activations (``a`` (M, G)) or a weight with K-slices: one product per slice, summed in slice
    order (``reference.sliced_matmul``), on either backend."""
    impl = _impl(w)
    if w.k_groups > 1 or a.numel() != xq.shape[0]:
        return reference.sliced_matmul(impl.matmul, xq, a, w, bias)
    return impl.matmul(xq, a, w, bias)


def quantize_rows(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    rmsnorm: bool | None = None,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm if ``norm_weight`` is given or ``rmsnorm=True``, then) per-row absmax int8
    quantisation of float32 (..., K): returns ``(q int8 (..., K), a float32 (...))`` with
    ``x ≈ q / a``.  Without the norm it equals ``bitlm.quant.activation_quantize`` bit for bit.
    ``groups`` > 1: norm statistics and absmax per feature slice, ``a`` (..., groups)."""
    impl = _impl()
    if rmsnorm is None:
        rmsnorm = norm_weight is not None
    if groups != 1:
        return reference.quantize_slices(impl.quantize_rows, x, norm_weight, eps, rmsnorm, groups)
    return impl.quantize_rows(x, norm_weight, eps, rmsnorm=rmsnorm)


def linear(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    rmsnorm: bool | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """BitLinear inference: float32 (..., K) → float32 (..., N) = W · quant(norm(x)) (+ bias).

    Composed here, once, from the backend's two ops (:func:`quantize_rows` then :func:`matmul`);
    a weight format without a native kernel runs both on the reference backend.  ``groups``:
    activation (and norm) groups, as in :func:`quantize_rows`."""
    if x.dtype != torch.float32:
        x = x.float()
    impl = _impl(w)
    if rmsnorm is None:
        rmsnorm = norm_weight is not None
    x2 = x.reshape(-1, x.shape[-1])
    if groups != 1:
        q, a = reference.quantize_slices(impl.quantize_rows, x2, norm_weight, eps, rmsnorm, groups)
    else:
        q, a = impl.quantize_rows(x2, norm_weight, eps, rmsnorm=rmsnorm)
    if w.k_groups > 1 or groups != 1:
        y = reference.sliced_matmul(impl.matmul, q, a, w, bias)
    else:
        y = impl.matmul(q, a, w, bias)
    return y.reshape(*x.shape[:-1], w.N)


def linear_bf16(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bfloat16 (..., K) → bfloat16 (..., N): :func:`quantize_rows` of the (exact) float32 values,
    :func:`matmul` and one rounding to bfloat16 — a bf16 model's BitLinear in one native call
    (no float32 copies on the torch side).  Weights with K-slices compose the three steps."""
    impl = _impl(w)
    if w.k_groups > 1:
        q, a = impl.quantize_rows(x.reshape(-1, x.shape[-1]).float())
        return matmul(q, a, w, bias).to(torch.bfloat16).reshape(*x.shape[:-1], w.N)
    return impl.linear_bf16(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (``weight * (x · rsqrt(mean x² + eps)).to(dtype)``) on float32 or
    bfloat16 rows in one call; the norm factor as :func:`quantize_rows` computes it (float64
    sum, may differ from torch's float32 mean in the last bit).  See ``reference.rms_norm``."""
    return (_native_or_none() or reference).rms_norm(x, weight, eps)


def dense_int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Output head stored as int8 rows with per-row scales: float32 (..., K) → (..., N) =
    (x · wᵀ) · scale, float32 sums in the fixed order of ``csrc/bitlm_kernels.h`` (decode is
    memory-bound at 1 byte per weight; the matrix is never converted to float)."""
    nat = _native_or_none()
    return (nat or reference).dense_int8_matmul(x, weight, scale)


def dense_int8a8_matmul(xq: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 output head: quantised activations (xq, a) from :func:`quantize_rows` × int8 rows with
    per-row scales → float32 (M, N) = float32(xq · wᵀ) · (scale / a), exact int32 sums (one
    vpdpbusd per 64 weights, where the float path converts, multiplies and adds every weight)."""
    nat = _native_or_none()
    return (nat or reference).dense_int8a8_matmul(xq, a, weight, scale)


def dense_lowbit_matmul(xq: torch.Tensor, a: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bits: int,
                        n: int) -> torch.Tensor:
    """6-bit / 4-bit output head (``bitlm.packing.pack_head``, one f16 scale per row and 32
    columns) read with quantised activations (xq, a) → float32 (M, N): exact int32 group sums,
    a float32 sum over the groups in order, divided by ``a`` (W6A8 / W4A8)."""
    nat = _native_or_none()
    return (nat or reference).dense_lowbit_matmul(xq, a, data, scale, bits, n)


def dense_bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Output head stored as bfloat16 rows: float32 (..., K) → (..., N) = x · float32(w)ᵀ, float32
    sums in the fixed order of ``csrc/bitlm_kernels.h`` (x stays float32; decode is memory-bound
    at 2 bytes per weight; the matrix is never converted as a whole)."""
    nat = _native_or_none()
    return (nat or reference).dense_bf16_matmul(x, weight)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """BitNet v2's H-BitLinear transform: float32 (..., K) → (..., K), the orthonormal Walsh–Hadamard
    transform of each row (block-diagonal with the largest power-of-two block dividing K), the
    same float32 butterflies in the same order on every backend and tier (``csrc/hadamard_impl.h``)."""
    nat = _native_or_none()
    return (nat or reference).hadamard(x)


def rope_rows_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on float32 contiguous (M, H, D) rows (every head of a token's
    q or k) with that row's (M, D) cos / sin: ``bitlm.model.apply_rope``'s x·cos +
    rotate_half(x)·sin, the same bits on every backend (the native op is the fused decode
    step's loop, rows on the thread pool; torch's chunk / cat / mul / add took ~2 ms a layer in
    a 512-token prefill).  Returns x."""
    nat = _native_or_none()
    return (nat or reference).rope_rows_(x, cos, sin)


def glu_relu2(y: torch.Tensor) -> torch.Tensor:
    """The ReLU² gated FFN activation of float32 (M, 2F) rows (gate then up values) → (M, F)
    ``relu(g)² · u``, the same bits on every backend (the native op is the fused decode step's
    loop: one call instead of three multi-threaded torch ops, which cost ~1 ms each at M = 8
    on a loaded 2-core machine)."""
    nat = _native_or_none()
    return (nat or reference).glu_relu2(y)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Indices of the largest value along the last dimension, exactly ``x.max(-1).indices`` (the
    first of tied maxima, the first NaN if any): the greedy next-token pick.  Native for float32
    CPU rows: one pass, without torch's reduction machinery (~0.4 ms of a decode token on a 128k
    vocabulary, since it runs with cold caches right after the token's weights streamed through)."""
    nat = _native_or_none()
    return (nat or reference).argmax(x)


def quantize_rows_absmean(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet a4.8 / v2 4-bit activations: per-row absmean codes in [-8, 7] as int8 (M, K) and
    float32 (M,) scales (x ≈ q / a) — ready for :func:`matmul`, whose int8 × ternary sums are then
    exactly the int4 × ternary ones.  Torch only (``reference``): the per-row cost is small beside
    the product, and no native twin has been measured faster yet."""
    return reference.quantize_rows_absmean(x.reshape(-1, x.shape[-1]), bits)


def set_num_threads(n: int) -> int:
    """Threads of the native kernel pool (default: env BITLM_NUM_THREADS, else all CPUs this
    process may use).  Returns the previous value.  No-op (returns 1) on the reference backend."""
    nat = _native_or_none()
    return nat.set_num_threads(n) if nat is not None else 1


def num_threads() -> int:
    nat = _native_or_none()
    return nat.num_threads() if nat is not None else 1


def set_tier(name: str) -> None:
    """Force a native kernel tier: "generic", "avx2" or "avx512" (raises if unsupported here)."""
    nat = _native_or_none()
    if nat is None:
        raise RuntimeError("no native backend: kernel tiers do not apply")
    nat.set_tier(name)


def backend_info() -> dict:
    """What runs the kernels and why: backend, tier, threads, reason, plus library details.

    Never raises: with ``BITLM_BACKEND=native`` and no library it reports the error as reason.
    """
    from . import native

    mode = os.environ.get("BITLM_BACKEND", "auto").lower()
    out: dict = {"backend": "reference", "requested": mode, "tier": None, "threads": None, "reason": None,
                 "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if mode == "reference":
        out["reason"] = "BITLM_BACKEND=reference"
        return out
    if native.load() is None:
        out["reason"] = native.reason()
        out["library"] = native.library_path()
        return out
    out.update(native.info())
    out["backend"] = "native"
    out["reason"] = out.pop("tier_note")
    return out


# ---- the fast QAT step's element passes (bitlm.layers; csrc/qat.c, twins in reference.py) -------


__all__ += ["qat_rows_to_f32", "qat_ternary", "qat_binary", "qat_quantize_tensor"]


def _qat_impl() -> ModuleType:
    return _native_or_none() or reference


def qat_rows_to_f32(q: torch.Tensor, f: torch.Tensor, op: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 (M, K) → float32 (M, K) in one pass: ``q / f[m]`` (``op="div"``: the STE's X_fq = q / a)
    or ``q · f[m]`` (``"mul"``: W_fq = T · s); ``f`` (M,) or one value for all rows.  The same bits
    as the torch ops on every backend and tier.  ``out``: a contiguous float32 (M, K) tensor to
    write into instead of a new one (the fast QAT step reuses its X_fq buffers)."""
    return _qat_impl().qat_rows_to_f32(q, f, op, out)


def qat_ternary(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """b1.58 codes ``clamp(round_half_even(w / s), -1, 1)`` (int8) of a float32 weight for its
    absmean scale ``s``, in one pass (torch: divide, round, clamp, cast)."""
    return _qat_impl().qat_ternary(w, s)


def qat_binary(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """b1 codes (+1 where w - α > 0, else -1; int8) of a float32 weight for its mean ``alpha``, in
    one pass (torch: subtract, compare, select, cast)."""
    return _qat_impl().qat_binary(w, alpha)


def qat_quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax int8 codes of float32 (..., K) and the one scale a (shape (1,)), in two
    passes (torch: six ops) — ``bitlm.quant.activation_quantize(x, 8, "tensor")``."""
    return _qat_impl().qat_quantize_tensor(x)
