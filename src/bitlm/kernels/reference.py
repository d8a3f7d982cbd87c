"""Pure-torch oracle for every native kernel op — the definition the C tiers must equal bit for bit.

* :func:`gemm` — ``y[m, n] = Σ_k xq[m, k] · T[n, k]`` in int32.  T is unpacked with
  ``bitlm.packing``; the product runs as a float64 matmul, which is exact here: every product is
  an integer of magnitude ≤ 128 and every partial sum an integer of magnitude ≤ 128·K < 2^53,
  so no rounding can occur in any summation order (``torch._int_mm`` would also be exact but
  needs M > 16 and K, N multiples of 8).
* :func:`quantize_rows` — the fused RMSNorm + per-token absmax int8 quantisation.  The
  quantisation half is ``bitlm.quant.activation_quantize`` to the bit (float32, ``127 / t``
  evaluated as torch does it, ``t.reciprocal() * 127``).  The RMSNorm half is defined so that C
  can reproduce it exactly: the sum of squares is taken in float64 in a fixed order (16
  interleaved lanes summed sequentially, then folded 8-4-2-1), since torch's own float32
  reduction order is unspecified; the per-row ``1/sqrt`` is done in Python floats because
  torch's float64 ``sqrt`` is not correctly rounded.  It agrees with ``bitlm.quant.group_rms_norm`` (× weight) to
  float32 rounding, not bit for bit.
* :func:`matmul` — the dequant epilogue in its one fixed order (``bitlm.kernels.linear`` is
  :func:`quantize_rows` then :func:`matmul`, composed once for both backends):
  ``f = s_g / a_m`` (float32), ``y = float32(acc) · f`` then ``+ bias``.
* Groups (2310.11453 Eq. 13-15): ``quantize_rows(..., groups=G)`` normalises and quantises each
  of the G feature slices of a row on its own — exactly ``quantize_rows`` of the slice, with the
  slice of the norm gain — and returns ``a`` of shape (..., G); :func:`rms_norm_rows` is the
  norm half alone (per ``groups`` slices), for a norm whose groups differ from the quantiser's.
  A weight with K-slices (``PackedWeight.k_groups`` = G, input-column weight groups) or grouped
  activations runs :func:`sliced_matmul`: slice j's product is :func:`matmul` of the slice
  (int32 sums over K/G, epilogue ``float32(acc_j) · (s_{j,g} / a_{m,j})``), and the G float32
  results are added in slice order ``((y_0 + y_1) + y_2) + ...``, then the bias.  Both backends
  compose these from their own per-slice ops, so the native result is the reference's bit for bit.
* :func:`dense_int8_matmul` — float32 activations × int8 weight rows × per-row scale (an int8
  output head), with the float32 summation order the C tiers use (16 lanes, mul then add).
* :func:`dense_bf16_matmul` — float32 activations × bfloat16 weight rows (a bf16 output head),
  the same summation order, no scale.
* :func:`hadamard` — BitNet v2's orthonormal Walsh–Hadamard transform of each row:
  ``bitlm.quant.hadamard_transform`` itself (float32 butterflies h = 1, 2, ..., then one multiply
  by float32(1/√B); block-diagonal for widths that are not powers of two).
* :func:`quantize_rows_absmean` — the 4-bit absmean per-row quantiser of BitNet a4.8 / v2
  (``bitlm.quant.activation_quantize_absmean``), codes in [-8, 7] in int8 containers, so that the
  int8 × ternary :func:`gemm` gives the exact int4 × ternary sums.
* :func:`dense_lowbit_matmul` — int8 activations × 6-bit / 4-bit head rows with per-group f16
  scales (``bitlm.packing.pack_head``): exact int32 group sums, then a float32 sum over the
  groups in increasing order, divided by the activation scale.
"""

from __future__ import annotations

import math

import torch

from ..packing import PackedWeight

