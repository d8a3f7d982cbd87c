"""BitLinear — the quantisation-aware linear layer of BitNet — and ``prepare()``.

``BitLinear`` keeps latent high-precision weights (mixed-precision training, 2310.11453 §2.2) and
fake-quantises weights and activations in every forward pass with the straight-through estimator
(see ``bitlm.quant``).  Optionally it normalises its input first (the FAQ's "BitLinear has a
built-in RMSNorm"; the b1 paper's LN/SubLN), parameter-free so that ``prepare()`` never has to
invent new weights.

``prepare(model)`` swaps ``nn.Linear`` modules for ``BitLinear`` *copying* the existing weights
(peers that re-initialise them destroy the pretrained model), skipping output heads by default.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant as Q

__all__ = ["BitLinear", "prepare", "set_quant_lambda", "NORMS"]

NORMS = (None, "layernorm", "rmsnorm")


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
        self.weight_quant = weight_quant
        self.act_bits = act_bits
        self.act_granularity = act_granularity
        self.act_granularity_eval = act_granularity_eval
        self.weight_groups = weight_groups
        self.weight_group_dim = weight_group_dim
        self.act_nonneg = bool(act_nonneg)
        self.act_groups = act_groups
        self.norm = norm
        self.norm_eps = norm_eps
        self.register_buffer("quant_lambda", torch.tensor(float(quant_lambda)), persistent=True)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, weight_quant={self.weight_quant}, act_bits={self.act_bits}, "
            f"act={self.act_granularity}/{self.act_granularity_eval}{', nonneg' if self.act_nonneg else ''}, "
            f"groups=({self.weight_groups}/{self.weight_group_dim},{self.act_groups}), norm={self.norm}"
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "layernorm":
            return Q.group_layer_norm(x, self.act_groups, self.norm_eps)
        if self.norm == "rmsnorm":
            return Q.group_rms_norm(x, self.act_groups, self.norm_eps)
        return x

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer weight and its per-group scale, ``W ≈ s · T`` (what packing stores)."""
        return Q.weight_quantize(self.weight, self.weight_quant, self.weight_groups, self.weight_group_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.quant_lambda
        x = self.normalize(x)
        if self.act_bits is not None:
            gran = self.act_granularity if self.training else self.act_granularity_eval
            if self.act_nonneg:
                x = Q.fake_quant_activation_nonneg(x, self.act_bits, gran, self.act_groups, lam)
            else:
                x = Q.fake_quant_activation(x, self.act_bits, gran, self.act_groups, lam)
        w = Q.fake_quant_weight(self.weight, self.weight_quant, self.weight_groups, lam, self.weight_group_dim)
        return F.linear(x, w, self.bias)


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """Set the warm-up quantisation factor λ ∈ [0, 1] on every BitLinear of ``model``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quant lambda must be in [0, 1], got {lam}")
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.quant_lambda.fill_(lam)


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
