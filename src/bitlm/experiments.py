"""``bitlm experiment <name>``: the papers' headline comparisons, re-run at CPU scale.

Five experiments, each trains on the bundled corpus (``bitlm.data``), evaluates, and writes
``results.json`` (every number), ``results.md`` (the tables) and PNG plots into ``--out``
(default ``runs/experiments/<name>``):

  * ``compare`` — fp vs BitNet b1 vs BitNet b1.58 at equal shape and equal tokens: validation
    perplexity / bits-per-byte, zero-shot accuracy (``bitlm.tasks``) against the chance level,
    bytes of the linear weights (fp16 vs packed 1 bit / 2 bit / 1.6 bit) and arithmetic energy per
    token (``bitlm.energy``, 2310.11453 §2.3).  All three use the LLaMA-alike ``bitnet-b1.58``
    architecture; b1 differs from b1.58 only in the weight quantiser (sign vs absmean ternary), so
    the comparison isolates the quantiser instead of mixing it with the b1 paper's LayerNorm/GELU
    block.
  * ``ptq``     — one fp model trained once, every method of ``bitlm.ptq.METHODS`` applied to it
    (calibration ids from the training split), against QAT BitNet b1.58 and b1 trained on the same
    tokens: the shape of 2310.11453 Table 3.
  * ``scaling`` — a size sweep for fp and b1.58 at the same number of tokens per model (as the b1
    paper's Fig. 3: every size saw the same 40k x 256k tokens), fitting ``L(N) = a·N^b + c``
    (2310.11453 Eq. 19) per variant, with N the number of *linear* (non-embedding) weights;
    plots: loss vs N, and loss vs inference energy per token (the "inference-optimal" law).
  * ``lr``      — a peak-LR stability sweep for fp and b1.58 (2310.11453 §2.2, Fig. 5a: BitNet trains
    at learning rates where the fp16 Transformer diverges): final validation loss or "diverged".
  * ``groups``  — one b1.58 shape trained with G = 1, 2, 4, 8 quantisation / normalisation groups
    in the tensor-parallel group mode (2310.11453 Eq. 13-15; ``bitlm.tensor_parallel.group_config``:
    what ``bitlm train --tp G --tp-quant group`` trains) on the same tokens: validation perplexity.
  * ``distill`` — knowledge distillation (``bitlm.distill``, BitDistill 2510.13998): an fp teacher
    (trained first at the same shape and tokens, or ``--teacher PATH``), then BitNet b1.58 at equal
    tokens without a teacher, with logit KD, and with logit + attention-relation KD (last layer).
  * ``activations`` — fp vs b1.58 A8 vs BitNet a4.8 vs BitNet v2 (a4, H-BitLinear) at equal shape
    and tokens, the quantised ones trained with 8-bit activations first and then switched (the
    papers' recipe); validation perplexity, zero-shot, and the activation sparsity per site.

Sizes.  ``--scale S`` multiplies the number of linear weights (width x sqrt(S)) and the tokens per
model (steps x S); ``--quick`` is a seconds-long smoke run on a tiny model (the tests use it).
The default scale is sized so that each experiment takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXPERIMENTS", "Setup", "fit_power_law", "power_law", "run_experiment", "add_arguments", "run"]

EXPERIMENTS = ("compare", "ptq", "scaling", "lr", "groups", "distill", "activations")

# Peak LRs at this scale: the demo's values (bitlm.demo), BitNet above fp as in the papers (FAQ
# Table 2: ≈ 6x), fp well above the 700M recipe's 2.5e-4 because tiny models tolerate more.  They
# are not tuned per experiment: the lr experiment (docs/results.md) puts the 300-step optima at
# about 3e-3 (fp) and 1e-2 (b1.58), so both variants here sit a little below their best.
LR = {"fp": 1.5e-3, "b1": 4e-3, "b1.58": 4e-3}
RECIPE = {"fp": "fp", "b1": "b1.58", "b1.58": "b1.58"}  # b1 uses b1.58's two-stage recipe: same schedule
NAMES = {"fp": "fp (same shape)", "b1": "BitNet b1", "b1.58": "BitNet b1.58"}
ENERGY_NODE = "7nm"


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything size-related, derived once from ``--scale`` / ``--quick`` and the overrides."""

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 500  # per model
    val_tokens: int = 60_000  # validation tokens scored per model
    limit: int = 200  # zero-shot items per task
    tasks: tuple[str, ...] = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq",
                              "openbookqa", "lambada")
    widths: tuple[int, ...] = (32, 64, 96, 128)  # scaling sweep (d_model; n_layers fixed)
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    groups: tuple[int, ...] = (1, 2, 4, 8)  # groups sweep (G of the tensor-parallel group mode)
    calib_seqs: int = 32  # PTQ calibration sequences of seq_len tokens
    eval_batch: int = 32
    data: str = "default"
    teacher: str = ""  # distill: a ready fp teacher (anything bitlm.load reads); "" = train one first
    kd_weight: float = 1.0  # distill: BitDistill's λ (summarisation setting) and τ
    kd_temperature: float = 5.0
    kd_attention_weight: float = 1e3  # distill: γ of the attention-relation term (BitDistill summarisation)
    device: str = "auto"  # where every model trains and is scored (bitlm.parallel: auto = CUDA when available)

    @classmethod
    def build(cls, name: str = "compare", scale: float = 1.0, quick: bool = False, **over: Any) -> Setup:
        if quick:
            s = cls(d_model=32, n_layers=1, n_heads=2, seq_len=32, batch_size=4, steps=6, val_tokens=2_000, limit=4,
                    tasks=("arc_easy", "piqa"), widths=(16, 24, 32, 48), lrs=(1e-3, 1e-1), calib_seqs=4, eval_batch=8)
        else:
            s = cls(**DEFAULTS.get(name, {}))
            if scale != 1.0:
                if scale <= 0:
                    raise ValueError(f"--scale must be positive, got {scale}")
                # params ∝ width² for fixed depth: width x sqrt(scale) → linear weights x scale;
                # widths stay multiples of 16 so every head keeps an even (RoPE) head_dim
                def w(d: int) -> int:
                    return max(16, int(round(d * math.sqrt(scale) / 16)) * 16)

                s.d_model = w(s.d_model)
                s.widths = tuple(dict.fromkeys(w(d) for d in s.widths))
                s.steps = max(10, int(round(s.steps * scale)))
                s.val_tokens = int(s.val_tokens * min(scale, 4.0))
        for k, v in over.items():
            if v is not None:
                setattr(s, k, type(getattr(s, k))(v) if not isinstance(getattr(s, k), tuple) else tuple(v))
        return s

    @property
    def tokens_per_model(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def model_config(self, quant: str, d_model: int | None = None):
        from .config import ModelConfig

        return ModelConfig(arch="bitnet-b1.58", quant=quant, vocab_size=self.vocab_size, d_model=d_model or self.d_model,
                           n_layers=self.n_layers, n_heads=self.n_heads, max_seq_len=max(self.seq_len, 64))


# Per-experiment defaults at scale 1, sized so each experiment takes minutes on 2 CPU cores
# (zero-shot scoring of these small models is cheap; training dominates); lr trains 10 models, so
# each is shorter.
DEFAULTS: dict[str, dict[str, Any]] = {
    "compare": {},
    "ptq": {},
    "scaling": {},
    "lr": dict(steps=300),
    "groups": dict(steps=300),
    "distill": {},
    "activations": dict(steps=300, limit=100),
}


# ---------------------------------------------------------------------------------------------
# The power law  L(N) = a·N^b + c  (2310.11453 Eq. 19)
# ---------------------------------------------------------------------------------------------


def power_law(n, a: float, b: float, c: float):
    return a * np.power(np.asarray(n, dtype=float), b) + c


def fit_power_law(n, loss) -> dict[str, Any]:
    """Fit ``L(N) = a·N^b + c`` with b < 0 and a > 0.

    For a fixed exponent b the model is linear in (a, c), so the fit is a 1-D search over b with
    a closed-form least-squares (a, c) at each b — robust without any starting guess — polished by
    ``scipy.optimize.curve_fit`` when scipy is installed.  Three parameters need at least four
    points for a residual to exist; with fewer (or a fit that does not converge to a decreasing
    curve) the result has ``ok=False`` and a ``reason``, never an exception.
    """
    n = np.asarray(n, dtype=float)
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(n) & np.isfinite(y) & (n > 0)
    n, y = n[keep], y[keep]
    if len(np.unique(n)) < 4:
        return {"ok": False, "reason": f"need >= 4 distinct sizes with a finite loss, have {len(np.unique(n))}"}
    x = n / n.max()  # work in N / N_max: N^b over decades overflows nothing and conditions the solve

    y_min = float(y.min())

    def solve(b: float) -> tuple[float, float, float]:
        f = x**b
        A = np.stack([f, np.ones_like(f)], axis=1)
        (a, c), *_ = np.linalg.lstsq(A, y, rcond=None)
        if not 0.0 <= c <= y_min:  # c is the irreducible loss: 0 <= c <= the best loss seen
            c = min(max(c, 0.0), y_min)
            a = float(f @ (y - c) / (f @ f))
        return float(a), float(c), float(np.sum((a * f + c - y) ** 2))

    grid = -np.logspace(-3, 1, 400)  # b from -0.001 to -10
    sse = [solve(b)[2] if solve(b)[0] > 0 else np.inf for b in grid]
    i = int(np.argmin(sse))
    if not np.isfinite(sse[i]):
        return {"ok": False, "reason": "loss does not decrease with size (no a > 0, b < 0 fits)"}
    lo, hi = grid[min(i + 1, len(grid) - 1)], grid[max(i - 1, 0)]
    for _ in range(60):  # golden-section refinement of b inside the bracketing grid cell
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if solve(m1)[2] < solve(m2)[2]:
            hi = m2
        else:
            lo = m1
    b = (lo + hi) / 2
    a, c, err = solve(b)
    method = "grid+golden"
    try:
        from scipy.optimize import curve_fit

        p, _ = curve_fit(lambda t, a_, b_, c_: a_ * t**b_ + c_, x, y, p0=[a, b, min(max(c, 1e-9), y_min - 1e-9)],
                         bounds=([0, -10, 0], [np.inf, 0, y_min]), maxfev=20000)
        e2 = float(np.sum((power_law(x, *p) - y) ** 2))
        if p[0] > 0 and p[1] < 0 and e2 <= err:
            (a, b, c), err, method = (float(v) for v in p), e2, "scipy.curve_fit"
    except Exception:  # noqa: BLE001 — scipy missing or not converging: the closed-form fit stands
        pass
    if b > -1e-3:  # the bounded fit collapsed to a constant: no power law in these points
        return {"ok": False, "reason": f"no decreasing power law fits (b = {b:.2g}); loss does not fall with size"}
    # back to N itself: a·(N/Nmax)^b = (a·Nmax^-b)·N^b
    a_n = float(a * n.max() ** (-b))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"ok": True, "a": a_n, "b": b, "c": c, "sse": err, "r2": 1 - err / ss_tot if ss_tot > 0 else 1.0,
            "method": method, "points": len(n)}


