"""LoRA adapters on frozen ternary (or float) projections: add, train, save, load, merge, unload.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds a trainable low-rank update to a frozen layer:
``y = base(x) + (α/r)·B(A(x))`` with A (r × in) Kaiming-uniform, B (out × r) zero, so training
starts exactly at the base model.  No BitNet training peer offers it (onebitllms has none, Axolotl
blocks it; training-anchors (d), (e)), yet it is what users ask for to fine-tune a 1.58-bit model
on small hardware: the ternary weights stay ternary and frozen, only r·(in + out) floats per layer
train, and the optimizer state is that small too.

Design choices (and why):

  * **What the adapter sees.**  The base computes ``W_q · Quant_a(Norm(x))``; the adapter computes
    ``B·A·Norm(x)`` — the *same normalised* input (BitLinear's optional built-in norm; in bitlm's
    models the norms live outside the layer, so that is x itself) but **not activation-quantised**,
    in float32 by default.  Normalised: so that B·A lives in the same coordinates as W, which is what
    makes a merge into W meaningful.  Unquantised: the adapter is a high-precision side path (as in
    QLoRA); int8 rounding would only add noise to a small correction.
  * **Frozen base.**  :func:`add_lora` sets ``requires_grad=False`` on every parameter of the
    model (embeddings, norms, head, latent weights) and only the A/B matrices train; the optimizer
    of ``bitlm.train`` only sees parameters that require gradients.  The ternary codes T and scales
    of the base therefore never change (tested).
  * **Merging is not exact, and that is honest to say.**  W_q + ΔW is not ternary.  Two ways out:

      - *unmerged inference* (exact): keep the adapter as a side path — a ternary GEMV plus a rank-r
        float GEMV, ~r(in+out)/(in·out) extra FLOPs (≈ 3 % at r = 8, d = 512);
      - :func:`merge_lora` (lossy): fold ΔW into the weights and re-quantise.  ``mode="refit"``
        (default) replaces T, s by the least-squares ternary fit of s·T + ΔW (alternating the best
        codes for a scale and the best scale for the codes, from the base's s; absmean
        re-quantisation instead would shrink the scale by the share of non-zeros, p ≈ 0.7);
        ``mode="latent"`` adds ΔW to a BitLinear's latent weights and lets its absmean decide —
        worse now, but it keeps the latents' magnitudes for further QAT.  A float base
        (``nn.Linear``, ``weight_quant="fp"``) merges exactly.  A ternary weight moves only where
        the update crosses half a quantisation step, so much of a small low-rank ΔW is rounded
        away: :func:`merge_error` reports per layer the share of ‖ΔW‖ lost and the codes flipped.
        Measured on the tiny model of the tests (trained r = 8 adapters, new task): val loss base
        3.568, unmerged 2.887, merged refit 3.015, merged latent 3.100 — the merge keeps most, not
        all, of the gain.  Use the unmerged path when the loss matters, or continue QAT after
        merging.

Files: :func:`save_lora` writes ``adapter.safetensors`` (tensors ``<module>.lora_A.weight`` /
``.lora_B.weight``, the config JSON also in the header metadata under ``bitlm_lora``) and a mirror
``adapter_config.json`` for people and tools: format, version, rank, alpha, targets, dropout, the
adapted module names, and a base fingerprint (sha256 over the adapted layers' names, shapes and
ternary codes — float weights for unquantised layers — so an adapter is not silently applied to
a different base; a thawed packed model and its latent twin share the fingerprint).

Training: ``bitlm train --init-from BASE --lora-rank 8 [--lora-alpha 16]
[--train-set lora_targets=q_proj,v_proj] [--train-set lora_dropout=0.05]`` trains only the
adapters and writes ``OUT/last`` = the (unchanged) base as a native checkpoint plus
``adapter.safetensors`` / ``adapter_config.json``, atomically; ``--resume`` is bit-identical (with
lora_dropout = 0; dropout masks come from the global RNG, which a resume does not restore).
Apply the result with ``load_lora(bitlm.load(OUT/last), OUT/last)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import quant as Q
from .io.atomic import atomic_write, atomic_write_text
from .layers import BitLinear, FrozenTernaryLinear, ternary_latent, thaw

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "base_fingerprint",
    "save_lora",
    "load_lora",
    "MERGE_MODES",
    "refit_ternary",
    "merge_error",
    "merge_lora",
    "unload_lora",
    "detached",
    "save_lora_checkpoint",
    "prepare_lora_training",
]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMAT = "bitlm-lora"
VERSION = 1
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRA targets must be non-empty module names, got {self.targets!r}")


class LoRALinear(nn.Module):
    """``y = base(x) + (α/r)·B(A(dropout(Norm(x))))`` around a frozen ``base`` projection.

    ``base`` is a :class:`~bitlm.layers.BitLinear`, a ``FrozenTernaryLinear`` or an ``nn.Linear``;
    Norm is the base's built-in norm (identity when it has none).  The adapter runs in its own dtype
    (float32 by default) and its output is cast to the base output's dtype.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init, as LoRA does
        nn.init.zeros_(self.lora_B.weight)  # ΔW = 0: the wrapped model starts equal to the base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """The base's normalised (never quantised) input — see the module docstring."""
        return self.base.normalize(x) if isinstance(self.base, BitLinear) else x

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(self.adapter_input(x)).to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(h)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·B·A, float32 (out, in): what the adapter adds to the base's effective weight."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling


