"""Post-training quantisation (PTQ) baselines for a trained floating-point model.

The BitNet paper (Wang et al. 2023, arXiv 2310.11453, Table 3 / Fig. 6) compares its
quantisation-aware-trained models with PTQ of an fp Transformer at the same bit width: Absmax and
SmoothQuant at W8A8 / W4A4 / W1A8, GPTQ at W4A16 / W2A16 (and QuIP W2A16, not implemented here).
This module produces those baselines for any model whose projections are ``nn.Linear``
(``BitNetModel`` with ``quant="fp"``, or any module mapping token ids to logits).  Embeddings and
the output head are never quantised (``bitlm.model.linear_modules`` and weight tying decide).

Methods (``METHODS``; ``quantize_model(model, name, calib_ids, **opts)``):

* ``absmax-*`` — round-to-nearest (RTN), no calibration.  Weights: symmetric absmax to b bits,
  per output channel (default) or per tensor: ``s = max|W| / (2^(b-1) - 1)``, ``q = clamp(round(W/s),
  -2^(b-1), 2^(b-1) - 1)``, ``W ≈ s·q``.  Activations: per-token absmax to b bits, dynamic, with
  ``bitlm.quant.activation_quantize`` (the same rule BitLinear uses).  ``w1.58`` applies the BitNet
  b1.58 absmean ternary quantiser post hoc (``quant.ternary_quantize``, per tensor, 2402.17764
  Eq. 1-3) and ``w1`` the BitNet b1 binariser ``sign(W - α)·mean|W|`` (``quant.binary_quantize``,
  2310.11453 Eq. 1-3, 12).  All rounding is ``quant.round_half_even`` (ties to even).
* ``smoothquant-*`` — SmoothQuant (Xiao et al. 2022, arXiv 2211.10438, §4): per input channel
  ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (α = 0.5) from calibration activations, ``X' = X/s``,
  ``W' = W·diag(s)``, then the absmax quantisers above.  The smoothing is applied as an explicit
  input scale inside ``PTQLinear`` (``x / input_scale`` before the activation quantiser), not folded
  into the preceding op: that keeps the code model-agnostic.  Layers that read the *same* tensor
  (q/k/v, gate/up) share one ``s`` computed from the max over all their weights, exactly as in the
  paper, so the scale *can* be folded into the norm that produces that tensor (in ``BitNetModel``
  every projection input is a norm output) — the results are what a folded deployment computes.
* ``gptq-*`` — GPTQ (Frantar et al. 2022, arXiv 2210.17323, Alg. 1): per layer, with
  ``H = 2 X Xᵀ / N`` from calibration inputs plus damping ``λ·mean(diag H)`` (λ = 0.01), the upper
  Cholesky factor of ``H⁻¹``, column-by-column quantisation with error feedback, lazy batch updates
  in blocks of 128 columns, and optional act-order and grouping.  Grids: per-row (or per-group)
  asymmetric min-max (the paper's default), symmetric absmax, or ternary ``{-s, 0, +s}`` per row with
  ``s`` = absmean or found by a small grid search on the RTN error.  Calibration is sequential
  (the standard "true-sequential" order): the layers are grouped into stages that read the same
  tensor (q/k/v → o → gate/up → down → next block ...), and each stage's Hessian is taken from a
  forward pass through the model whose earlier stages are *already quantised*, so GPTQ corrects
  the error that reaches each layer.  Inputs are captured with forward pre-hooks and the forward is
  stopped right after the stage's input is seen.  ``sequential=False`` captures every Hessian in one
  pass on the fp model instead.

Library decision (GPTQ).  We implemented GPTQ here (~100 lines of torch) rather than depend on a
package.  ``auto-gptq`` is archived (since March 2025; its README sends users to ``gptqmodel``).
``gptqmodel`` 7.7 requires torch >= 2.14.1 (the project installs the CPU build 2.13), compiles
native extensions from its sdist and pulls transformers, accelerate, datasets, torchao, device-smi
and more; ``llmcompressor`` 0.14 pins ``transformers <= 5.17`` (the dev extra resolves 5.2x) and
brings compressed-tensors, auto-round and nvidia-ml-py.  Both drive Hugging Face model classes
only (not ``BitNetModel`` or an arbitrary nn.Module), and neither has the ternary grid the BitNet
comparison needs.  torchao's GPTQ module targets its int4 GPU tensor subclasses and is slated for
removal; ``hqq`` and ``optimum-quanto`` do not implement GPTQ.  The algorithm itself is small,
fast enough on CPU at bitlm's scales, and testable against itself (an identity Hessian must give
round-to-nearest; lazy batching must not change the result; the Cholesky form must match the
paper's explicit H⁻¹ downdates).  Cost note: sequential calibration runs one (early-stopped)
forward per stage, quadratic in depth; ``sequential=False`` is a single pass.

Conventions.  A quantised weight is ``W ≈ scale · (codes - zero)``: ``codes`` integer (int8, or
int16 when the grid needs it), ``scale``/``zero`` float32 of shape ``(out | 1, groups)``;
``zero = 0`` for every symmetric, ternary and binary grid, so those read as the package-wide
``W ≈ s·T``.  ``PTQLinear`` keeps the dequantised weight as a float tensor (fake quantisation) and
the codes/scales beside it for inspection.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant as Q

__all__ = [
    "METHODS",
    "PTQMethod",
    "PTQLinear",
    "Grid",
    "QuantizedWeight",
    "quantize_model",
    "smooth_model",
    "absmax_weight",
    "rtn_quantize",
    "gptq_quantize",
    "smoothing_factors",
    "hessian",
    "quantizable_linears",
]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PTQMethod:
    """One row of the PTQ comparison.  ``w_bits`` is what a results table prints (1.58 = log2 3)."""

    name: str
    algorithm: str  # "absmax" | "smoothquant" | "gptq"
    weight: str  # "int" | "ternary" | "binary"
    w_bits: float
    a_bits: int | None  # None: activations stay floating point ("A16")
    needs_calib: bool

    @property
    def label(self) -> str:
        wb = "1.58" if self.weight == "ternary" else f"{self.w_bits:g}"
        return f"W{wb}A{self.a_bits or 16}"


def _m(name: str, algorithm: str, weight: str, w_bits: float, a_bits: int | None) -> PTQMethod:
    return PTQMethod(name, algorithm, weight, w_bits, a_bits, needs_calib=algorithm != "absmax")


_LOG2_3 = Q.bits_per_weight("b1.58")

#: name -> PTQMethod; the names encode W<bits>A<bits> as in the BitNet paper's Table 3.
METHODS: dict[str, PTQMethod] = {
    m.name: m
    for m in [
        _m("absmax-w8a8", "absmax", "int", 8, 8),
        _m("absmax-w4a4", "absmax", "int", 4, 4),
        _m("absmax-w2a16", "absmax", "int", 2, None),
        _m("absmax-w1.58a8", "absmax", "ternary", _LOG2_3, 8),
        _m("absmax-w1a8", "absmax", "binary", 1, 8),
        _m("smoothquant-w8a8", "smoothquant", "int", 8, 8),
        _m("smoothquant-w4a4", "smoothquant", "int", 4, 4),
        _m("smoothquant-w1a8", "smoothquant", "binary", 1, 8),
        _m("gptq-w4a16", "gptq", "int", 4, None),
        _m("gptq-w2a16", "gptq", "int", 2, None),
        _m("gptq-w1.58a16", "gptq", "ternary", _LOG2_3, None),
    ]
}

# Options each algorithm accepts (anything else is an error, not silently ignored).
_COMMON_OPTS = {"calib_batch_size": 8, "progress": True}
_OPTS: dict[str, dict[str, Any]] = {
    "absmax": {"weight_granularity": None},
    "smoothquant": {"weight_granularity": None, "alpha": 0.5},
    "gptq": {
        "sym": False,
        "group_size": None,
        "block_size": 128,
        "damp": 0.01,
        "act_order": False,
        "ternary_scale": "search",
        "sequential": True,
    },
}


# ---------------------------------------------------------------------------------------------
# Quantisation grids and round-to-nearest
# ---------------------------------------------------------------------------------------------


class QuantizedWeight(NamedTuple):
    """``weight == scale · (codes - zero)`` (expanded over groups), exactly."""

    codes: torch.Tensor  # (out, in) int8 / int16
    scale: torch.Tensor  # (out | 1, groups) float32
    zero: torch.Tensor  # same shape as scale, float32 (integer-valued)
    weight: torch.Tensor  # (out, in) float32, the dequantised weight


def _expand_cols(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(R | 1, G) per-group parameters → broadcastable against an (R, C) weight."""
    groups = p.shape[1]
    if groups == 1:
        return p
    return p.repeat_interleave(shape[1] // groups, dim=1)


def _dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return _expand_cols(scale, codes.shape) * (codes.float() - _expand_cols(zero, codes.shape))


def _code_dtype(qmin: int, qmax: int) -> torch.dtype:
    return torch.int8 if -128 <= qmin and qmax <= 127 else torch.int16


@dataclass(frozen=True)
class Grid:
    """A per-row quantisation grid (rows = output channels, or row-groups of columns).

    kind="int", sym=True:   symmetric absmax, codes in [-2^(b-1), 2^(b-1)-1], s = max|w| / (2^(b-1)-1)
                            (the code -2^(b-1) is never produced: 2^b - 1 levels are used, as absmax does).
    kind="int", sym=False:  asymmetric min-max (GPTQ's default): codes in [0, 2^b - 1] with an
                            integer zero point; the range always contains 0 (so zero weights stay exact).
    kind="ternary":         codes in {-1, 0, +1}, s = mean|w| ("absmean", BitNet b1.58's rule per row)
                            or the s minimising ‖w - s·RoundClip(w/s)‖² over a grid ("search").
    """

    kind: str = "int"
    bits: int = 4
    sym: bool = False
    ternary_scale: str = "search"

    def __post_init__(self) -> None:
        if self.kind not in ("int", "ternary"):
            raise ValueError(f"grid kind must be 'int' or 'ternary', got {self.kind!r}")
        if self.kind == "int" and not 2 <= self.bits <= 16:
            raise ValueError(f"int grid bits must be in [2, 16], got {self.bits}")
        if self.ternary_scale not in ("absmean", "search"):
            raise ValueError(f"ternary_scale must be 'absmean' or 'search', got {self.ternary_scale!r}")

    @property
    def qmin(self) -> int:
        if self.kind == "ternary":
            return -1
        return -(2 ** (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        if self.kind == "ternary":
            return 1
        return 2 ** (self.bits - 1) - 1 if self.sym else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return _code_dtype(self.qmin, self.qmax)

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C) float32 → scale, zero of shape (R, 1)."""
        zero = torch.zeros(w.shape[0], 1, dtype=torch.float32, device=w.device)
        if self.kind == "ternary":
            if self.ternary_scale == "absmean":
                return w.abs().mean(dim=1, keepdim=True).clamp(min=Q.SCALE_EPS), zero
            return _search_ternary_scale(w), zero
        if self.sym:
            return w.abs().amax(dim=1, keepdim=True).clamp(min=Q.SCALE_EPS) / self.qmax, zero
        xmin = w.amin(dim=1, keepdim=True).clamp(max=0)
        xmax = w.amax(dim=1, keepdim=True).clamp(min=0)
        flat = xmax - xmin < Q.SCALE_EPS  # an all-zero row: any grid is exact; avoid 0/0
        xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
        scale = (xmax - xmin) / self.qmax
        return scale, Q.round_half_even(-xmin / scale)

    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Nearest code (ties to even), as float; broadcasting over scale/zero."""
        return (Q.round_half_even(w / scale) + zero).clamp(self.qmin, self.qmax)


def _search_ternary_scale(w: torch.Tensor, n_grid: int = 100) -> torch.Tensor:
    """Per row, the s in {c·max|w|: c ∈ (0, 1]} ∪ {mean|w|} with the least ternary RTN error.

    For Gaussian rows the optimum is s ≈ 1.22σ while absmean gives ≈ 0.8σ, so the search matters.
    """
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=Q.SCALE_EPS)
    best_s = w.abs().mean(dim=1, keepdim=True).clamp(min=Q.SCALE_EPS)
    best_err = (w - best_s * Q.round_half_even(w / best_s).clamp(-1, 1)).pow(2).sum(dim=1, keepdim=True)
    for c in torch.linspace(1.0 / n_grid, 1.0, n_grid).tolist():
        s = amax * c
        err = (w - s * Q.round_half_even(w / s).clamp(-1, 1)).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s


def _group_params(w: torch.Tensor, grid: Grid, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) → scale, zero of shape (out, in / group_size) (one group if group_size is None)."""
    if group_size is None:
        return grid.params(w)
    if group_size < 1 or w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} must divide in_features={w.shape[1]}")
    g = w.shape[1] // group_size
    s, z = grid.params(w.reshape(w.shape[0] * g, group_size))  # rows of one group each
    return s.reshape(w.shape[0], g), z.reshape(w.shape[0], g)


def rtn_quantize(
    w: torch.Tensor, grid: Grid, group_size: int | None = None, granularity: str = "channel"
) -> QuantizedWeight:
    """Round-to-nearest on ``grid``: per output channel (optionally per column group) or per tensor."""
    wf = w.detach().float()
    if granularity == "tensor":
        if group_size is not None:
            raise ValueError("group_size needs per-channel granularity")
        scale, zero = grid.params(wf.reshape(1, -1))  # (1, 1)
    elif granularity == "channel":
        scale, zero = _group_params(wf, grid, group_size)
    else:
        raise ValueError(f"weight granularity must be 'channel' or 'tensor', got {granularity!r}")
    codes = grid.encode(wf, _expand_cols(scale, wf.shape), _expand_cols(zero, wf.shape))
    codes = codes.to(grid.code_dtype)
    return QuantizedWeight(codes, scale, zero, _dequant(codes, scale, zero))


def absmax_weight(w: torch.Tensor, bits: int, granularity: str = "channel") -> QuantizedWeight:
    """Symmetric absmax RTN to ``bits`` bits: ``W ≈ s·q``, s = max|W| / (2^(b-1) - 1)."""
    return rtn_quantize(w, Grid("int", bits, sym=True), granularity=granularity)


def _bitnet_weight(w: torch.Tensor, kind: str, granularity: str) -> QuantizedWeight:
    """The BitNet quantisers of ``bitlm.quant`` applied post hoc (per tensor, or per row)."""
    groups = 1 if granularity == "tensor" else w.shape[0]  # quant.py groups split the output dim
    if granularity not in ("tensor", "channel"):
        raise ValueError(f"weight granularity must be 'channel' or 'tensor', got {granularity!r}")
    t, s = Q.weight_quantize(w, "b1.58" if kind == "ternary" else "b1", groups)
    scale = s.reshape(-1, 1).float()
    zero = torch.zeros_like(scale)
    return QuantizedWeight(t, scale, zero, Q.dequantize_weight(t, s))


def _weight_rtn(w: torch.Tensor, method: PTQMethod, granularity: str | None) -> QuantizedWeight:
    if method.weight == "int":
        return absmax_weight(w, int(method.w_bits), granularity or "channel")
    return _bitnet_weight(w, method.weight, granularity or "tensor")


# ---------------------------------------------------------------------------------------------
# GPTQ (Frantar et al. 2022, Algorithm 1)
# ---------------------------------------------------------------------------------------------


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2/N · Σ_n x_n x_nᵀ over all N rows of ``x`` (..., in) — the layer-wise GPTQ Hessian."""
    xf = x.detach().reshape(-1, x.shape[-1]).float()  # (N, in)
    return 2.0 * (xf.T @ xf) / max(xf.shape[0], 1)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹, so that H⁻¹ = Uᵀ U.

    Row i of U restricted to columns ≥ i is exactly the (scaled) row of the inverse Hessian of the
    not-yet-quantised columns that GPTQ needs (paper §3, "Cholesky reformulation").  Done in float64:
    the cost is one in×in factorisation and it removes most "not positive definite" failures;
    if one remains, damping grows ×10 (up to 3 tries) rather than failing the whole model.
    """
    h64 = h.double()
    mean_diag = h64.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    for attempt in range(4):
        lam = damp * (10**attempt)
        chol, info = torch.linalg.cholesky_ex(h64 + lam * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.float()
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damping {lam:g}")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantise ``w`` (out, in) given the Hessian ``h`` (in, in) of its inputs.

    Grid parameters are fixed before the sweep from the original weight (per row, or per column
    group — "static groups", which keeps act_order and grouping compatible).  Columns are then
    quantised left to right (or by decreasing diag H with ``act_order``); each column's rounding
    error, divided by the Cholesky diagonal, is pushed onto the columns not yet quantised.  Inside a
    block of ``block_size`` columns the update is applied column by column; the rest of the matrix
    receives one matrix product per block (lazy batch updates) — the same result, fewer passes.
    """
    W = w.detach().float().clone()  # (out, in), updated in place by the error feedback
    H = h.detach().float().clone()
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features={n_in}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")

    scale, zero = _group_params(W, grid, group_size)  # (out, G)
    col_scale = _expand_cols(scale, W.shape).expand_as(W)  # (out, in): per-column view of the grid
    col_zero = _expand_cols(zero, W.shape).expand_as(W)

    # Inputs that are always zero carry no information: fix their columns to 0 and give H a unit
    # diagonal there so that the factorisation stays well defined (reference GPTQ does the same).
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n_in, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    col_scale, col_zero = col_scale[:, perm], col_zero[:, perm]
    U = _inverse_hessian_factor(H, damp)  # (in, in) upper

    codes = torch.zeros_like(W)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (out, b)
        E1 = torch.zeros_like(W1)  # scaled errors of this block, for the lazy update
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w_col = W1[:, i]
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            q = grid.encode(w_col, s, z)
            codes[:, i1 + i] = q
            err = (w_col - s * (q - z)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # feedback within the block
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # one batched update for everything right of the block

    inv = torch.argsort(perm)
    codes = codes[:, inv].to(grid.code_dtype)
    return QuantizedWeight(codes, scale, zero, _dequant(codes, scale, zero))


# ---------------------------------------------------------------------------------------------
# SmoothQuant (Xiao et al. 2022, §4)
# ---------------------------------------------------------------------------------------------


def smoothing_factors(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α), the max over every layer reading X (shared s).

    Channels never active in calibration (max|X_j| = 0) or with all-zero weights keep s_j = 1:
    there is nothing to migrate, and a zero scale would make the smoothed weight vanish.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    xmax = act_absmax.detach().float()
    wmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # (in,)
    s = xmax.pow(alpha) / wmax.pow(1.0 - alpha)
    ok = (xmax > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=Q.SCALE_EPS), torch.ones_like(s))


# ---------------------------------------------------------------------------------------------
# The replacement layer
# ---------------------------------------------------------------------------------------------


class PTQLinear(nn.Module):
    """A post-training-quantised ``nn.Linear``: y = Ŵ · Q_a(x / input_scale) (+ b).

    ``weight`` holds the dequantised weight Ŵ = scale·(codes − zero) as floats (fake quantisation,
    frozen); ``codes``/``scale``/``zero`` are kept for inspection (None for an unquantised weight,
    e.g. a smoothed-only layer).  ``input_scale`` is SmoothQuant's per-input-channel s (None if
    not smoothed); ``act_bits`` enables per-token absmax activation quantisation (None = A16).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        qw: QuantizedWeight | None,
        *,
        act_bits: int | None = None,
        input_scale: torch.Tensor | None = None,
        method: str = "",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("codes", None if qw is None else qw.codes.clone())
        self.register_buffer("scale", None if qw is None else qw.scale.clone())
        self.register_buffer("zero", None if qw is None else qw.zero.clone())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())
        self.act_bits = act_bits
        self.method = method

    def dequantized_weight(self) -> torch.Tensor:
        """scale · (codes − zero) recomputed from the stored codes (equals ``weight``)."""
        if self.codes is None:
            raise ValueError("this PTQLinear holds an unquantised weight")
        return _dequant(self.codes, self.scale, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.act_bits is not None:
            x = Q.fake_quant_activation(x, self.act_bits, "token")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}, "
            f"act_bits={self.act_bits}, smoothed={self.input_scale is not None}"
        )


def _ptq_linear(
    lin: nn.Linear, qw: QuantizedWeight | None, method: PTQMethod | None, input_scale=None, weight=None
) -> PTQLinear:
    w = qw.weight if qw is not None else weight
    return PTQLinear(
        w.to(lin.weight.dtype),
        lin.bias,
        qw,
        act_bits=None if method is None else method.a_bits,
        input_scale=input_scale,
        method="" if method is None else method.name,
    )


# ---------------------------------------------------------------------------------------------
# Whole-model plumbing: targets, calibration passes with hooks
# ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised from a hook once the input of interest has been captured (skips the rest)."""


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Exact ``nn.Linear`` projections, excluding the output head and anything tied to an embedding."""
    from .model import linear_modules

    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(n, m) for n, m in linear_modules(model) if type(m) is nn.Linear and id(m.weight) not in emb]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _batches(calib_ids: torch.Tensor, batch_size: int):
    for i in range(0, calib_ids.shape[0], batch_size):
        yield calib_ids[i : i + batch_size]


def _trace_stages(model: nn.Module, targets: dict[str, nn.Linear], ids: torch.Tensor) -> list[list[str]]:
    """Targets grouped by the tensor they read, in call order: [[q, k, v], [o], [gate, up], ...].

    Identity of the input *object* decides (q/k/v all receive the same ``h``); the hooks keep a
    reference to every input, so no tensor can be freed and its memory reused during the trace.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(_mod, args):
            if name not in seen:  # a module called twice keeps its first position
                seen.add(name)
                calls.append((name, args[0]))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in targets.items()]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    stages: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:
        for x0, names in stages:
            if x is x0:
                names.append(name)
                break
        else:
            stages.append((x, [name]))
    return [names for _x, names in stages]