# ---------------------------------------------------------------------------------------------
# Shared pieces: context, training, evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    name: str
    setup: Setup
    out: Path
    data: Any
    progress: bool
    t0: float = field(default_factory=time.time)
    _val: Any = None

    def say(self, msg: str) -> None:
        m, s = divmod(int(time.time() - self.t0), 60)
        print(f"[{self.name} {m:02d}:{s:02d}] {msg}", flush=True)

    def val_slice(self):
        """The same validation tokens (and their UTF-8 byte count) for every model."""
        if self._val is None:
            from .data import count_token_bytes

            n = min(len(self.data.val) - 1, self.setup.val_tokens)
            toks = self.data.val[: n + 1]
            self._val = (toks, count_token_bytes(toks[1:], self.data.tokenizer))
        return self._val


def _train(ctx: Context, tag: str, mcfg, recipe: str, lr: float, *, grad_clip: float | None = None,
           eval_every: int = 0, seed: int = 0, **train_kw: Any) -> dict[str, Any]:
    """Train one model; returns {"model" (None if diverged), "seconds", "curve", "diverged", ...}."""
    from .train import TrainConfig, train

    s = ctx.setup
    tcfg = TrainConfig(recipe=recipe, lr=lr, max_steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len,
                       eval_every=eval_every or s.steps, eval_batches=4, log_every=max(1, s.steps // 50),
                       out_dir=str(ctx.out / "ckpt" / tag), progress=ctx.progress, data=s.data, grad_clip=grad_clip,
                       seed=seed, device=s.device, **train_kw)
    t0 = time.time()
    model, diverged, reason = None, False, None
    try:
        res = train(mcfg, tcfg, ctx.data, log=ctx.say)
        model = res.model.eval()
    except FloatingPointError as e:  # train() stops on a non-finite loss: that *is* the result here
        diverged, reason = True, str(e)
    curve = _read_curve(ctx.out / "ckpt" / tag / "metrics.jsonl")
    return {"model": model, "seconds": time.time() - t0, "curve": curve, "diverged": diverged, "reason": reason,
            "tokens": s.tokens_per_model, "lr": lr, "recipe": recipe}


def _read_curve(path: Path) -> dict[str, list]:
    """Train loss (the LM loss alone for a distillation run, whose "loss" is the total), val loss
    and, when present, the KD terms per logged step."""
    steps, loss, vsteps, vloss = [], [], [], []
    kd: dict[str, list] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if "loss" in d:
                steps.append(d["step"])
                loss.append(d.get("lm_loss", d["loss"]))
                for k in ("kd_loss", "ad_loss"):
                    if k in d:
                        kd.setdefault(k, []).append(d[k])
            if "val_loss" in d:
                vsteps.append(d["step"])
                vloss.append(d["val_loss"])
    return {"step": steps, "loss": loss, "val_step": vsteps, "val_loss": vloss, **kd}


def _val(ctx: Context, model) -> dict[str, float]:
    from .evaluate import perplexity

    toks, n_bytes = ctx.val_slice()
    r = perplexity(model, toks, ctx.setup.seq_len, batch_size=ctx.setup.eval_batch, n_bytes=n_bytes)
    return {"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"], "val_tokens": r["tokens"]}


_CHANCE_CACHE: dict[tuple[str, int], float] = {}


def _chance(task: str, limit: int) -> float:
    """Accuracy of uniform guessing on the first ``limit`` items (LAMBADA is generative: 0)."""
    key = (task, limit)
    if key not in _CHANCE_CACHE:
        from .tasks import load_task

        items = load_task(task, limit)
        _CHANCE_CACHE[key] = 0.0 if task == "lambada" else float(np.mean([1 / len(it.choices) for it in items]))
    return _CHANCE_CACHE[key]


def _zero_shot(ctx: Context, model) -> dict[str, Any]:
    """acc per task (acc_norm where lm-eval reports it, as the papers' tables do) and the average."""
    from .tasks import evaluate_tasks

    s = ctx.setup
    if not s.tasks or s.limit <= 0:
        return {}
    r = evaluate_tasks(model, ctx.data.tokenizer, list(s.tasks), limit=s.limit, batch_size=s.eval_batch,
                       progress=ctx.progress)
    accs = {t: v.get("acc_norm", v["acc"]) for t, v in r["tasks"].items()}
    return {"tasks": accs, "n": {t: v["n"] for t, v in r["tasks"].items()},
            "avg": float(np.mean(list(accs.values()))), "seconds": r["seconds"]}


def _chance_row(s: Setup) -> dict[str, Any]:
    accs = {t: _chance(t, s.limit) for t in s.tasks}
    return {"tasks": accs, "avg": float(np.mean(list(accs.values()))) if accs else float("nan")}


def _energy(mcfg, seq_len: int) -> dict[str, float]:
    from .energy import estimate

    r = estimate(mcfg, seq_len, ENERGY_NODE)
    return {"energy_j_per_token": r.total_j_per_token, "mul_j_per_token": r.mul_j_per_token,
            "add_j_per_token": r.add_j_per_token, "energy_node": ENERGY_NODE, "energy_seq_len": seq_len}