# ---------------------------------------------------------------------------------------------
# add / inspect
# ---------------------------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(name, wrapper)`` for every adapter, in module order; name = the adapted module's path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap (in place) every projection whose last name component is in ``targets`` — a
    ``BitLinear``, ``FrozenTernaryLinear`` or ``nn.Linear`` — in a :class:`LoRALinear`, and freeze
    every other parameter of ``model``.  Returns ``model``; ``model.lora_config`` records the setup.
    """
    cfg = LoRAConfig(int(rank), float(alpha), tuple(targets), float(dropout))
    cfg.validate()
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters (unload_lora or merge_lora first)")
    found: list[tuple[str, nn.Linear]] = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in cfg.targets
    ]
    if not found:
        raise ValueError(f"no nn.Linear / BitLinear module named {', '.join(cfg.targets)} in the model")
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)  # the base is frozen: only the adapters train
    for name, base in found:
        wrapper = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, dtype)
        wrapper.train(base.training)
        model.set_submodule(name, wrapper)
    model.lora_config = cfg
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<module>.lora_A.weight, <module>.lora_B.weight}`` for every adapter (detached, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def _identity_tensor(base: nn.Module) -> torch.Tensor:
    """What identifies a base projection: its ternary/binary codes, or its float weight."""
    if isinstance(base, BitLinear) and base.weight_quant != "fp":
        return base.quantized_weight()[0]  # int8 T: the same for a packed layer and its thawed latent
    return base.weight.detach().float()


def base_fingerprint(model: nn.Module, names: list[str] | None = None) -> str:
    """sha256 over the (adapted) base projections' names, shapes and codes / float weights."""
    h = hashlib.sha256()
    wrappers = dict(lora_modules(model))
    for name in names if names is not None else list(wrappers):
        base = wrappers[name].base if name in wrappers else model.get_submodule(name)
        t = _identity_tensor(base).contiguous().cpu()
        h.update(f"{name}\x00{tuple(t.shape)}\x00{t.dtype}\x00".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _adapter_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensor file, JSON mirror): a folder gets adapter.safetensors + adapter_config.json inside,
    ``x.safetensors`` gets ``x.json`` beside it."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    return p / ADAPTER_FILE, p / CONFIG_FILE


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (see the module docstring for the layout); returns the tensor file."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA adapters to save")
    cfg: LoRAConfig = getattr(model, "lora_config", None) or LoRAConfig(mods[0][1].rank, mods[0][1].alpha)
    names = [n for n, _ in mods]
    meta = {
        "format": FORMAT, "version": VERSION, **asdict(cfg), "targets": list(cfg.targets), "modules": names,
        "adapter_input": "normalised, unquantised", "base_fingerprint": base_fingerprint(model, names),
    }
    model_cfg = getattr(model, "config", None)
    if hasattr(model_cfg, "to_dict"):
        meta["base_config"] = model_cfg.to_dict()
    st, js = _adapter_paths(path)
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(st, lambda tmp: save_file(lora_state_dict(model), str(tmp), metadata={"format": "pt", "bitlm_lora": text}))
    atomic_write_text(js, text)
    return st