def _check_model(model: nn.Module) -> None:
    from .layers import BitLinear

    cfg = getattr(model, "config", None)
    quant = getattr(cfg, "quant", "fp")
    if quant != "fp" or any(isinstance(m, BitLinear) for m in model.modules()):
        raise ValueError(
            f"PTQ applies to floating-point models; this model has quant={quant!r} "
            "(build it with quant='fp', train, then quantise)"
        )


def _resolve(method: str, opts: dict[str, Any]) -> tuple[PTQMethod, dict[str, Any]]:
    if method not in METHODS:
        raise ValueError(f"unknown PTQ method {method!r}; valid: {', '.join(METHODS)}")
    m = METHODS[method]
    allowed = {**_COMMON_OPTS, **_OPTS[m.algorithm]}
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise TypeError(f"{method}: unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(allowed))}")
    return m, {**allowed, **opts}


def _check_calib(m: PTQMethod, calib_ids: torch.Tensor | None) -> None:
    if calib_ids is None:
        if m.needs_calib:
            raise ValueError(f"{m.name} needs calibration data: pass calib_ids, a LongTensor of shape (N, T)")
        return
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.is_floating_point():
        raise ValueError("calib_ids must be an integer tensor of token ids with shape (N, T)")
    if calib_ids.numel() == 0:
        raise ValueError("calib_ids is empty")


