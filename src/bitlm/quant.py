"""The BitNet quantisation math — every formula bitlm uses lives here, in plain torch.

Sources (equation numbers refer to the papers):
  * BitNet (b1):      Wang et al. 2023, arXiv 2310.11453, §2 Eq. 1-15.
  * BitNet b1.58:     Ma et al. 2024, arXiv 2402.17764, §2 Eq. 1-3, and the authors'
                      "Training Tips, Code and FAQ" (reference BitLinear code, described not copied).
  * λ warm-up:        Hugging Face "Fine-tuning LLMs to 1.58bit" (warm-up quantisation).

Conventions, written down once and used everywhere else in the package:

  * Rounding rule: round half to even (``torch.round``).  ``round_half_even`` is the only
    rounding function in bitlm; the C kernels implement the same rule.
  * Scale convention: a quantised weight is ``W ≈ s · T`` with ``T`` integer ({-1,0,+1} or
    {-1,+1}) and ``s = mean|W|`` (the *absmean*, clamped ≥ 1e-5).  Formats that store ``1/s``
    (Hugging Face ``BitLinear``) are converted only in ``bitlm.io``.
  * Activations: ``x ≈ q / a`` with ``q`` integer in ``[-2^(b-1), 2^(b-1)-1]`` and
    ``a = (2^(b-1)-1) / max|x|`` (max clamped ≥ 1e-5).  For 8 bits: a = 127/max|x|, clamp to
    [-128, 127] — the reference-code reading of the paper's Q_b/γ clip (the -128 end is never hit).
  * Groups: weight groups split the *output* dimension (dim 0 of an ``nn.Linear`` weight, the
    column-parallel partition) by default, or the *input* dimension (``dim="in"``, dim 1: the
    row-parallel partition); activation groups split the *feature* dimension (the last dim).
    Each group gets its own α_g, β_g, γ_g, η_g (b1 paper Eq. 13-15): no communication across groups.
  * Non-negative (η) variant (b1 Eq. 6): x ≈ q/a + η with η = min x and q in [0, 2^(b-1)-1].
    Eq. 6 as printed keeps γ = max|x|, which saturates everything above γ + η — for an input of
    both signs (min ≈ -max) every positive value comes back as ≈ 0.  The text says the values are
    "scaled into [0, Q_b]"; ``gamma="range"`` (γ = max x - η) does exactly that and is what
    ``BitLinear(act_nonneg=True)`` uses; ``gamma="absmax"`` is the printed formula.
  * 4-bit activations (BitNet a4.8, arXiv 2411.04965 Eq. 7; BitNet v2, arXiv 2504.18415 Eq. 6):
    per-token *absmean*, x ≈ q / a with a = √7 / β, β = mean|x| (clamped ≥ 1e-5), q in [-8, 7].
    The clip is asymmetric as printed (RoundClip(·, -8, 7)); rounding is half to even as above.
  * Top-K sparsification (a4.8 Eq. 1, from Q-Sparse 2407.10969): per token, the K = ⌊frac·d⌋
    entries of largest |x| are kept (ties at the threshold: the lower feature index wins — a
    stable sort, so the mask is deterministic), the rest are zero; then int8 absmax.  The STE
    passes the gradient through the mask unchanged (Q-Sparse Eq. 13: ∂Y/∂X = ∂Y/∂(X⊙M), *not*
    zeroed where masked).  No L2 re-scaling after top-K (a4.8's Eq. 1 has none).
  * Hadamard transform (v2 Eq. 3-4, 8): the orthonormal Sylvester matrix H_m/√n over the last
    dim, as a fast Walsh–Hadamard transform.  v2 only uses power-of-two widths; for other widths
    (our choice, not the paper's) the transform is block-diagonal: ``hadamard_block(n)`` = the
    largest power of two dividing n, one H per block (orthogonal, symmetric, self-inverse; mixes
    outliers only within a block; n odd → identity).  It is a plain linear map of torch ops, so
    its gradient is H·grad (Eq. 8) with no STE.
  * Straight-through estimator: ``x + (q(x) - x).detach()`` — forward sees q(x), backward sees the
    identity (also where the clamp saturates); scales receive no gradient.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SCALE_EPS",
    "round_half_even",
    "ternary_quantize",
    "binary_quantize",
    "weight_quantize",
    "dequantize_weight",
    "activation_quantize",
    "activation_quantize_nonneg",
    "fake_quant_activation_nonneg",
    "group_layer_norm",
    "group_rms_norm",
    "ste",
    "fake_quant_weight",
    "fake_quant_activation",
    "WEIGHT_QUANTS",
    "bits_per_weight",
    "activation_quantize_absmean",
    "fake_quant_activation_absmean",
    "topk_mask",
    "fake_quant_activation_topk",
    "hadamard_block",
    "hadamard_transform",
]

#: Lower clamp for every absmean / absmax scale (FAQ reference code: ``.clamp(min=1e-5)``).
SCALE_EPS = 1e-5

#: Weight quantisation modes understood by bitlm.  ``fp`` means "no quantisation".
WEIGHT_QUANTS = ("fp", "b1", "b1.58")


def bits_per_weight(weight_quant: str) -> float:
    """Information content of one weight: 1 (binary), log2(3) ≈ 1.585 (ternary), 16 for fp (bf16)."""
    return {"b1": 1.0, "b1.58": 1.584962500721156, "fp": 16.0}[weight_quant]


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """The one rounding rule of bitlm: nearest integer, ties to even (2.5 → 2, -0.5 → -0, 1.5 → 2)."""
    return torch.round(x)


def _check_groups(n: int, groups: int, what: str) -> None:
    if groups < 1 or n % groups != 0:
        raise ValueError(f"{what}: {n} is not divisible into {groups} groups")


GROUP_DIMS = ("out", "in")


def _grouped_rows(w: torch.Tensor, groups: int, dim: str = "out") -> torch.Tensor:
    """View an (out, in) weight as (G, out·in/G): one row per partition group (output rows for
    ``dim="out"``, input columns for ``dim="in"``)."""
    if dim == "out":
        _check_groups(w.shape[0], groups, "weight groups")
        return w.reshape(groups, -1)
    if dim == "in":
        _check_groups(w.shape[1], groups, "weight groups (input dim)")
        return w.reshape(w.shape[0], groups, -1).transpose(0, 1).reshape(groups, -1)
    raise ValueError(f"weight group dim must be one of {GROUP_DIMS}, got {dim!r}")


def _expand_group_scale(scale: torch.Tensor, shape: torch.Size, dim: str = "out") -> torch.Tensor:
    """(G,) per-group scales → broadcastable against an (out, in) weight."""
    groups = scale.numel()
    if dim == "in":
        return scale.reshape(1, groups).repeat_interleave(shape[1] // groups, dim=1)  # (1, in)
    return scale.reshape(groups, 1).expand(groups, shape[0] // groups).reshape(shape[0], 1)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def ternary_quantize(w: torch.Tensor, groups: int = 1, dim: str = "out") -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean quantisation (2402.17764 Eq. 1-3).

    s_g = max(mean_g |W|, 1e-5);  T = RoundClip(W / s_g, -1, 1);  W ≈ s_g · T.

    Returns ``(T, s)`` with ``T`` int8 of ``w``'s shape and ``s`` float32 of shape ``(groups,)``.
    The paper writes W/(γ+ε); we clamp the scale instead (reference code) — identical away from 0.
    """
    wf = w.detach().float()
    rows = _grouped_rows(wf, groups, dim)  # (G, out*in/G)
    s = rows.abs().mean(dim=1).clamp(min=SCALE_EPS)  # (G,)
    t = round_half_even(wf / _expand_group_scale(s, wf.shape, dim)).clamp(-1, 1)
    return t.to(torch.int8), s