def _read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    st, _ = _adapter_paths(path)
    if not st.is_file():
        raise FileNotFoundError(f"{st}: no LoRA adapter file")
    try:
        with safe_open(str(st), framework="pt") as f:
            raw = (f.metadata() or {}).get("bitlm_lora")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{st}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise ValueError(f"{st}: not a bitlm LoRA adapter (no 'bitlm_lora' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{st}: unsupported adapter format {meta.get('format')!r} v{meta.get('version')!r}")
    return meta, tensors, st


def load_lora(model: nn.Module, path: str | Path, *, check_base: bool = True) -> nn.Module:
    """Load adapters from ``path`` (a folder holding adapter.safetensors, or the file) into
    ``model``, adding them first when it has none.  Exact: the tensors are copied bit for bit.
    ``check_base`` compares the base fingerprint and refuses a different base."""
    meta, tensors, st = _read_adapter(path)
    added = not lora_modules(model)
    if added:
        add_lora(model, meta["rank"], meta["alpha"], tuple(meta["targets"]), meta["dropout"],
                 dtype=next(iter(tensors.values())).dtype)
    try:
        _check_and_copy(model, meta, tensors, st, check_base)
    except BaseException:
        if added:  # leave the model as it came
            unload_lora(model)
        raise
    return model


def _check_and_copy(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], st: Path,
                    check_base: bool) -> None:
    mods = dict(lora_modules(model))
    if sorted(mods) != sorted(meta["modules"]):
        extra = sorted(set(meta["modules"]) ^ set(mods))
        raise ValueError(f"{st}: adapter modules do not match the model's (first difference: {extra[0]!r})")
    for name, m in mods.items():
        if m.rank != meta["rank"] or m.alpha != meta["alpha"]:
            raise ValueError(f"{st}: rank/alpha {meta['rank']}/{meta['alpha']} differ from the model's adapters "
                             f"({m.rank}/{m.alpha})")
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in tensors:
                raise ValueError(f"{st}: missing tensor {key!r}")
            dst = getattr(m, part).weight
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise ValueError(f"{st}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
    if check_base:
        fp = base_fingerprint(model, list(meta["modules"]))
        if fp != meta["base_fingerprint"]:
            raise ValueError(f"{st}: the adapter was trained on a different base model (fingerprint "
                             f"{meta['base_fingerprint'][:12]}…, this model {fp[:12]}…); pass check_base=False to "
                             "apply it anyway")
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])


# ---------------------------------------------------------------------------------------------
# merge / unload
# ---------------------------------------------------------------------------------------------


def _effective_weight(base: nn.Module) -> torch.Tensor:
    """The weight the base's forward multiplies by (float32): s·T for quantised layers."""
    if isinstance(base, BitLinear) and base.weight_quant != "fp":
        t, s = base.quantized_weight()
        return Q.dequantize_weight(t, s, dim=base.weight_group_dim)
    return base.weight.detach().float()


MERGE_MODES = ("refit", "latent")