def _input_absmax(model, targets, stages, calib_ids, batch_size) -> dict[str, torch.Tensor]:
    """max|X_j| per input channel over all calibration tokens, one entry per stage (its first layer)."""
    stats: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)

        return hook

    handles = [targets[s[0]].register_forward_pre_hook(make_hook(s[0])) for s in stages]
    try:
        for ids in _batches(calib_ids, batch_size):
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return stats


def _stage_hessians(model, targets, stages, calib_ids, batch_size, stop: bool) -> dict[str, torch.Tensor]:
    """H = 2XXᵀ/N for the first layer of each stage in ``stages`` (shared by the whole stage)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last = stages[-1][0]

    def make_hook(name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (B*T, in)
            sums[name] = sums.get(name, 0) + 2.0 * (x.T @ x)
            counts[name] = counts.get(name, 0) + x.shape[0]
            if stop and name == last:
                raise _StopForward

        return hook

    handles = [targets[s[0]].register_forward_pre_hook(make_hook(s[0])) for s in stages]
    try:
        for ids in _batches(calib_ids, batch_size):
            try:
                model(ids)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def quantize_model(
    model: nn.Module, method: str, calib_ids: torch.Tensor | None = None, **opts: Any
) -> nn.Module:
    """Return a deep copy of ``model`` whose projections are ``PTQLinear`` quantised by ``method``.

    ``model`` must be floating point (``quant="fp"``; no BitLinear) and map token ids (B, T) to
    outputs.  ``calib_ids`` (N, T) are token ids for the calibration passes (SmoothQuant, GPTQ);
    absmax methods ignore them.  Options (errors on unknown ones):

      all:          calib_batch_size=8, progress=True (a tqdm bar over layers for GPTQ)
      absmax,
      smoothquant:  weight_granularity="channel" for int weights, "tensor" for ternary/binary
                    (the BitNet quantisers are per tensor);  smoothquant: alpha=0.5
      gptq:         sym=False (asymmetric min-max grid), group_size=None, block_size=128,
                    damp=0.01, act_order=False, ternary_scale="search" | "absmean",
                    sequential=True (calibrate each stage on the already-quantised prefix)

    The original model is never modified.  The copy records the method in ``.ptq_method``.
    """
    m, o = _resolve(method, opts)
    _check_model(model)
    _check_calib(m, calib_ids)

    qmodel = copy.deepcopy(model)
    was_training = qmodel.training
    qmodel.eval()
    targets = dict(quantizable_linears(qmodel))
    if calib_ids is not None:
        calib_ids = calib_ids.to(next(qmodel.parameters()).device)
    with torch.no_grad():
        if m.algorithm == "absmax":
            for name, lin in targets.items():
                qw = _weight_rtn(lin.weight, m, o["weight_granularity"])
                _set_module(qmodel, name, _ptq_linear(lin, qw, m))
        elif m.algorithm == "smoothquant":
            _apply_smoothquant(qmodel, targets, calib_ids, m, o)
        else:
            _apply_gptq(qmodel, targets, calib_ids, m, o)
    qmodel.train(was_training)
    qmodel.ptq_method = m.name
    return qmodel


def _smooth_scales(qmodel, targets, calib_ids, alpha, batch_size) -> dict[str, torch.Tensor]:
    """Per target name, the (shared-per-input) SmoothQuant factor s."""
    stages = _trace_stages(qmodel, targets, calib_ids[:1])
    xmax = _input_absmax(qmodel, targets, stages, calib_ids, batch_size)
    scales: dict[str, torch.Tensor] = {}
    for stage in stages:
        s = smoothing_factors(xmax[stage[0]], [targets[n].weight for n in stage], alpha)
        scales.update({n: s for n in stage})
    return scales


def _apply_smoothquant(qmodel, targets, calib_ids, m: PTQMethod, o) -> None:
    scales = _smooth_scales(qmodel, targets, calib_ids, o["alpha"], o["calib_batch_size"])
    for name, lin in targets.items():
        s = scales.get(name)
        if s is None:  # never called during calibration: nothing to smooth with
            warnings.warn(
                f"smoothquant: {name} was not reached by the calibration data; not smoothed", stacklevel=3
            )
            s = torch.ones(lin.in_features, device=lin.weight.device)
        w_smoothed = lin.weight.float() * s.to(lin.weight.device)  # W · diag(s), column j times s_j
        qw = _weight_rtn(w_smoothed, m, o["weight_granularity"])
        _set_module(qmodel, name, _ptq_linear(lin, qw, m, input_scale=s))


def _apply_gptq(qmodel, targets, calib_ids, m: PTQMethod, o) -> None:
    from .data.common import progress

    if m.weight == "ternary":
        grid = Grid("ternary", ternary_scale=o["ternary_scale"])
    else:
        grid = Grid("int", int(m.w_bits), sym=o["sym"])
    bs = o["calib_batch_size"]
    stages = _trace_stages(qmodel, targets, calib_ids[:1])
    hessians = {} if o["sequential"] else _stage_hessians(qmodel, targets, stages, calib_ids, bs, stop=False)
    done: set[str] = set()
    bar = progress(total=len(targets), desc=m.name, unit="layer", enabled=o["progress"])
    try:
        for stage in stages:
            if o["sequential"]:  # inputs as the already-quantised prefix of the model produces them
                hessians = _stage_hessians(qmodel, targets, [stage], calib_ids, bs, stop=True)
            h = hessians[stage[0]]
            for name in stage:
                bar.set_postfix(layer=name)
                lin = targets[name]
                qw = gptq_quantize(
                    lin.weight,
                    h,
                    grid,
                    block_size=o["block_size"],
                    damp=o["damp"],
                    group_size=o["group_size"],
                    act_order=o["act_order"],
                )
                _set_module(qmodel, name, _ptq_linear(lin, qw, m))
                done.add(name)
                bar.update(1)
        for name, lin in targets.items():  # layers the calibration never reached: plain RTN
            if name not in done:
                warnings.warn(
                    f"gptq: {name} was not reached by the calibration data; using RTN", stacklevel=3
                )
                qw = rtn_quantize(lin.weight, grid, o["group_size"])
                _set_module(qmodel, name, _ptq_linear(lin, qw, m))
                bar.update(1)
    finally:
        bar.close()


def smooth_model(
    model: nn.Module, calib_ids: torch.Tensor, alpha: float = 0.5, calib_batch_size: int = 8
) -> nn.Module:
    """SmoothQuant's transformation alone (no quantisation): a deep copy whose projections compute
    (W·diag(s)) · (x / s) — the same function as ``model`` up to float rounding.  For inspection
    and for checking the equivalence that SmoothQuant relies on."""
    _check_model(model)
    _check_calib(METHODS["smoothquant-w8a8"], calib_ids)
    qmodel = copy.deepcopy(model)
    was_training = qmodel.training
    qmodel.eval()
    targets = dict(quantizable_linears(qmodel))
    calib_ids = calib_ids.to(next(qmodel.parameters()).device)
    with torch.no_grad():
        scales = _smooth_scales(qmodel, targets, calib_ids, alpha, calib_batch_size)
        for name, lin in targets.items():
            s = scales.get(name, torch.ones(lin.in_features, device=lin.weight.device))
            _set_module(
                qmodel, name, _ptq_linear(lin, None, None, input_scale=s, weight=lin.weight.float() * s)
            )
    qmodel.train(was_training)
    return qmodel