def _linear_count(model) -> int:
    from .model import linear_modules

    return sum(m.weight.numel() for _, m in linear_modules(model))


def _linear_count_cfg(mcfg) -> int:
    from .energy import ModelShape

    return ModelShape.from_config(mcfg).linear_weights()


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e4 else format(x, fmt)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> str:
    from .io.atomic import atomic_write

    fig.tight_layout()
    # dpi 90 keeps each PNG well under 200 KB for the docs; the temp file's name has no image
    # suffix, so the format is named
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format=path.suffix.lstrip(".") or "png"))
    _plt().close(fig)
    return path.name


def _short(task: str) -> str:
    return {"arc_easy": "ARCe", "arc_challenge": "ARCc", "hellaswag": "HS", "piqa": "PQ", "winogrande": "WGe",
            "boolq": "BQ", "openbookqa": "OQ", "lambada": "LBA"}.get(task, task)


def _setup_md(ctx: Context, extra: str = "") -> str:
    s, st = ctx.setup, ctx.data.stats
    return (f"Corpus: {st.get('corpus', s.data)} ({st.get('train_tokens', 0):,} train tokens, byte-level BPE vocab "
            f"{ctx.data.tokenizer.vocab_size}); {s.steps} steps x {s.batch_size} x {s.seq_len} = "
            f"{s.tokens_per_model:,} tokens per model; validation: first {ctx.val_slice()[0].size - 1:,} tokens of the "
            f"held-out split; zero-shot: first {s.limit} items of each task. {extra}").strip()


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def exp_compare(ctx: Context) -> dict[str, Any]:
    s = ctx.setup
    rows, curves = [], {}
    for i, q in enumerate(("fp", "b1", "b1.58")):
        mcfg = s.model_config(q)
        ctx.say(f"({i + 1}/3) training {NAMES[q]}: d={mcfg.d_model} L={mcfg.n_layers}, recipe {RECIPE[q]}, "
                f"peak lr {LR[q]:g}, {s.steps} steps")
        tr = _train(ctx, q, mcfg, RECIPE[q], LR[q], eval_every=max(1, s.steps // 8))
        curves[q] = tr["curve"]
        row: dict[str, Any] = {"model": NAMES[q], "quant": q, "lr": LR[q], "recipe": RECIPE[q],
                               "train_seconds": tr["seconds"], "diverged": tr["diverged"]}
        n_lin = _linear_count_cfg(mcfg)
        bits = {"fp": 16, "b1": 1, "b1.58": 2}[q]  # fp16 storage; b1 packed 1 bit; b1.58 as i2 (2-bit)
        row.update(parameters=None, linear_weights=n_lin, linear_bytes=n_lin * bits // 8,
                   linear_bytes_fp16=n_lin * 2, linear_bytes_t1=(n_lin * 8 + 39) // 40 if q == "b1.58" else None,
                   **_energy(mcfg, s.seq_len))
        if tr["model"] is not None:
            row["parameters"] = tr["model"].num_parameters()
            ctx.say(f"evaluating {NAMES[q]} (val perplexity, zero-shot)")
            row.update(_val(ctx, tr["model"]))
            row["zero_shot"] = _zero_shot(ctx, tr["model"])
        rows.append(row)
        ctx.say(f"{NAMES[q]}: val ppl {_num(row.get('val_ppl'))}, zero-shot avg "
                f"{_pct(row.get('zero_shot', {}).get('avg'))}%")
    chance = _chance_row(s)

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for q, c in curves.items():
        ax[0].plot(c["step"], c["loss"], label=NAMES[q], lw=1)
        ax[1].plot(c["val_step"], c["val_loss"], "o-", label=NAMES[q], ms=3)
    ax[0].set(xlabel="step", ylabel="train loss (nats)", title="training loss")
    ax[1].set(xlabel="step", ylabel="val loss (nats)", title="validation loss")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    plots = [_save_fig(fig, ctx.out / "compare_loss.png")]

    head = ["model", "params", "val ppl", "val bpb", *[_short(t) for t in s.tasks], "zero-shot avg",
            "linear weights", "energy / token (7nm)"]
    tab = []
    for r in rows:
        zs = r.get("zero_shot", {})
        size = (f"{r['linear_bytes'] / 1e6:.3f} MB" + (f" (t1: {r['linear_bytes_t1'] / 1e6:.3f} MB)"
                                                         if r.get("linear_bytes_t1") else ""))
        tab.append([r["model"], f"{(r['parameters'] or 0) / 1e6:.2f}M", _num(r.get("val_ppl")), _num(r.get("val_bpb"), ".3f"),
                    *[_pct(zs.get("tasks", {}).get(t)) for t in s.tasks], _pct(zs.get("avg")), size,
                    f"{r['energy_j_per_token'] * 1e9:.3f} nJ"])
    tab.append(["chance", "", "", "", *[_pct(chance["tasks"][t]) for t in s.tasks], _pct(chance["avg"]), "", ""])
    md = ("## compare: fp vs BitNet b1 vs BitNet b1.58 (same shape, same tokens)\n\n" + _setup_md(
        ctx, "Accuracy is acc_norm where lm-eval reports it (ARC, HellaSwag, PIQA, OBQA), else acc. Linear weights: "
        "fp16 (2 bytes), b1 packed 1 bit, b1.58 packed 2 bit (i2; t1 base-3 packing: 1.6 bit). Energy: "
        f"bitlm.energy at {ENERGY_NODE}, {s.seq_len}-token forward, per token.") + "\n\n" + _md_table(head, tab)
          + "\n\n![loss](compare_loss.png)\n")
    return {"rows": rows, "chance": chance, "curves": curves, "plots": plots, "markdown": md}


# ---------------------------------------------------------------------------------------------
# ptq
# ---------------------------------------------------------------------------------------------


def _calib_ids(ctx: Context):
    """Calibration sequences from the *training* split, at fixed offsets (deterministic)."""
    import torch

    s, train = ctx.setup, ctx.data.train
    starts = np.linspace(0, len(train) - s.seq_len - 1, s.calib_seqs).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(train[i : i + s.seq_len], dtype=np.int64) for i in starts]))