def refit_ternary(target: torch.Tensor, s0: torch.Tensor | float, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ternary fit ``target ≈ s·T``: alternate T = RoundClip(target/s, −1, 1) (the best
    codes for s) and s = ⟨target, T⟩/⟨T, T⟩ (the best scale for T), starting from ``s0``.  Each
    half-step can only lower ‖target − s·T‖, so the result is at least as good as keeping s0
    ("pinned" scale), and unlike absmean it does not shrink the scale by the share of zeros."""
    tgt = target.detach().float()
    s = torch.as_tensor(s0, dtype=torch.float32).reshape(())
    t = Q.round_half_even(tgt / s).clamp(-1, 1)
    for _ in range(iters):
        s_new = ((tgt * t).sum() / (t * t).sum().clamp(min=1.0)).clamp(min=Q.SCALE_EPS)
        t_new = Q.round_half_even(tgt / s_new).clamp(-1, 1)
        if torch.equal(t_new, t) and torch.equal(s_new, s):
            break
        s, t = s_new, t_new
    return t.to(torch.int8), s.reshape(1)


def _merged_base(base: nn.Linear, dw: torch.Tensor, mode: str) -> nn.Linear:
    """The base module holding W + ΔW the way its kind of layer stores weights (may be a new module)."""
    quantised = isinstance(base, BitLinear) and base.weight_quant != "fp"
    if quantised and isinstance(base, FrozenTernaryLinear) and mode == "latent":
        raise ValueError("a packed FrozenTernaryLinear has no latent weights: merge with mode='refit'")
    if quantised and base.weight_quant == "b1.58" and base.weight_groups == 1 and mode == "refit":
        t, s = refit_ternary(_effective_weight(base) + dw, base.quantized_weight()[1])
        if isinstance(base, FrozenTernaryLinear):
            new = FrozenTernaryLinear.from_ternary(t, s, base.weight.dtype, act_bits=base.act_bits,
                                                   act_granularity=base.act_granularity, act_groups=base.act_groups)
            new.train(base.training)
            return new.to(base.weight.device)

        with torch.no_grad():  # a latent that re-quantises to exactly T and (to rounding) s
            base.weight.copy_(ternary_latent(t, s, base.weight.dtype))
        return base
    # latent BitLinear (its forward re-quantises W + ΔW by absmean), b1 / grouped layers, or a
    # float layer (exact)
    with torch.no_grad():
        base.weight.add_(dw.to(base.weight.dtype))
    return base


def merge_error(model: nn.Module, mode: str = "refit") -> dict[str, dict[str, float]]:
    """Per adapted layer, what :func:`merge_lora` with ``mode`` would lose, without changing the model.

    ``lost``: ‖W_merged − (W_eff + ΔW)‖ / ‖ΔW‖ — the share of the adapter's update the merge
    discards (0 = exact; ≈ 1 = the merged layer is back to the base), W_eff = s·T the base's
    effective weight.  ``rel``: the same error relative to ‖W_eff + ΔW‖.  ``flipped``: fraction of
    the ternary codes the merge changes.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    out: dict[str, dict[str, float]] = {}
    for name, m in lora_modules(model):
        dw = m.delta_weight()
        target = _effective_weight(m.base) + dw
        probe = _merged_base(copy.deepcopy(m.base), dw, mode)
        err = (_effective_weight(probe) - target).norm().item()
        flipped = 0.0
        if isinstance(m.base, BitLinear) and m.base.weight_quant != "fp":
            flipped = (probe.quantized_weight()[0] != m.base.quantized_weight()[0]).float().mean().item()
        out[name] = {"lost": err / max(dw.norm().item(), 1e-30), "rel": err / max(target.norm().item(), 1e-30),
                     "flipped": flipped}
    return out


def merge_lora(model: nn.Module, *, mode: str = "refit",
               errors: dict[str, dict[str, float]] | None = None) -> nn.Module:
    """Fold every adapter into its base and remove the wrappers (in place); returns ``model``.

    Exact for float bases; **lossy** for ternary ones (see the module docstring).  ``mode``:

      * ``"refit"`` (default): the least-squares ternary fit of s·T + ΔW (:func:`refit_ternary`);
        a BitLinear stores it as a latent that re-quantises to exactly those codes.  Lowest error.
      * ``"latent"``: BitLinear latents become W + ΔW and the forward's absmean re-quantises them;
        keeps the latents' magnitudes ("confidence") for further QAT, at a higher merge error.

    Pass a dict as ``errors`` to receive :func:`merge_error`'s per-layer report.  Parameters get
    back the ``requires_grad`` they had before :func:`add_lora`.
    """
    report = merge_error(model, mode)  # also validates the mode before anything changes
    if errors is not None:
        errors.update(report)
    for name, m in lora_modules(model):
        model.set_submodule(name, _merged_base(m.base, m.delta_weight(), mode))
    _restore(model)
    return model


def refuse_adapters(model: nn.Module, target: str) -> None:
    """One-line ValueError when ``model`` carries LoRA adapters, which ``target`` (a packed file, an
    HF folder, a GGUF: ternary weights only) cannot hold, since W + ΔW is not ternary."""
    mods = lora_modules(model)
    if mods:
        raise ValueError(f"{mods[0][0]}: a LoRA adapter ({len(mods)} in the model); {target} holds ternary weights "
                         "only and W + ΔW is not ternary: fold them in with --merge-lora (bitlm.lora.merge_lora; "
                         "lossy, the loss is reported) or run the unmerged model on the torch path "
                         "(generate / eval / serve the run's folder)")


def merge_for_export(model: nn.Module, mode: str = "refit") -> str:
    """``--merge-lora`` of ``bitlm pack`` / ``bitlm export``: :func:`merge_lora` in place, and a
    one-line summary of :func:`merge_error`'s report (the share of the update lost, codes changed)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("--merge-lora: the model has no LoRA adapters (adapter.safetensors) to merge")
    report: dict[str, dict[str, float]] = {}
    merge_lora(model, mode=mode, errors=report)
    lost = [r["lost"] for r in report.values()]
    worst = max(report, key=lambda n: report[n]["lost"])
    flipped = sum(r["flipped"] for r in report.values()) / len(report)
    return (f"merged {len(mods)} LoRA adapters ({mode}): {100 * sum(lost) / len(lost):.1f} % of the adapters' update "
            f"lost on average (worst {worst}: {100 * report[worst]['lost']:.1f} %), {100 * flipped:.2f} % of the "
            "ternary codes changed; the unmerged run keeps all of it on the torch path")


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter (in place), giving back the unchanged base; returns ``model``."""
    for name, m in lora_modules(model):
        model.set_submodule(name, m.base)
    _restore(model)
    return model


def _restore(model: nn.Module) -> None:
    flags = getattr(model, "_lora_requires_grad", None) or {}
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for attr in ("_lora_requires_grad", "lora_config"):
        if hasattr(model, attr):
            delattr(model, attr)


@contextlib.contextmanager
def detached(model: nn.Module):
    """Temporarily put the bases back in place of the wrappers (to save the base with its own
    parameter names); the adapters, and the optimizer's references to them, are untouched."""
    mods = lora_modules(model)
    for name, m in mods:
        model.set_submodule(name, m.base)
    try:
        yield model
    finally:
        for name, m in mods:
            model.set_submodule(name, m)


# ---------------------------------------------------------------------------------------------
# bitlm train integration
# ---------------------------------------------------------------------------------------------


def save_lora_checkpoint(model: nn.Module, path: str | Path, **kw: Any) -> Path:
    """A native checkpoint of the base (``save_checkpoint`` with ``kw``) plus the adapter files,
    written into one temp folder that replaces ``path`` atomically."""
    from .io.atomic import atomic_dir
    from .io.checkpoint import record_checksums, save_checkpoint

    path = Path(path)
    cfg: LoRAConfig = model.lora_config
    kw["extra"] = {**(kw.get("extra") or {}), "lora": {**asdict(cfg), "targets": list(cfg.targets),
                                                        "adapter": ADAPTER_FILE}}
    with atomic_dir(path) as tmp:
        with detached(model):
            inner = save_checkpoint(model, tmp / "base", **kw)
        for f in inner.iterdir():
            os.replace(f, tmp / f.name)
        inner.rmdir()
        save_lora(model, tmp)
        record_checksums(tmp, [ADAPTER_FILE, CONFIG_FILE])  # the adapters are verified on load like the base
    return path


def prepare_lora_training(model: nn.Module, tcfg: Any, resume_from: str | Path | None = None) -> nn.Module:
    """What ``bitlm.train`` does with ``lora_rank > 0``: packed (frozen) projections become latent
    BitLinears (so the base saves as a native checkpoint; the codes stay exactly T), adapters are
    added per the TrainConfig, and on resume their values are loaded from the checkpoint."""

    if any(isinstance(m, FrozenTernaryLinear) for m in model.modules()):
        thaw(model)
    targets = tuple(t.strip() for t in str(tcfg.lora_targets).split(",") if t.strip())
    add_lora(model, tcfg.lora_rank, tcfg.lora_alpha, targets, tcfg.lora_dropout)
    if resume_from is not None:
        load_lora(model, resume_from)
    return model