__all__ = ["gemm", "quantize_rows", "matmul", "rms_sumsq", "rms_norm_rows", "sliced_matmul", "quantize_slices",
           "dense_int8_matmul", "dense_bf16_matmul", "dense_int8a8_matmul", "dense_lowbit_matmul", "hadamard",
           "glu_relu2", "quantize_rows_absmean"]

_LANES = 16


def _check_xq(xq: torch.Tensor, k: int) -> None:
    if xq.dtype != torch.int8 or xq.dim() != 2:
        raise TypeError(f"xq must be an int8 (M, K) tensor, got {xq.dtype} of shape {tuple(xq.shape)}")
    if xq.shape[1] != k:
        raise ValueError(f"xq has K={xq.shape[1]} but the weight has K={k}")


def gemm(xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """int8 (M, K) × packed (N, K)ᵀ → int32 (M, N), exact."""
    _check_xq(xq, w.K)
    t = w.unpack()  # int8 (N, K)
    return (xq.double() @ t.double().t()).to(torch.int32)


def rms_sumsq(x: torch.Tensor) -> torch.Tensor:
    """Σ_k x_k² per row (float64) in the documented order: lane j (0..15) sums k = j, j+16, ...
    sequentially from +0.0, then lanes fold l[j] += l[j+8], += l[j+4], += l[j+2], += l[j+1].

    ``torch.cumsum`` over the chunk axis is a sequential left-to-right scan in float64, which is
    exactly one lane's loop; the tests check it against an explicit Python loop.
    """
    m, k = x.shape
    kp = -(-k // _LANES) * _LANES
    sq = x.double().square()  # exact: a float32 squared fits in float64's 53-bit mantissa
    if kp != k:
        sq = torch.nn.functional.pad(sq, (0, kp - k))  # +0.0 terms change nothing
    lanes = sq.reshape(m, kp // _LANES, _LANES).cumsum(dim=1)[:, -1, :]  # (M, 16)
    lanes = lanes[:, :8] + lanes[:, 8:]
    lanes = lanes[:, :4] + lanes[:, 4:]
    lanes = lanes[:, :2] + lanes[:, 2:]
    return lanes[:, 0] + lanes[:, 1]


def _rms_norm(y: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The RMSNorm half of :func:`quantize_rows` on float32 (M, K) rows."""
    k = y.shape[1]
    # torch's float64 sqrt is not correctly rounded (1 ulp off for ~1% of inputs here), C's
    # is: do the per-row scalar chain in Python floats (IEEE double, correctly rounded).
    ss = rms_sumsq(y).tolist()
    r = [1.0 / math.sqrt(v / k + float(eps)) for v in ss]
    r = torch.tensor(r, dtype=torch.float64).to(torch.float32).reshape(-1, 1)  # (M, 1)
    y = y * r
    if norm_weight is not None:
        y = y * norm_weight.to(torch.float32).reshape(1, k)
    return y


def quantize_rows(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    rmsnorm: bool | None = None,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Optionally RMS-normalise and) absmax-quantise each row of a float32 (..., K) tensor.

    ``rmsnorm`` defaults to ``norm_weight is not None``.  With RMSNorm:
    ``r = float32(1 / sqrt(Σx²/K + eps))`` (float64 math, sum order of :func:`rms_sumsq`),
    ``y = (x · r) · norm_weight`` (float32, two roundings).  Then
    ``a = (1 / max(max|y|, 1e-5)) · 127`` and ``q = clamp(round_half_even(y · a), -128, 127)``.

    Returns ``(q, a)``: int8 of x's shape and float32 of shape ``x.shape[:-1]`` — or
    ``x.shape[:-1] + (groups,)`` with ``groups`` > 1 (:func:`quantize_slices`).
    """
    if rmsnorm is None:
        rmsnorm = norm_weight is not None
    if groups != 1:
        return quantize_slices(quantize_rows, x, norm_weight, eps, rmsnorm, groups)
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_rows expects float32 input, got {x.dtype}")
    lead, k = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, k)
    if rmsnorm:
        y = _rms_norm(y, norm_weight, eps)
    # --- from here on exactly bitlm.quant.activation_quantize(bits=8, token granularity) ---
    a = 127 / y.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)  # (M, 1) float32
    q = torch.round(y * a).clamp(-128, 127).to(torch.int8)
    return q.reshape(x.shape), a.reshape(lead)


def _check_groups(k: int, groups: int, what: str) -> None:
    if groups < 1 or k % groups:
        raise ValueError(f"{what}: {k} features are not divisible into {groups} groups")


def quantize_slices(op, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, rmsnorm: bool,
                    groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped :func:`quantize_rows` from an ungrouped one (``op``, either backend's): slice g of
    every row (features ``g·K/G .. (g+1)·K/G - 1``) with gain slice g → (q (..., K), a (..., G))."""
    lead, k = x.shape[:-1], x.shape[-1]
    _check_groups(k, groups, "activation groups")
    x2 = x.reshape(-1, k)
    kk = k // groups
    nw = None if norm_weight is None else norm_weight.reshape(-1)
    qs, as_ = [], []
    for g in range(groups):
        sl = slice(g * kk, (g + 1) * kk)
        q, a = op(x2[:, sl].contiguous(), None if nw is None else nw[sl].contiguous(), eps, rmsnorm=rmsnorm)
        qs.append(q)
        as_.append(a.reshape(-1))
    return torch.cat(qs, dim=1).reshape(x.shape), torch.stack(as_, dim=-1).reshape(*lead, groups)


def rms_norm_rows(x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                  groups: int = 1) -> torch.Tensor:
    """The RMSNorm half of :func:`quantize_rows` alone, statistics per group of ``groups`` feature
    slices (float32 (..., K) → float32 (..., K)); ``quantize_rows(rms_norm_rows(x, w, eps, G),
    groups=G)`` equals ``quantize_rows(x, w, eps, groups=G)`` bit for bit."""
    if x.dtype != torch.float32:
        raise TypeError(f"rms_norm_rows expects float32 input, got {x.dtype}")
    k = x.shape[-1]
    _check_groups(k, groups, "norm groups")
    kk = k // groups
    y = x.reshape(-1, groups, kk).reshape(-1, kk)  # (M·G, K/G)
    y = _rms_norm(y, None, eps).reshape(-1, k)
    if norm_weight is not None:
        y = y * norm_weight.to(torch.float32).reshape(1, k)
    return y.reshape(x.shape)


def _epilogue(acc: torch.Tensor, a: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    m, n = acc.shape
    f = w.scale.reshape(1, w.groups) / a.to(torch.float32).reshape(m, 1)  # (M, G) float32
    f = f.repeat_interleave(n // w.groups, dim=1)  # (M, N)
    y = acc.to(torch.float32) * f
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, n)
    return y


def matmul(xq: torch.Tensor, a: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantised product of quantised activations (xq, a) and a packed weight: float32 (M, N).
    ``a`` of shape (M, G) (grouped activations) or a weight with K-slices: :func:`sliced_matmul`."""
    if w.k_groups > 1 or a.numel() != xq.shape[0]:
        return sliced_matmul(matmul, xq, a, w, bias)
    return _epilogue(gemm(xq, w), a.reshape(-1), w, bias)


def sliced_matmul(op, xq: torch.Tensor, a: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The grouped product from an ungrouped ``op`` (either backend's matmul): activations with G_a
    scales per row (``a`` (M, G_a)) × a weight of ``w.k_groups`` K-slices (a multiple of G_a:
    each slice lies inside one activation group).  y = ((y_0 + y_1) + ...) + bias, y_j = op of
    slice j with its activation group's scale."""
    m = xq.shape[0]
    a2 = a.reshape(m, -1)
    ga, gk = a2.shape[1], w.k_groups
    if gk % ga:
        raise ValueError(f"{ga} activation groups do not fit a weight packed in {gk} K-slice(s) "
                         f"(K={w.K}, N={w.N}): pack the weight with k_groups a multiple of {ga}")
    if xq.shape[1] != w.K:
        raise ValueError(f"xq has K={xq.shape[1]} but the weight has K={w.K}")
    kk, per = w.K // gk, gk // ga
    y = None
    for j, wj in enumerate(w.slices()):
        yj = op(xq[:, j * kk:(j + 1) * kk].contiguous(), a2[:, j // per].contiguous(), wj, None)
        y = yj if y is None else y + yj
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, w.N)
    return y


def _dense_lanes(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) × float32 (N, K) → (..., N): lane j (0..15) accumulates k = j, j+16, ...
    as ``acc + x·w`` (product rounded, then sum; no FMA) from +0.0, lanes fold 8-4-2-1 — the
    float32 order of the native dense kernels.  Padding K to 16 adds 0·0 = +0.0 terms, which
    leave every lane unchanged (a lane that starts at +0.0 is never -0.0)."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[0]
    x2 = x.reshape(-1, k).to(torch.float32)
    m = x2.shape[0]
    kp = -(-k // _LANES) * _LANES
    xp = torch.nn.functional.pad(x2, (0, kp - k)).reshape(m, 1, kp // _LANES, _LANES)
    wp = torch.nn.functional.pad(w, (0, kp - k)).reshape(1, n, kp // _LANES, _LANES)
    acc = torch.zeros(m, n, _LANES)
    for c in range(kp // _LANES):  # sequential per lane; eager torch never fuses mul + add
        acc = acc + xp[:, :, c, :] * wp[:, :, c, :]
    acc = acc[..., :8] + acc[..., 8:]
    acc = acc[..., :4] + acc[..., 4:]
    acc = acc[..., :2] + acc[..., 2:]
    return (acc[..., 0] + acc[..., 1]).reshape(*lead, n)


def _check_dense(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if weight.dtype != dtype or weight.dim() != 2:
        raise TypeError(f"weight must be {what} (N, K) tensor, got {weight.dtype} {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={weight.shape[1]}")


def dense_int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) × int8 (N, K) rows × float32 (N,) row scales → float32 (..., N).

    ``y[m, n] = (Σ_k x[m, k] · w[n, k]) · scale[n]`` with the sum in float32 in a fixed order:
    lane j (0..15) accumulates k = j, j+16, ... as ``acc + x·w`` (product rounded, then sum;
    no FMA), lanes fold 8-4-2-1 — exactly what every native tier computes.
    """
    _check_dense(x, weight, torch.int8, "an int8")
    n = weight.shape[0]
    return _dense_lanes(x, weight.to(torch.float32)) * scale.to(torch.float32).reshape(n)


#: The int32 sums of the W8A8 head are exact for K below this (|sum| <= 128 · 128 · K < 2^31).
I8A8_MAX_K = 131072


def dense_int8a8_matmul(xq: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 head: quantised activations (xq int8 (M, K), a float32 (M,), x ≈ xq / a, as from
    :func:`quantize_rows`) × int8 (N, K) rows with float32 (N,) scales → float32 (M, N).

    ``acc = Σ_k xq[m, k] · w[n, k]`` exactly (int32), then ``y = float32(acc) · (scale[n] / a[m])``,
    the BitLinear epilogue; integer sums have no order, so every native tier gives these bits.
    """
    _check_dense(xq, weight, torch.int8, "an int8")
    _check_xq(xq, weight.shape[1])
    if xq.shape[1] >= I8A8_MAX_K:
        raise ValueError(f"W8A8 head needs K < {I8A8_MAX_K}, got {xq.shape[1]}")
    acc = (xq.double() @ weight.double().t()).to(torch.int32)  # exact: |sum| < 2^31 < 2^53
    m, n = acc.shape
    f = scale.to(torch.float32).reshape(1, n) / a.to(torch.float32).reshape(m, 1)
    return acc.to(torch.float32) * f


def dense_bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) × bfloat16 (N, K) rows → float32 (..., N).

    ``y[m, n] = Σ_k x[m, k] · float32(w[n, k])`` (the bf16 → float32 conversion is exact; x is
    not rounded to bf16), summed in the order of :func:`dense_int8_matmul`, with no scale.
    """
    _check_dense(x, weight, torch.bfloat16, "a bfloat16")
    return _dense_lanes(x, weight.to(torch.float32))


def linear_bf16(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bfloat16 (..., K) → bfloat16 (..., N): :func:`quantize_rows` of ``x.float()`` (exact), the
    packed :func:`matmul` (float32 epilogue, + bias), rounded to bfloat16 once (torch's rounding)."""
    if x.dtype != torch.bfloat16 or x.dim() < 1:
        raise TypeError(f"linear_bf16 expects a bfloat16 (..., K) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    q, a = quantize_rows(x.reshape(-1, x.shape[-1]).float())
    return matmul(q, a, w, bias).to(torch.bfloat16).reshape(*x.shape[:-1], w.N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``weight * (x · rsqrt(mean x² + eps)).to(dtype)`` (LlamaRMSNorm, BitNetRMSNorm)
    on float32 or bfloat16 (..., K) rows, with bitlm's norm factor: ``r = float32(1 / sqrt(Σx²/K +
    eps))`` in float64 from :func:`rms_sumsq` (torch takes a float32 mean and rsqrt: ``r`` may
    differ in the last bit); ``n = dtype(x · r)``, ``y = dtype(float32(weight) · n)`` — a bf16
    row rounded twice, as torch does."""
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        raise TypeError(f"rms_norm expects float32 or bfloat16 x and weight of its dtype, got {x.dtype}, {weight.dtype}")
    k = x.shape[-1]
    xf = x.reshape(-1, k).float()
    r = [1.0 / math.sqrt(v / k + float(eps)) for v in rms_sumsq(xf).tolist()]
    r = torch.tensor(r, dtype=torch.float64).to(torch.float32).reshape(-1, 1)
    n = (xf * r).to(x.dtype).float()
    return (weight.float().reshape(1, k) * n).to(x.dtype).reshape(x.shape)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) → float32 (..., K): the orthonormal (block) Walsh–Hadamard transform of
    each row, ``bitlm.quant.hadamard_transform`` — the definition the native tiers equal bit for bit."""
    from ..quant import hadamard_transform

    return hadamard_transform(x.to(torch.float32))


def rope_rows_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on float32 (M, H, D) rows, (M, D) cos / sin: ``bitlm.model.apply_rope``'s
    x·cos + rotate_half(x)·sin, the same operations in the same order; returns x."""
    c, s = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    r = torch.cat([-x2, x1], dim=-1).mul_(s)
    return x.mul_(c).add_(r)


def glu_relu2(y: torch.Tensor) -> torch.Tensor:
    """float32 (M, 2F) gate then up values → (M, F) relu(g)² · u (squared, then times u)."""
    g, u = y.float().chunk(2, dim=-1)
    return torch.relu(g).square_().mul_(u)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.max(-1).indices``: the first of tied maxima, the first NaN if any."""
    return x.max(-1).indices


def quantize_rows_absmean(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmean quantisation (a4.8 Eq. 7): int8 (..., K) codes in [-2^(b-1), 2^(b-1) - 1]
    and float32 (...,) scales a (x ≈ q / a), exactly ``bitlm.quant.activation_quantize_absmean``."""
    from ..quant import activation_quantize_absmean

    q, a = activation_quantize_absmean(x.to(torch.float32), bits)
    return q.to(torch.int8), a
def dense_lowbit_matmul(xq: torch.Tensor, a: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bits: int,
                        n: int) -> torch.Tensor:
    """Low-bit head (``bitlm.packing.pack_head``: w in [-31, 31] or [-7, 7], one f16 scale per row
    and group of 32 columns) × quantised activations (xq int8 (M, K), a float32 (M,)) → float32 (M, N).

    ``acc_g = Σ_{k in group g} xq[m, k] · w[n, k]`` exactly (int32; a float64 matmul of integers
    below 2^53 is exact), then ``sum = +0.0; sum = sum + float32(acc_g) · float32(s[n, g])`` for
    g = 0, 1, ... (product rounded, then added), ``y = sum / a[m]`` — what every native tier
    computes (csrc/bitlm_kernels.h, "low-bit heads")."""
    from ..packing import HEAD_GROUP, unpack_head

    k = xq.shape[1]
    w, s = unpack_head(data, scale, bits, n, k)
    _check_xq(xq, k)
    m = xq.shape[0]
    groups = s.shape[1]
    kp = groups * HEAD_GROUP
    xd = torch.nn.functional.pad(xq.double(), (0, kp - k))
    wd = torch.nn.functional.pad(w.double(), (0, kp - k))
    acc = torch.zeros(m, n, dtype=torch.float32)
    for g in range(groups):  # sequential over groups; eager torch never fuses mul + add
        cols = slice(g * HEAD_GROUP, (g + 1) * HEAD_GROUP)
        ag = (xd[:, cols] @ wd[:, cols].t()).to(torch.int32).to(torch.float32)  # exact: |acc_g| < 2^17
        acc = acc + ag * s[:, g].reshape(1, n)
    return acc / a.to(torch.float32).reshape(m, 1)


# ---- the fast QAT step's element passes (csrc/qat.c; bitlm.layers' BitLinear training path) ----


def qat_rows_to_f32(q: torch.Tensor, f: torch.Tensor, op: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 (M, K) → float32 (M, K): ``op="div"``: q / f[m] (X_fq = q / a, the STE's grad_W
    operand), ``op="mul"``: q · f[m] (W_fq = T · s, its grad_x operand); ``f`` (M,) or one value
    for every row.  A float copy, then one in-place op: what ``bitlm.quant`` computes.  ``out``:
    a float32 (M, K) tensor to write into (a reused buffer) instead of a new one."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"qat_rows_to_f32 expects an int8 (M, K) tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if op not in ("div", "mul"):
        raise ValueError(f"op must be 'div' or 'mul', got {op!r}")
    col = f.to(torch.float32).reshape(-1, 1)
    y = q.to(torch.float32) if out is None else out.copy_(q)
    return y.div_(col) if op == "div" else y.mul_(col)


def qat_ternary(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """b1.58 weight codes of float32 ``w`` for the absmean scale ``s`` (one value):
    ``clamp(round_half_even(w / s), -1, 1)`` as int8 — ``bitlm.quant.ternary_quantize``'s T."""
    return torch.round(w.to(torch.float32) / s.to(torch.float32).reshape(1)).clamp(-1, 1).to(torch.int8)


def qat_binary(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """b1 weight codes of float32 ``w`` for its mean ``alpha`` (one value): +1 where w - α > 0,
    else -1 (zero maps to -1), as int8 — ``bitlm.quant.binary_quantize``'s T."""
    centred = w.to(torch.float32) - alpha.to(torch.float32).reshape(1)
    return torch.where(centred > 0, 1, -1).to(torch.int8)


def qat_quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax int8 codes of float32 (M, K): ``a = 127 / max(max|x|, 1e-5)`` (one
    float32, shape (1,)), ``q = clamp(round_half_even(x · a), -128, 127)`` as int8 —
    ``bitlm.quant.activation_quantize(x, 8, "tensor")``."""
    if x.dtype != torch.float32:
        raise TypeError(f"qat_quantize_tensor expects float32 input, got {x.dtype}")
    a = 127 / x.abs().amax().clamp(min=1e-5).reshape(1)
    return torch.round(x * a).clamp(-128, 127).to(torch.int8), a