def exp_ptq(ctx: Context) -> dict[str, Any]:
    from .ptq import METHODS, quantize_model

    s = ctx.setup
    rows: list[dict[str, Any]] = []
    trained = {}
    for i, q in enumerate(("fp", "b1.58", "b1")):
        mcfg = s.model_config(q)
        ctx.say(f"({i + 1}/3) training {NAMES[q]} (peak lr {LR[q]:g}, {s.steps} steps)")
        tr = _train(ctx, q, mcfg, RECIPE[q], LR[q])
        trained[q] = tr
    fp = trained["fp"]["model"]
    if fp is None:
        raise RuntimeError("the fp model diverged; nothing to quantise")

    def add_row(bits: str, method: str, ptq: bool, model, extra: dict[str, Any]) -> None:
        row = {"bits": bits, "method": method, "ptq": ptq, **extra}
        if model is not None:
            row.update(_val(ctx, model))
            row["zero_shot"] = _zero_shot(ctx, model)
        rows.append(row)
        ctx.say(f"{method:<24} W{bits:<5} val ppl {_num(row.get('val_ppl'))}  zero-shot avg "
                f"{_pct(row.get('zero_shot', {}).get('avg'))}%")

    add_row("16", "fp Transformer", False, fp, {"name": "fp", "train_seconds": trained["fp"]["seconds"]})
    calib = _calib_ids(ctx)
    for j, (name, m) in enumerate(METHODS.items()):
        ctx.say(f"PTQ ({j + 1}/{len(METHODS)}) {name}")
        t0 = time.time()
        qm = quantize_model(fp, name, calib if m.needs_calib else None, progress=False)
        add_row(m.label[1:].split("A")[0], f"{m.algorithm} ({m.label})", True, qm,
                {"name": name, "algorithm": m.algorithm, "w_bits": m.w_bits, "a_bits": m.a_bits,
                 "quantize_seconds": time.time() - t0})
    for q in ("b1.58", "b1"):
        tr = trained[q]
        add_row("1.58" if q == "b1.58" else "1", f"{NAMES[q]} (QAT, W{q[1:]}A8)", False, tr["model"],
                {"name": q, "train_seconds": tr["seconds"], "diverged": tr["diverged"]})
    chance = _chance_row(s)

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [r["method"].replace(" (", "\n(") for r in rows]
    ppl = [r.get("val_ppl", float("nan")) for r in rows]
    colors = ["tab:gray" if not r["ptq"] and r["name"] == "fp" else ("tab:orange" if r["ptq"] else "tab:green")
              for r in rows]
    ax.bar(range(len(rows)), ppl, color=colors)
    ax.set_yscale("log")
    ax.axhline(ppl[0], color="tab:gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=6.5)
    ax.set(ylabel="validation perplexity (log)", title="PTQ of the fp model (orange) vs QAT BitNet (green)")
    ax.grid(alpha=0.3, axis="y")
    plots = [_save_fig(fig, ctx.out / "ptq_ppl.png")]

    head = ["WBits", "Method", "PTQ", "val ppl", *[_short(t) for t in s.tasks], "Avg"]
    tab = [["-", "Random", "-", "-", *[_pct(chance["tasks"][t]) for t in s.tasks], _pct(chance["avg"])]]
    for r in rows:
        zs = r.get("zero_shot", {})
        tab.append([r["bits"], ("**" + r["method"] + "**") if r["name"] in ("b1", "b1.58") else r["method"],
                    "yes" if r["ptq"] else "no", _num(r.get("val_ppl")),
                    *[_pct(zs.get("tasks", {}).get(t)) for t in s.tasks], _pct(zs.get("avg"))])
    md = ("## ptq: post-training quantisation of an fp model vs QAT BitNet (cf. 2310.11453 Table 3)\n\n"
          + _setup_md(ctx, f"PTQ calibration: {s.calib_seqs} x {s.seq_len} training-split tokens.")
          + "\n\n" + _md_table(head, tab) + "\n\n![ptq](ptq_ppl.png)\n")
    return {"rows": rows, "chance": chance, "plots": plots, "markdown": md,
            "curves": {q: t["curve"] for q, t in trained.items()}}


# ---------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------


def exp_scaling(ctx: Context) -> dict[str, Any]:
    s = ctx.setup
    rows: list[dict[str, Any]] = []
    k, total = 0, 2 * len(s.widths)
    for q in ("fp", "b1.58"):
        for d in s.widths:
            k += 1
            mcfg = s.model_config(q, d_model=d)
            n_lin = _linear_count_cfg(mcfg)
            ctx.say(f"({k}/{total}) {NAMES[q]} d={d}: {n_lin:,} linear weights, {s.steps} steps")
            tr = _train(ctx, f"{q}-d{d}", mcfg, RECIPE[q], LR[q])
            row = {"quant": q, "d_model": d, "n_layers": s.n_layers, "linear_weights": n_lin,
                   "train_seconds": tr["seconds"], "diverged": tr["diverged"], **_energy(mcfg, s.seq_len)}
            if tr["model"] is not None:
                row["parameters"] = tr["model"].num_parameters()
                row.update(_val(ctx, tr["model"]))
            rows.append(row)
            ctx.say(f"   val loss {_num(row.get('val_loss'), '.4f')}")
    fits = {}
    for q in ("fp", "b1.58"):
        pts = [r for r in rows if r["quant"] == q and "val_loss" in r]
        fits[q] = fit_power_law([r["linear_weights"] for r in pts], [r["val_loss"] for r in pts])

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = {"fp": "tab:blue", "b1.58": "tab:red"}
    for q in ("fp", "b1.58"):
        pts = [r for r in rows if r["quant"] == q and "val_loss" in r]
        if not pts:
            continue
        n = np.array([r["linear_weights"] for r in pts], float)
        y = np.array([r["val_loss"] for r in pts])
        e = np.array([r["energy_j_per_token"] for r in pts])
        ax[0].plot(n, y, "o", color=colors[q], label=NAMES[q])
        ax[1].plot(e, y, "o-", color=colors[q], label=NAMES[q])
        f = fits[q]
        if f["ok"]:
            grid = np.logspace(np.log10(n.min() / 1.5), np.log10(n.max() * 3), 100)
            ax[0].plot(grid, power_law(grid, f["a"], f["b"], f["c"]), "-", color=colors[q], lw=1,
                       label=f"fit: {f['a']:.3g}·N^{f['b']:.3f} + {f['c']:.3f}")
    ax[0].set(xscale="log", xlabel="linear (non-embedding) weights N", ylabel="val loss (nats)",
              title="loss vs size, L(N) = a·N^b + c")
    ax[1].set(xscale="log", xlabel=f"inference energy per token, J ({ENERGY_NODE})", ylabel="val loss (nats)",
              title="loss vs inference energy")
    for a in ax:
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    plots = [_save_fig(fig, ctx.out / "scaling.png")]

    head = ["variant", "d_model", "linear weights N", "params (all)", "val loss", "val ppl", "energy / token (7nm)"]
    tab = [[NAMES[r["quant"]], str(r["d_model"]), f"{r['linear_weights']:,}", f"{r.get('parameters', 0):,}",
            _num(r.get("val_loss"), ".4f"), _num(r.get("val_ppl")), f"{r['energy_j_per_token'] * 1e9:.4f} nJ"]
           for r in rows]
    fit_tab = [[NAMES[q], *([f"{f['a']:.4g}", f"{f['b']:.4f}", f"{f['c']:.4f}", f"{f['r2']:.4f}", f["method"]]
                            if f["ok"] else ["-", "-", "-", "-", f["reason"]])] for q, f in fits.items()]
    md = ("## scaling: loss vs size and vs inference energy (cf. 2310.11453 Fig. 3)\n\n"
          + _setup_md(ctx, f"Same tokens for every size (as in the b1 paper); depth {s.n_layers}, width swept. "
                      "N counts the linear (quantised) weights; the embedding and output head are excluded.")
          + "\n\n" + _md_table(head, tab) + "\n\nFits of L(N) = a·N^b + c:\n\n"
          + _md_table(["variant", "a", "b", "c", "R²", "method / note"], fit_tab) + "\n\n![scaling](scaling.png)\n")
    return {"rows": rows, "fits": fits, "plots": plots, "markdown": md}


# ---------------------------------------------------------------------------------------------
# lr
# ---------------------------------------------------------------------------------------------


def exp_lr(ctx: Context) -> dict[str, Any]:
    s = ctx.setup
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    init_loss = math.log(s.vocab_size)  # a uniform prediction; anything above it learned nothing
    k, total = 0, 2 * len(s.lrs)
    for q in ("fp", "b1.58"):
        for lr in s.lrs:
            k += 1
            ctx.say(f"({k}/{total}) {NAMES[q]} peak lr {lr:g}")
            # grad_clip=0 for both: the b1 paper trained BitNet and its fp16 baseline without clipping
            # (Table 6), and clipping would hide exactly the instability this sweep looks for
            tr = _train(ctx, f"{q}-lr{lr:g}", s.model_config(q), RECIPE[q], lr, grad_clip=0.0,
                        eval_every=max(1, s.steps // 8))
            row: dict[str, Any] = {"quant": q, "lr": lr, "train_seconds": tr["seconds"], "reason": tr["reason"]}
            if tr["model"] is not None:
                row.update(_val(ctx, tr["model"]))
            first = tr["curve"]["loss"][0] if tr["curve"]["loss"] else init_loss
            row["initial_loss"] = max(first, init_loss)
            row["diverged"] = tr["diverged"] or not math.isfinite(row.get("val_loss", float("nan"))) \
                or row["val_loss"] > row["initial_loss"]
            if row["diverged"] and not tr["diverged"]:
                row["reason"] = f"final val loss {row.get('val_loss', float('nan')):.3f} >= initial {row['initial_loss']:.3f}"
            rows.append(row)
            curves[f"{q}@{lr:g}"] = tr["curve"]
            ctx.say("   " + ("DIVERGED: " + str(row["reason"]) if row["diverged"] else f"val loss {row['val_loss']:.4f}"))

    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    cmap = plt.get_cmap("viridis")
    for j, q in enumerate(("fp", "b1.58")):
        for i, lr in enumerate(s.lrs):
            c = curves[f"{q}@{lr:g}"]
            ax[j].plot(c["step"], c["loss"], color=cmap(i / max(1, len(s.lrs) - 1)), lw=1, label=f"lr {lr:g}")
        ax[j].set(xlabel="step", ylabel="train loss (nats)", title=f"{NAMES[q]}", ylim=(None, init_loss * 1.4))
        ax[j].legend(fontsize=7)
        ax[j].grid(alpha=0.3)
    for q, col in (("fp", "tab:blue"), ("b1.58", "tab:red")):
        pts = [r for r in rows if r["quant"] == q]
        ok = [r for r in pts if not r["diverged"]]
        bad = [r for r in pts if r["diverged"]]
        ax[2].plot([r["lr"] for r in ok], [r["val_loss"] for r in ok], "o-", color=col, label=NAMES[q])
        if bad:
            ax[2].plot([r["lr"] for r in bad], [init_loss] * len(bad), "x", color=col, ms=9, label=f"{q} diverged")
    ax[2].set(xscale="log", xlabel="peak learning rate", ylabel="final val loss (nats)", title="final loss vs LR")
    ax[2].legend(fontsize=7)
    ax[2].grid(alpha=0.3, which="both")
    plots = [_save_fig(fig, ctx.out / "lr.png")]

    head = ["peak LR", *[NAMES[q] for q in ("fp", "b1.58")]]
    tab = []
    for lr in s.lrs:
        cells = []
        for q in ("fp", "b1.58"):
            r = next(r for r in rows if r["quant"] == q and r["lr"] == lr)
            cells.append("diverged" + (f" (val loss {r['val_loss']:.3f})" if math.isfinite(r.get("val_loss", math.nan))
                                       else "") if r["diverged"] else f"{r['val_loss']:.4f}")
        tab.append([f"{lr:g}", *cells])
    md = ("## lr: learning-rate stability sweep (cf. 2310.11453 §2.2, Fig. 5a)\n\n"
          + _setup_md(ctx, "Each variant keeps its own schedule (fp: cosine; b1.58: two-stage) with the peak LR "
                      "swept and no gradient clipping for either. Cell: final validation loss (nats); 'diverged' = a "
                      f"non-finite loss or a final loss above the initial one (ln V = {init_loss:.2f}). Training is "
                      "fp32 on CPU (no fp16 overflow).")
          + "\n\n" + _md_table(head, tab) + "\n\n![lr](lr.png)\n")
    return {"rows": rows, "curves": curves, "plots": plots, "markdown": md}


# ---------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------


def exp_groups(ctx: Context) -> dict[str, Any]:
    from .tensor_parallel import group_config

    s = ctx.setup
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    # the G values, then G = 1 again with another seed (other initial weights and batches): the
    # run-to-run noise the differences between G values are to be read against
    runs = [(g, 0) for g in s.groups] + [(1, 1)]
    for i, (g, seed) in enumerate(runs):
        mcfg = group_config(s.model_config("b1.58"), g) if g > 1 else s.model_config("b1.58")
        label = f"G = {g}" + (f", seed {seed}" if seed else "")
        ctx.say(f"({i + 1}/{len(runs)}) BitNet b1.58 with {label}: d={mcfg.d_model} L={mcfg.n_layers}, {s.steps} steps")
        tr = _train(ctx, f"g{g}" + (f"-seed{seed}" if seed else ""), mcfg, RECIPE["b1.58"], LR["b1.58"],
                    eval_every=max(1, s.steps // 8), seed=seed)
        curves[label] = tr["curve"]
        row: dict[str, Any] = {"groups": g, "seed": seed, "label": label, "train_seconds": tr["seconds"],
                               "diverged": tr["diverged"]}
        if tr["model"] is not None:
            row.update(_val(ctx, tr["model"]))
        rows.append(row)
        ctx.say(f"{label}: val ppl {_num(row.get('val_ppl'))}")
    base = next((r for r in rows if r["groups"] == 1 and r["seed"] == 0 and "val_ppl" in r), None)

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, c in curves.items():
        ax[0].plot(c["val_step"], c["val_loss"], "o-" if "seed" not in label else "x--", label=label, ms=3)
    ok = [r for r in rows if "val_ppl" in r and r["seed"] == 0]
    ax[1].plot([r["groups"] for r in ok], [r["val_ppl"] for r in ok], "o-", label="seed 0")
    noise = [r for r in rows if "val_ppl" in r and r["seed"] != 0]
    if noise:
        ax[1].plot([r["groups"] for r in noise], [r["val_ppl"] for r in noise], "x", ms=9, label="G = 1, seed 1")
        ax[1].legend(fontsize=8)
    ax[0].set(xlabel="step", ylabel="val loss (nats)", title="validation loss")
    ax[1].set(xscale="log", xlabel="groups G", ylabel="val perplexity", title="final val perplexity vs G")
    ax[1].set_xticks([r["groups"] for r in ok], [str(r["groups"]) for r in ok])
    for a in ax:
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    plots = [_save_fig(fig, ctx.out / "groups.png")]

    tab = []
    for r in rows:
        delta = (f"{100 * (r['val_ppl'] / base['val_ppl'] - 1):+.2f}%" if base and "val_ppl" in r and r is not base
                 else "")
        tab.append([r["label"], "diverged" if r["diverged"] else _num(r.get("val_loss"), ".4f"),
                    _num(r.get("val_ppl")), _num(r.get("val_bpb"), ".3f"), delta, f"{r['train_seconds']:.0f}"])
    md = ("## groups: group quantisation and normalisation, G = " + ", ".join(map(str, s.groups))
          + " (2310.11453 Eq. 13-15)\n\n"
          + _setup_md(ctx, "BitNet b1.58, the same initial weights and batches for every G. G > 1 is the "
                      "tensor-parallel group mode (what `bitlm train --tp G --tp-quant group` trains): G weight "
                      "groups along output rows of q/k/v/gate/up and input columns of o/down, and G groups for "
                      "the activation absmax of o/down's inputs and for the two sub-norms before them; G = 1 is "
                      "the usual whole-tensor model. The last row retrains G = 1 with seed 1 (other initial "
                      "weights and batches): the run-to-run noise to read the differences against.")
          + "\n\n" + _md_table(["G", "val loss", "val ppl", "val bpb", "ppl vs G = 1", "train s"], tab)
          + "\n\n![groups](groups.png)\n")
    return {"rows": rows, "curves": curves, "plots": plots, "markdown": md}
# distill
# ---------------------------------------------------------------------------------------------

DISTILL_RUNS = (("b1.58", "BitNet b1.58, no teacher", {}),
                ("b1.58+ld", "b1.58 + logit KD", {"kd": True}),
                ("b1.58+ld+ad", "b1.58 + logit KD + attention-relation KD", {"kd": True, "ad": True}))


def _teacher_kl(ctx: Context, student, teacher, temperature: float = 1.0) -> float:
    """Mean KL(teacher ‖ student) per token (nats, τ = 1) on the validation slice: how close the
    student's next-token distribution came to the teacher's."""
    import torch

    from .distill import kd_logit_loss

    toks, _ = ctx.val_slice()
    s = ctx.setup
    x = torch.from_numpy(np.asarray(toks[: (len(toks) - 1) // s.seq_len * s.seq_len], dtype=np.int64)).view(-1, s.seq_len)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], s.eval_batch):
            b = x[i : i + s.eval_batch]
            total += kd_logit_loss(student(b), teacher(b).float(), temperature).item() * b.numel()
            n += b.numel()
    return total / max(1, n)


def _check_teacher(path: str, vocab_size: int):
    """The teacher at ``path`` (frozen, eval), refused unless its vocabulary is the experiment's."""
    from .distill import load_teacher

    teacher = load_teacher(path)
    if teacher.config.vocab_size != vocab_size:
        raise ValueError(f"--teacher {path}: its vocabulary has {teacher.config.vocab_size} tokens, the "
                         f"experiment's {vocab_size}; distillation needs the same tokenizer")
    return teacher


def exp_distill(ctx: Context) -> dict[str, Any]:
    s = ctx.setup
    eval_every = max(1, s.steps // 8)
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    if s.teacher:
        teacher_path = s.teacher
        ctx.say(f"(1/4) teacher: {teacher_path} (given)")
        teacher_row: dict[str, Any] = {"model": f"fp teacher ({teacher_path})", "tag": "teacher", "train_seconds": 0.0}
    else:
        mcfg = s.model_config("fp")
        ctx.say(f"(1/4) training the fp teacher: d={mcfg.d_model} L={mcfg.n_layers}, recipe fp, peak lr {LR['fp']:g}, "
                f"{s.steps} steps")
        tr = _train(ctx, "teacher", mcfg, "fp", LR["fp"], eval_every=eval_every)
        if tr["model"] is None:
            raise FloatingPointError(f"the fp teacher diverged: {tr['reason']}")
        teacher_path = str(ctx.out / "ckpt" / "teacher" / "last")
        curves["teacher"] = tr["curve"]
        teacher_row = {"model": "fp teacher (same shape, same tokens)", "tag": "teacher", "train_seconds": tr["seconds"]}
    teacher = _check_teacher(teacher_path, s.vocab_size)
    teacher_row.update(parameters=teacher.num_parameters(), **_val(ctx, teacher))
    teacher_row["zero_shot"] = _zero_shot(ctx, teacher)
    rows.append(teacher_row)
    mcfg = s.model_config("b1.58")
    last_layer = mcfg.n_layers - 1
    for i, (tag, label, kd) in enumerate(DISTILL_RUNS):
        kw: dict[str, Any] = {}
        if kd.get("kd"):
            kw = dict(teacher=teacher_path, kd_weight=s.kd_weight, kd_temperature=s.kd_temperature)
        if kd.get("ad"):
            kw.update(kd_attention_layers=[last_layer], kd_attention_weight=s.kd_attention_weight)
        ctx.say(f"({i + 2}/4) training {label}: peak lr {LR['b1.58']:g}, {s.steps} steps"
                + (f", λ {s.kd_weight:g}, τ {s.kd_temperature:g}" if kw else "")
                + (f", γ {s.kd_attention_weight:g} at layer {last_layer}" if kd.get("ad") else ""))
        tr = _train(ctx, tag, mcfg, "b1.58", LR["b1.58"], eval_every=eval_every, **kw)
        curves[tag] = tr["curve"]
        row: dict[str, Any] = {"model": label, "tag": tag, "train_seconds": tr["seconds"], "diverged": tr["diverged"],
                               **{k: v for k, v in kw.items() if k != "teacher"}}
        if tr["model"] is not None:
            row["parameters"] = tr["model"].num_parameters()
            row.update(_val(ctx, tr["model"]))
            row["kl_to_teacher"] = _teacher_kl(ctx, tr["model"], teacher)
            row["zero_shot"] = _zero_shot(ctx, tr["model"])
        rows.append(row)
        ctx.say(f"{label}: val ppl {_num(row.get('val_ppl'))}, KL to teacher {_num(row.get('kl_to_teacher'), '.4f')}, "
                f"zero-shot avg {_pct(row.get('zero_shot', {}).get('avg'))}%")
    chance = _chance_row(s)

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for tag, c in curves.items():
        name = "fp teacher" if tag == "teacher" else next(lbl for t, lbl, _ in DISTILL_RUNS if t == tag)
        ax[0].plot(c["step"], c["loss"], label=name, lw=1)
        ax[1].plot(c["val_step"], c["val_loss"], "o-", label=name, ms=3)
    ax[0].set(xlabel="step", ylabel="train LM loss (nats)", title="training loss (CE term)")
    ax[1].set(xlabel="step", ylabel="val loss (nats)", title="validation loss")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    plots = [_save_fig(fig, ctx.out / "distill_loss.png")]

    head = ["model", "val ppl", "val bpb", "KL to teacher", *[_short(t) for t in s.tasks], "zero-shot avg"]
    tab = []
    for r in rows:
        zs = r.get("zero_shot", {})
        tab.append([r["model"], _num(r.get("val_ppl")), _num(r.get("val_bpb"), ".3f"),
                    _num(r.get("kl_to_teacher"), ".4f") if r["tag"] != "teacher" else "0",
                    *[_pct(zs.get("tasks", {}).get(t)) for t in s.tasks], _pct(zs.get("avg"))])
    tab.append(["chance", "", "", "", *[_pct(chance["tasks"][t]) for t in s.tasks], _pct(chance["avg"])])
    md = ("## distill: BitNet b1.58 with and without an fp teacher (same shape, same tokens)\n\n" + _setup_md(
        ctx, f"Students: b1.58 recipe, peak lr {LR['b1.58']:g}. KD (bitlm.distill, BitDistill Eq. 13): "
        f"L = CE + λ·τ²·KL(teacher ‖ student at τ) [+ γ·L_AD, Q/K/V relations at layer {last_layer}], "
        f"λ = {s.kd_weight:g}, τ = {s.kd_temperature:g}, γ = {s.kd_attention_weight:g}. 'KL to teacher': mean "
        "KL(teacher ‖ student) per validation token at τ = 1 (nats). Accuracy is acc_norm where lm-eval reports it, "
        "else acc.") + "\n\n" + _md_table(head, tab) + "\n\n![loss](distill_loss.png)\n")
    return {"rows": rows, "chance": chance, "curves": curves, "plots": plots, "markdown": md,
            "teacher": teacher_path}


# ---------------------------------------------------------------------------------------------
# activations: BitNet a4.8 and BitNet v2 (4-bit activations) beside fp and b1.58 A8
# ---------------------------------------------------------------------------------------------

#: Fraction of each model's tokens trained after the switch to 4-bit activations.  The papers use
#: 5 % (95B A8 + 5B A4 tokens); at a few hundred steps 5 % is too short for a learning-rate warm-up,
#: so the default is 10 % (stated in the results).
ACT_SWITCH_FRAC = 0.1

# The papers' numbers (C4 valid PPL; lm-eval zero-shot Avg), smallest size of each paper: a4.8
# Table 1 (700M, 100B tokens) and v2 Table 1 (400M, 100B tokens).  Compare methods within a paper.
ACT_PAPERS = [
    ("BitNet a4.8 Table 1, 700M", {"fp16 LLaMA": (11.44, 47.44), "b1.58 A8": (12.32, 46.17), "a4.8": (12.40, 45.72)}),
    ("BitNet v2 Table 1, 400M", {"b1.58 A8": (13.37, 44.87), "a4.8": (13.61, 44.75), "v2 (a8)": (13.50, 44.33),
                                 "v2 (a4)": (13.78, 43.95)}),
]
ACT_SITES = ("qkv", "o", "ffn_in", "down")


def _train_stage(ctx: Context, tag: str, mcfg, *, steps: int, lr: float, init_model=None,
                 stage2: bool = False) -> dict[str, Any]:
    """One training run; ``stage2``: the 4-bit continuation — the low stage of b1.58's two-stage
    schedule (peak lr·2/3, weight decay 0: where the papers' last 5 % of tokens falls), a fresh
    optimizer, a short warm-up."""
    from .train import TrainConfig, train

    s = ctx.setup
    kw: dict[str, Any] = {}
    if stage2:
        lr2 = lr * 2 / 3
        kw = dict(lr=lr2, lr2=lr2, weight_decay=0.0, weight_decay2=0.0, warmup_steps=max(1, steps // 10))
    else:
        kw = dict(lr=lr)
    recipe = "fp" if mcfg.quant == "fp" else "b1.58"
    tcfg = TrainConfig(recipe=recipe, max_steps=steps, batch_size=s.batch_size, seq_len=s.seq_len,
                       eval_every=max(1, steps // 4), eval_batches=4, log_every=max(1, steps // 50),
                       out_dir=str(ctx.out / "ckpt" / tag), progress=ctx.progress, data=s.data, device=s.device, **kw)
    t0 = time.time()
    res = train(mcfg, tcfg, ctx.data, init_model=init_model, log=ctx.say)
    return {"model": res.model.eval(), "seconds": time.time() - t0,
            "curve": _read_curve(ctx.out / "ckpt" / tag / "metrics.jsonl")}


def act_sparsity(model, ids) -> dict[str, float]:
    """Fraction of exact zeros in each projection site's quantised input (a4.8 Table 2's
    sparsity), over one forward pass of ``ids``: the activation each BitLinear feeds its matmul."""
    import torch

    from . import quant as Q
    from .layers import BitLinear

    sites = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "ffn_in",
             "up_proj": "ffn_in", "down_proj": "down"}
    zeros: dict[str, list[float]] = {k: [0.0, 0.0] for k in ACT_SITES}
    hooks = []
    for name, m in model.named_modules():
        if not isinstance(m, BitLinear) or m.act_bits is None:
            continue
        site = sites[name.rsplit(".", 1)[-1]]

        def hook(mod, args, site=site):
            x = mod.normalize(args[0].detach().float())
            if mod.hadamard:
                x = Q.hadamard_transform(x)
            if mod.act_quant == "absmean":
                q, _ = Q.activation_quantize_absmean(x, mod.act_bits)
            else:
                q, _ = Q.activation_quantize(x, mod.act_bits)
                if mod.act_topk is not None:
                    q = q * Q.topk_mask(x, mod.act_topk)
            zeros[site][0] += float((q == 0).sum())
            zeros[site][1] += q.numel()

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {k: z / n for k, (z, n) in zeros.items() if n}


def exp_activations(ctx: Context) -> dict[str, Any]:
    """fp vs b1.58 A8 vs BitNet a4.8 vs BitNet v2 (a4), equal shape and equal tokens.

    Every quantised model sees the same token count: stage 1 (8-bit activations, (1-f) of the
    steps) then stage 2 (f of the steps, ``ACT_SWITCH_FRAC``) — with 8-bit activations for the A8
    baseline, a4.8's hybrid INT4 / sparse INT8 for a4.8, and 4-bit H-BitLinear for v2, whose stage 1
    is v2 (a8) (the Hadamard layers train from step 0, v2 §3).  The A8 baseline and a4.8 share one
    stage-1 model, so the two differ only in the activations of the last f of the tokens."""
    import torch

    from .train import switch_act_variant

    s = ctx.setup
    n2 = max(1, int(round(s.steps * ACT_SWITCH_FRAC)))
    n1 = max(1, s.steps - n2)
    lr = LR["b1.58"]
    rows, curves = [], {}

    def finish(key: str, name: str, model, seconds: float, extra: dict[str, Any]) -> None:
        ctx.say(f"evaluating {name} (val perplexity, zero-shot, activation sparsity)")
        row: dict[str, Any] = {"key": key, "model": name, "train_seconds": seconds, **extra}
        row.update(_val(ctx, model))
        row["zero_shot"] = _zero_shot(ctx, model)
        toks = ctx.val_slice()[0]
        n = min(4, (toks.size - 1) // s.seq_len)
        ids = torch.as_tensor(np.asarray(toks[: n * s.seq_len], dtype=np.int64)).reshape(n, s.seq_len)
        row["sparsity"] = act_sparsity(model, ids) if key != "fp" else {}
        rows.append(row)
        ctx.say(f"{name}: val ppl {_num(row.get('val_ppl'))}, zero-shot avg {_pct(row['zero_shot'].get('avg'))}%")

    ctx.say(f"(1/6) fp: {s.steps} steps, recipe fp, peak lr {LR['fp']:g}")
    fp = _train_stage(ctx, "fp", s.model_config("fp"), steps=s.steps, lr=LR["fp"])
    curves["fp"] = fp["curve"]
    finish("fp", "fp (same shape)", fp["model"], fp["seconds"], {"stage1_steps": s.steps, "stage2_steps": 0})

    ctx.say(f"(2/6) b1.58 stage 1 (A8): {n1} steps")
    st1 = _train_stage(ctx, "a8-stage1", s.model_config("b1.58"), steps=n1, lr=lr)
    ctx.say(f"(3/6) b1.58 A8 stage 2 (A8 continued): {n2} steps")
    a8 = _train_stage(ctx, "a8", st1["model"].config, steps=n2, lr=lr,
                      init_model=switch_act_variant(st1["model"], "a8"), stage2=True)
    curves["a8"] = {"stage1": st1["curve"], "stage2": a8["curve"]}
    finish("a8", "BitNet b1.58 (A8)", a8["model"], st1["seconds"] + a8["seconds"],
           {"stage1_steps": n1, "stage2_steps": n2})

    ctx.say(f"(4/6) BitNet a4.8 stage 2 (from the same stage-1 model): {n2} steps")
    a48 = _train_stage(ctx, "a4.8", st1["model"].config.replace(act_variant="a4.8"), steps=n2, lr=lr,
                       init_model=switch_act_variant(st1["model"], "a4.8"), stage2=True)
    curves["a4.8"] = {"stage1": st1["curve"], "stage2": a48["curve"]}
    finish("a4.8", "BitNet a4.8 (A8 → a4.8)", a48["model"], st1["seconds"] + a48["seconds"],
           {"stage1_steps": n1, "stage2_steps": n2})

    ctx.say(f"(5/6) BitNet v2 stage 1 (v2 a8: H-BitLinear, 8-bit): {n1} steps")
    v1 = _train_stage(ctx, "v2-a8-stage1", s.model_config("b1.58").replace(act_variant="v2-a8"), steps=n1, lr=lr)
    v1_val = _val(ctx, v1["model"])
    ctx.say(f"(6/6) BitNet v2 stage 2 (v2 a4): {n2} steps")
    v2 = _train_stage(ctx, "v2-a4", v1["model"].config.replace(act_variant="v2-a4"), steps=n2, lr=lr,
                      init_model=switch_act_variant(v1["model"], "v2-a4"), stage2=True)
    curves["v2-a4"] = {"stage1": v1["curve"], "stage2": v2["curve"]}
    finish("v2-a4", "BitNet v2 (v2 a8 → a4)", v2["model"], v1["seconds"] + v2["seconds"],
           {"stage1_steps": n1, "stage2_steps": n2, "stage1_val_ppl": v1_val["val_ppl"]})
    chance = _chance_row(s)

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9.5, 3.4))
    ax[0].plot(curves["fp"]["step"], curves["fp"]["loss"], label="fp", lw=1)
    for key, lab in (("a8", "b1.58 A8"), ("v2-a4", "v2: v2-a8 → a4")):
        c1 = curves[key]["stage1"]
        ax[0].plot(c1["step"], c1["loss"], label=lab + " (stage 1)", lw=1)
    for key, lab in (("a8", "A8 → A8"), ("a4.8", "A8 → a4.8"), ("v2-a4", "v2-a8 → v2-a4")):
        c2 = curves[key]["stage2"]
        ax[1].plot([n1 + x for x in c2["step"]], c2["loss"], label=lab, lw=1)
    ax[0].set(xlabel="step", ylabel="train loss (nats)", title="stage 1 (8-bit) and fp")
    ax[1].set(xlabel="step", ylabel="train loss (nats)", title=f"stage 2: last {n2} steps")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    plots = [_save_fig(fig, ctx.out / "activations_loss.png")]

    head = ["model", "val ppl", "val bpb", *[_short(t) for t in s.tasks], "zero-shot avg",
            *[f"zeros {k}" for k in ACT_SITES]]
    tab = []
    for r in rows:
        zs, sp = r.get("zero_shot", {}), r.get("sparsity", {})
        tab.append([r["model"], _num(r.get("val_ppl")), _num(r.get("val_bpb"), ".3f"),
                    *[_pct(zs.get("tasks", {}).get(t)) for t in s.tasks], _pct(zs.get("avg")),
                    *[_pct(sp.get(k)) for k in ACT_SITES]])
    tab.append(["chance", "", "", *[_pct(chance["tasks"][t]) for t in s.tasks], _pct(chance["avg"]),
                *[""] * len(ACT_SITES)])
    papers = [[src, m, f"{p:.2f}", f"{a:.2f}"] for src, d in ACT_PAPERS for m, (p, a) in d.items()]
    md = ("## activations: fp vs b1.58 A8 vs BitNet a4.8 vs BitNet v2 (same shape, same tokens)\n\n" + _setup_md(
        ctx, f"Quantised models: {n1} steps with 8-bit activations, then {n2} steps ({ACT_SWITCH_FRAC:.0%}) with "
        "the variant switched on (`switch_act_variant`, fresh optimizer, low-stage LR "
        f"{lr * 2 / 3:g}, weight decay 0); the A8 row continues with 8 bits the same way, from the same stage-1 "
        f"model as a4.8. v2's stage 1 is v2 (a8) (Hadamard from step 0; its val ppl after stage 1: "
        f"{_num(v1_val['val_ppl'])}). fp: {s.steps} steps, fp recipe. 'zeros X' = fraction of exact zeros in the "
        "quantised input of the X projections (a4.8 Table 2's sparsity).") + "\n\n" + _md_table(head, tab)
          + "\n\nThe papers (100B tokens; C4 PPL, zero-shot Avg; compare within a paper):\n\n"
          + _md_table(["source", "model", "PPL", "Avg"], papers) + "\n\n![loss](activations_loss.png)\n")
    return {"rows": rows, "chance": chance, "curves": curves, "plots": plots, "markdown": md,
            "switch_frac": ACT_SWITCH_FRAC, "papers": {src: d for src, d in ACT_PAPERS}}


# ---------------------------------------------------------------------------------------------
# Driver and CLI
# ---------------------------------------------------------------------------------------------

_RUNNERS = {"compare": exp_compare, "ptq": exp_ptq, "scaling": exp_scaling, "lr": exp_lr, "groups": exp_groups,
            "distill": exp_distill, "activations": exp_activations}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):  # trained modules ride along in the rows for plotting; JSON gets the numbers
        return {str(k): _jsonable(v) for k, v in x.items() if not hasattr(v, "state_dict")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN / inf
    return x


def run_experiment(name: str, setup: Setup | None = None, out: str | Path | None = None, progress: bool = True,
                   data: Any = None, command: str | None = None) -> dict[str, Any]:
    """Run experiment ``name`` and write results.json / results.md / PNGs into ``out``."""
    if name not in _RUNNERS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    import torch

    setup = setup or Setup()
    outp = Path(out or f"runs/experiments/{name}")
    outp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if data is None:
        from .data import prepare_data

        data = prepare_data(setup.data, vocab_size=setup.vocab_size)
    ctx = Context(name, setup, outp, data, progress, t0=t0)
    ctx.say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {setup.device}; out {outp}")
    res = _RUNNERS[name](ctx)
    seconds = time.time() - t0
    res.update(experiment=name, seconds=seconds, setup=asdict(setup), command=command,
               corpus={k: v for k, v in ctx.data.stats.items() if isinstance(v, (int, float, str))})
    md = res.pop("markdown")
    from .io.atomic import atomic_write_text

    atomic_write_text(outp / "results.md",
        md + f"\nCommand: `{command or 'bitlm experiment ' + name}`; wall time {seconds / 60:.1f} min "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads).\n")
    atomic_write_text(outp / "results.json", json.dumps(_jsonable(res), indent=1, allow_nan=False) + "\n")
    ctx.say(f"done in {seconds / 60:.1f} min: {outp / 'results.md'}, {outp / 'results.json'}, "
            f"{', '.join(res['plots'])}")
    return res


def add_arguments(p) -> None:
    p.add_argument("name", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--scale", type=float, default=1.0, help="x linear weights and x tokens per model (default 1)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run on a tiny model (tests)")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/<name>)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (overrides --scale)")
    p.add_argument("--minutes", type=float, default=None,
                   help="fit the steps per model so the experiment's training takes about this long")
    p.add_argument("--limit", type=int, default=None, help="zero-shot items per task (0 = skip zero-shot)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, or 'all'")
    p.add_argument("--lrs", default=None, help="comma-separated peak LRs for the lr sweep")
    p.add_argument("--widths", default=None, help="comma-separated d_model values for the scaling sweep")
    p.add_argument("--groups", default=None, help="comma-separated G values for the groups sweep (default 1,2,4,8)")
    p.add_argument("--data", default=None, help="'default' (bundled corpus) or a text file")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--teacher", default=None,
                   help="distill: use this fp model as the teacher instead of training one (same tokenizer/vocab)")
    p.add_argument("--device", default=None,
                   help="auto (CUDA when available; the default) | cpu | cuda | mps: where the models train and are scored")
    p.add_argument("--no-progress", action="store_true")


def _fit_steps(name: str, s: Setup, data, minutes: float) -> int:
    """Steps per model so that the experiment's training takes about ``minutes`` (timed on the
    largest model it trains; evaluation comes on top)."""
    from .train import time_train_step

    widths = s.widths if name == "scaling" else (s.d_model,)
    per = 0.0
    for d in widths:
        for q in ("fp", "b1.58"):  # mean of fp and b1.58: one step of the average variant
            per += time_train_step(s.model_config(q, d_model=d), data, s.batch_size, s.seq_len, steps=2,
                                   device=s.device) / 2
    # scaling: `per` already sums one step of every width, and each width is trained twice
    # distill: 4 models, KD ≈ 1.3 steps; groups: the G values and one more seed of G = 1
    n_models = {"compare": 3, "ptq": 3, "scaling": 2, "lr": 2 * len(s.lrs), "groups": len(s.groups) + 1, "distill": 5,
                "activations": 3.2}[name]
    return max(10, int(minutes * 60 / (n_models * per)))


def _number_list(opt: str, text: str, typ: type) -> list:
    try:
        values = [typ(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{opt}: expected comma-separated {typ.__name__}s, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise ValueError(f"{opt}: values must be positive, got {text!r}")
    return values


def run(args) -> int:
    if args.name not in _RUNNERS:
        raise ValueError(f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}")
    over: dict[str, Any] = {"steps": args.steps, "limit": args.limit, "data": args.data, "vocab_size": args.vocab_size,
                            "teacher": args.teacher, "device": args.device}
    if args.device is not None:  # a one-line error naming --device before minutes of corpus preparation
        from .parallel import resolve_device

        resolve_device(args.device)
    if args.teacher and args.name != "distill":
        raise ValueError("--teacher applies to `bitlm experiment distill` only")
    if args.tasks:
        from .tasks import parse_task_list

        over["tasks"] = parse_task_list(args.tasks)
    for opt, v in (("--scale", args.scale), ("--steps", args.steps), ("--minutes", args.minutes)):
        if v is not None and v <= 0:
            raise ValueError(f"{opt} must be positive, got {v}")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    if args.lrs:
        over["lrs"] = _number_list("--lrs", args.lrs, float)
    if args.widths:
        over["widths"] = _number_list("--widths", args.widths, int)
    if getattr(args, "groups", None):
        over["groups"] = _number_list("--groups", args.groups, int)
    _plt()  # fail now, not after minutes of training, when matplotlib is missing
    setup = Setup.build(args.name, args.scale, args.quick, **over)
    if setup.teacher:  # before minutes of corpus preparation
        _check_teacher(setup.teacher, setup.vocab_size)
    from .data import prepare_data

    data = prepare_data(setup.data, vocab_size=setup.vocab_size)
    if args.minutes and args.steps is None:
        setup.steps = _fit_steps(args.name, setup, data, args.minutes)
    progress = not args.no_progress  # plain lines when not on a terminal (bitlm.data.common.progress)
    command = "bitlm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else None
    run_experiment(args.name, setup, args.out, progress=progress, data=data, command=command)
    return 0