def binary_quantize(
    w: torch.Tensor, groups: int = 1, dim: str = "out"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitNet (b1) binarisation (2310.11453 Eq. 1-3, 12; groups Eq. 13).

    α_g = mean_g(W);  T = Sign(W - α_g) with Sign(v) = +1 if v > 0 else -1 (zero maps to -1, as in
    the paper; ``torch.sign`` would map it to 0);  β_g = mean_g |W| (of W itself, not W - α).

    Returns ``(T, β, α)``: T int8 in {-1, +1}, β and α float32 of shape ``(groups,)``.  W ≈ β · T.
    """
    wf = w.detach().float()
    rows = _grouped_rows(wf, groups, dim)
    alpha = rows.mean(dim=1)  # (G,)
    beta = rows.abs().mean(dim=1).clamp(min=SCALE_EPS)
    centred = wf - _expand_group_scale(alpha, wf.shape, dim)
    t = torch.where(centred > 0, 1, -1).to(torch.int8)
    return t, beta, alpha


def weight_quantize(
    w: torch.Tensor, weight_quant: str, groups: int = 1, dim: str = "out"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight to ``(T, s)`` with W ≈ s · T, for ``weight_quant`` in {"b1", "b1.58"}."""
    if weight_quant == "b1.58":
        return ternary_quantize(w, groups, dim)
    if weight_quant == "b1":
        t, beta, _ = binary_quantize(w, groups, dim)
        return t, beta
    raise ValueError(f"weight_quant must be 'b1' or 'b1.58', got {weight_quant!r}")


def dequantize_weight(
    t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, dim: str = "out"
) -> torch.Tensor:
    """W = s_g · T — the inverse of :func:`weight_quantize` (exact on the quantisation grid)."""
    s = scale.reshape(-1).float()
    return (t.float() * _expand_group_scale(s, t.shape, dim)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def _grouped_features(x: torch.Tensor, groups: int) -> torch.Tensor:
    _check_groups(x.shape[-1], groups, "activation groups")
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)  # (..., G, D/G)


def _absmax(xg: torch.Tensor, granularity: str) -> torch.Tensor:
    """γ over (..., G, D/G): per token → (..., G, 1); per tensor → (1.., G, 1)."""
    if granularity == "token":
        return xg.abs().amax(dim=-1, keepdim=True)
    if granularity == "tensor":
        dims = tuple(i for i in range(xg.dim()) if i != xg.dim() - 2)
        return xg.abs().amax(dim=dims, keepdim=True)
    raise ValueError(f"activation granularity must be 'token' or 'tensor', got {granularity!r}")


def activation_quantize(
    x: torch.Tensor, bits: int = 8, granularity: str = "token", groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantisation to ``bits`` bits (2310.11453 Eq. 4-5; 2402.17764 §2).

    γ = max|x| (per token — the last dim — or per tensor; per group of features if groups > 1),
    a = (2^(b-1) - 1) / max(γ, 1e-5),  q = clamp(round(x · a), -2^(b-1), 2^(b-1) - 1),  x ≈ q / a.

    Returns ``(q, a)`` in float32: ``q`` holds integers (cast to int8 for kernels), ``a`` has
    shape ``(..., groups)`` for per-token and ``(1.., groups)`` for per-tensor scales.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be in [2, 16], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    xg = _grouped_features(x.float(), groups)
    a = qmax / _absmax(xg, granularity).clamp(min=SCALE_EPS)
    q = round_half_even(xg * a).clamp(-qmax - 1, qmax)
    return q.reshape(x.shape), a.squeeze(-1)


def activation_quantize_nonneg(
    x: torch.Tensor, bits: int = 8, granularity: str = "token", groups: int = 1, gamma: str = "absmax"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-negative (zero-point) variant of 2310.11453 Eq. 6.

    η = min x,  q = clamp(round((x - η) · a), 0, 2^(b-1) - 1),  a = (2^(b-1) - 1) / γ,
    x ≈ q / a + η, with γ = max|x| (``gamma="absmax"``, Eq. 6 as printed: values with x - η > γ
    saturate, exactly as the paper's Clip does) or γ = max x - η (``gamma="range"``: the values
    span [0, 2^(b-1) - 1] exactly, "scaled into [0, Q_b]" as the text says; see module docstring).
    η and γ are per token or per tensor, and per feature group.

    Returns ``(q, a, η)``.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be in [2, 16], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    xg = _grouped_features(x.float(), groups)
    if granularity == "token":
        dims: int | tuple[int, ...] = -1
    elif granularity == "tensor":
        dims = tuple(i for i in range(xg.dim()) if i != xg.dim() - 2)
    else:
        raise ValueError(f"activation granularity must be 'token' or 'tensor', got {granularity!r}")
    eta = xg.amin(dim=dims, keepdim=True)
    if gamma == "absmax":
        g = xg.abs().amax(dim=dims, keepdim=True)
    elif gamma == "range":
        g = xg.amax(dim=dims, keepdim=True) - eta
    else:
        raise ValueError(f"gamma must be 'absmax' or 'range', got {gamma!r}")
    a = qmax / g.clamp(min=SCALE_EPS)
    q = round_half_even((xg - eta) * a).clamp(0, qmax)
    return q.reshape(x.shape), a.squeeze(-1), eta.squeeze(-1)


def _dequant_act(q: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
    qg = _grouped_features(q, groups)
    return (qg / a.unsqueeze(-1)).reshape(q.shape)


# ---------------------------------------------------------------------------------------------
# Normalisation before quantisation (SubLN) and its group variant (Eq. 15)
# ---------------------------------------------------------------------------------------------


def group_layer_norm(x: torch.Tensor, groups: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """LN(x) = (x - E[x]) / sqrt(Var[x] + ε), per token and per feature group; no affine params.

    With groups = 1 this is the b1 paper's LN (Eq. 11); with G groups it is Group Normalisation
    (Eq. 15).  Computed in float32 and cast back.
    """
    xg = _grouped_features(x.float(), groups)
    mu = xg.mean(dim=-1, keepdim=True)
    var = xg.var(dim=-1, unbiased=False, keepdim=True)
    return ((xg - mu) * torch.rsqrt(var + eps)).reshape(x.shape).to(x.dtype)


def group_rms_norm(x: torch.Tensor, groups: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm(x) = x / sqrt(mean(x²) + ε), per token and per feature group; no affine params
    (the norm built into the FAQ's BitLinear).  Computed in float32 and cast back."""
    xg = _grouped_features(x.float(), groups)
    return (xg * torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Straight-through estimator and fake quantisation (what BitLinear does in training)
# ---------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward: ``q`` itself; backward: the incoming gradient to ``x`` unchanged, none to ``q``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def ste(x: torch.Tensor, q: torch.Tensor, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Straight-through estimator with optional warm-up factor λ.

    Returns ``x + λ·(q - x).detach()``: the forward value is ``(1-λ)·x + λ·q`` and the gradient
    w.r.t. ``x`` is the identity (λ = 1 is the plain STE of 2310.11453 §2.2; 0 < λ < 1 is the
    HF warm-up quantisation used to fine-tune pretrained models).

    λ = 1 given as a Python number (the usual case) takes a shorter path with the same gradient:
    the forward value is ``q`` exactly (not ``x + (q - x)``, which can differ from q in the last
    bit), computed without the two extra passes over the tensor and their autograd nodes.
    """
    if not isinstance(lam, torch.Tensor) and lam == 1.0:
        q = q.detach()
        if x.requires_grad and torch.is_grad_enabled():
            return _StraightThrough.apply(x, q)
        return q
    d = (q - x).detach()
    if isinstance(lam, torch.Tensor) or lam != 1.0:
        d = d * lam
    return x + d


def fake_quant_weight(
    w: torch.Tensor, weight_quant: str, groups: int = 1, lam: float | torch.Tensor = 1.0, dim: str = "out"
) -> torch.Tensor:
    """Forward: s·T (in ``w``'s dtype); backward: identity to ``w`` (STE, no gradient to s)."""
    if weight_quant == "fp":
        return w
    t, s = weight_quantize(w, weight_quant, groups, dim)
    return ste(w, dequantize_weight(t, s, w.dtype, dim), lam)


def fake_quant_activation(
    x: torch.Tensor,
    bits: int = 8,
    granularity: str = "token",
    groups: int = 1,
    lam: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Forward: q/a (in ``x``'s dtype); backward: identity to ``x`` (STE)."""
    q, a = activation_quantize(x.detach(), bits, granularity, groups)
    return ste(x, _dequant_act(q, a, groups).to(x.dtype), lam)


def fake_quant_activation_nonneg(
    x: torch.Tensor,
    bits: int = 8,
    granularity: str = "token",
    groups: int = 1,
    lam: float | torch.Tensor = 1.0,
    gamma: str = "range",
) -> torch.Tensor:
    """The η variant as fake quantisation: forward q/a + η (in ``x``'s dtype); backward identity."""
    q, a, eta = activation_quantize_nonneg(x.detach(), bits, granularity, groups, gamma)
    deq = _grouped_features(q, groups) / a.unsqueeze(-1) + eta.unsqueeze(-1)
    return ste(x, deq.reshape(x.shape).to(x.dtype), lam)


# ---------------------------------------------------------------------------------------------
# 4-bit absmean activations, top-K sparsification (BitNet a4.8) and the Hadamard transform
# (BitNet v2's H-BitLinear)
# ---------------------------------------------------------------------------------------------


def activation_quantize_absmean(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmean quantisation (2411.04965 Eq. 7, 2504.18415 Eq. 6).

    Q_INT4(x) = β/√7 · RoundClip(√7/(β+ε) · x, -8, 7), β = mean|x| over the last dim.  Written
    here as x ≈ q / a with a = √Q / max(β, 1e-5) (the scale clamp of every other quantiser in
    this module, in place of the paper's +ε), Q = 2^(b-1) - 1 = 7 for 4 bits, and q clipped to
    [-Q-1, Q].  ``bits`` other than 4 are an extension (the papers use absmean for 4 bits only).

    Returns ``(q, a)`` in float32: ``q`` holds integers, ``a`` has shape ``x.shape[:-1]``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"absmean activation bits must be in [2, 8], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    beta = xf.abs().mean(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    a = math.sqrt(qmax) / beta  # float32: float32(√Q) / β
    q = round_half_even(xf * a).clamp(-qmax - 1, qmax)
    return q, a.squeeze(-1)


def fake_quant_activation_absmean(x: torch.Tensor, bits: int = 4, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Forward: q/a of :func:`activation_quantize_absmean` (in ``x``'s dtype); backward: identity (STE)."""
    q, a = activation_quantize_absmean(x.detach(), bits)
    return ste(x, (q / a.unsqueeze(-1)).to(x.dtype), lam)


def topk_mask(x: torch.Tensor, frac: float = 0.5) -> torch.Tensor:
    """Bool mask of the K = ⌊frac · d⌋ largest-|x| entries of each token (the last dim).

    Ties at the threshold go to the lower feature index (stable descending sort), so the mask is a
    function of the values alone.  ``frac`` in (0, 1]; K is at least 1.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"top-K fraction must be in (0, 1], got {frac}")
    d = x.shape[-1]
    k = max(1, int(math.floor(frac * d)))
    if k >= d:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    a = x.detach().abs()
    thr = a.kthvalue(d - k + 1, dim=-1, keepdim=True).values  # the K-th largest |x|
    above = a > thr
    ties = a == thr  # of the entries at the threshold, the first (K - #above) by index are kept
    return above | (ties & (ties.cumsum(-1) <= k - above.sum(-1, keepdim=True)))


def fake_quant_activation_topk(
    x: torch.Tensor, bits: int = 8, frac: float = 0.5, lam: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """a4.8's sparsified intermediate state (2411.04965 Eq. 1): (Q_INT8(x) ⊙ M), M = Top_K(|x|).

    Forward: absmax ``bits``-bit fake quantisation per token, then the mask (γ = max|x| is always
    inside the kept set, so mask-then-quantise would give the same numbers).  Backward: identity
    to ``x`` everywhere, masked entries included (Q-Sparse Eq. 13).
    """
    xd = x.detach()
    q, a = activation_quantize(xd, bits, "token")
    deq = _dequant_act(q, a, 1) * topk_mask(xd, frac)
    return ste(x, deq.to(x.dtype), lam)


def hadamard_block(n: int) -> int:
    """The Hadamard block size used for width n: n itself for a power of two, else the largest
    power of two dividing n (block-diagonal transform; 1 for odd n)."""
    if n < 1:
        raise ValueError(f"Hadamard width must be positive, got {n}")
    return n & -n


def hadamard_scale(block: int) -> float:
    """1/√block as the float32 every implementation multiplies by: computed in double, rounded once."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform over the last dim (2504.18415 Eq. 3-4).

    y = (H_m / √B) x per block of B = ``hadamard_block(d)`` features, H_m the Sylvester matrix
    (H_0 = 1, H_m = [[H, H], [H, -H]]).  Computed in float32 as log2(B) butterfly stages
    h = 1, 2, 4, ..., B/2 — (a, b) → (a + b, a - b) for the pairs (i, i + h) of every 2h-run —
    then one multiply by float32(1/√B): the native kernels (``bitlm.kernels.hadamard``) do the
    same operations in the same order, so they agree to the bit.  Cast back to ``x``'s dtype.
    Differentiable (a linear map; its gradient is the same transform, Eq. 8).
    """
    d = x.shape[-1]
    block = hadamard_block(d)
    y = x.float()
    if block == 1:
        return x
    lead = y.shape[:-1]
    h = 1
    while h < block:
        y = y.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(*lead, d) * hadamard_scale(block)
    return y.to(x.dtype)
