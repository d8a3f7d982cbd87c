"""Training: TrainConfig, the papers' recipes, the loop, checkpoints and bit-identical resume.

Recipes (training-anchors (a), (f.3)):

  * ``b1``    BitNet 2023 (2310.11453 App. A, Tables 5-6): linear warm-up (750 of 40K updates),
              polynomial (power 1) decay to 0, Adam β = (0.9, 0.98), weight decay 0.01
              (0.05 at 13B and 30B), no gradient clipping; peak LR per model size, 2.4e-3 (125M)
              down to 4e-4 (13B/30B).
  * ``b1.58`` BitNet b1.58 FAQ (Tables 1-2): two stages — linear warm-up (375 steps of ~100K)
              then linear decay from peak ``lr``; at the midpoint the peak drops to ``lr2`` and
              weight decay goes 0.1 → 0; Adam β = (0.9, 0.95); LR 1.5e-3 → 1e-3 (700M),
              1.2e-3 → 8e-4 (1.3B, 3B, 3.9B).  The visible loss drop at the switch is expected.
  * ``fp``    the FAQ's LLaMA baseline: LR 2.5e-4 (700M), 2e-4 (1.3B, 3B), weight decay 0.1,
              375 warm-up steps, Adam β = (0.9, 0.95); warm-up + cosine decay to 10 % of peak
              and clipping 1.0 (LLaMA practice: the FAQ does not give the baseline's schedule).

Size rows: every recipe has one row per paper model size (``RECIPE_ROWS``).  A run takes the row
nearest to its model by non-embedding parameter count on a log scale (the ratio closer to 1; ties
go to the smaller row), each row being represented by the count of the paper's own shape (the
config preset of that name).  So every paper preset gets exactly its paper row; a model between two
rows gets the row it is closer to by ratio; anything smaller than the smallest row (the CPU
presets tiny/small/base) gets the smallest row (b1: 125M, b1.58/fp: 700M) and anything larger the
largest.  Without a model (``resolved()`` alone) the smallest row is used.  Explicit ``lr``,
``lr2``, ``weight_decay``, ``weight_decay2`` and ``warmup_steps`` always override the row.

Warm-up: the paper's count (750 updates of 40K for b1, 375 steps of ~100K for b1.58 and fp) for a
run at least as long as the paper's; a shorter run warms up for the same fraction of its steps
(at least one step), so a 1000-step CPU run is not mostly warm-up.

Resume is bit-identical: every batch is a pure function of (seed, step, micro-step), the model
is initialised from the seed, and a checkpoint holds parameters, optimizer moments and the step;
the LR/WD schedule is a pure function of the step.

Nothing is lost when a run stops early: ``OUT/last`` is written every ``save_every`` steps and
every ``save_every_minutes`` of wall time (default 10), at the end, and when the loop is left
early — on SIGINT / SIGTERM the current optimizer step is finished, a checkpoint saved and
``TrainingInterrupted`` raised (``bitlm train`` exits 130 / 143); on an exception between steps
the last completed step is saved before the exception goes on.  A second signal stops at once
without saving.  ``kill -9`` loses only the steps since the last checkpoint: ``--resume``
continues from it bit-identically, and metrics.jsonl is cut back to that step.

Devices and data parallelism (``bitlm.parallel``): ``device`` / ``precision`` / ``compile`` place
the run; under torchrun ``parallel`` = ddp | fsdp wraps the model, ``batch_size`` is per rank and
micro-batch (global batch = batch_size × world size × grad_accum; ``global_batch`` sets
grad_accum), rank r's micro-batch m is data stream r·grad_accum + m (so 2 ranks equal 1 process
with grad_accum 2), rank 0 alone logs, the logged loss is the global-batch mean and validation
is reduced over ranks.  Signals, ``max_time`` and wall-time saves are agreed by all ranks.
Parallel runs save distributed checkpoints (``bitlm.io.dcp``), which resume on any world size
with the same world size × grad_accum.

Knowledge distillation (``teacher``; ``bitlm.distill``): each micro-batch's loss becomes
CE + kd_weight·τ²·KL(teacher ‖ student at τ) [+ kd_attention_weight·L_AD at
``kd_attention_layers``]; the frozen teacher is loaded on every rank, metrics.jsonl adds
``lm_loss`` / ``kd_loss`` / ``ad_loss`` (global-batch means) and the checkpoint's metadata the
KD settings (``train``) and the teacher's shape (``teacher``); resume requires the same teacher
and KD settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import ModelConfig, build_config, parse_overrides, preset
from .model import BitNetModel
from .tensor_parallel import tp_quant_mode

RECIPES: dict[str, dict[str, Any]] = {
    # size-independent parts; lr, lr2 and weight_decay come from the size row (RECIPE_ROWS)
    "b1": dict(schedule="poly", betas=(0.9, 0.98), weight_decay2=None, grad_clip=0.0,
               warmup=750, paper_steps=40_000, source="2310.11453 App. A"),
    "b1.58": dict(schedule="two-stage", betas=(0.9, 0.95), weight_decay2=0.0, grad_clip=0.0,
                  warmup=375, paper_steps=100_000, source="b1.58 FAQ Table 2"),
    "fp": dict(schedule="cosine", betas=(0.9, 0.95), weight_decay2=None, grad_clip=1.0,
               warmup=375, paper_steps=100_000, source="b1.58 FAQ Table 2, LLaMA baseline"),
}

#: Per-size rows: (size label, config preset with the paper's shape, peak lr, stage-2 lr, weight decay).
#: b1: 2310.11453 Table 5 LRs, Table 6 weight decay (0.05 at 13B/30B "for training stability").
#: b1.58: FAQ Table 2 (3B and 3.9B share the 1.3B values).  fp: the FAQ's LLaMA baselines (the
#: table gives no 3.9B baseline).  b1.58 paper steps: 100B tokens at 1M tokens per batch.
RECIPE_ROWS: dict[str, list[tuple[str, str, float, float | None, float]]] = {
    "b1": [
        ("125M", "bitnet-125m", 2.4e-3, None, 0.01), ("350M", "bitnet-350m", 1.2e-3, None, 0.01),
        ("760M", "bitnet-760m", 1.0e-3, None, 0.01), ("1.3B", "bitnet-1.3b", 8.0e-4, None, 0.01),
        ("2.7B", "bitnet-2.7b", 6.4e-4, None, 0.01), ("6.7B", "bitnet-6.7b", 4.8e-4, None, 0.01),
        ("13B", "bitnet-13b", 4.0e-4, None, 0.05), ("30B", "bitnet-30b", 4.0e-4, None, 0.05),
    ],
    "b1.58": [
        ("700M", "b1.58-700m", 1.5e-3, 1.0e-3, 0.1), ("1.3B", "b1.58-1.3b", 1.2e-3, 8.0e-4, 0.1),
        ("3B", "b1.58-3b", 1.2e-3, 8.0e-4, 0.1), ("3.9B", "b1.58-3.9b", 1.2e-3, 8.0e-4, 0.1),
    ],
    "fp": [
        ("700M", "b1.58-700m", 2.5e-4, None, 0.1), ("1.3B", "b1.58-1.3b", 2.0e-4, None, 0.1),
        ("3B", "b1.58-3b", 2.0e-4, None, 0.1),
    ],
}


def recipe_row(recipe: str, model: ModelConfig | None = None) -> dict[str, Any]:
    """The size row of ``recipe`` for ``model`` (module docstring: nearest by non-embedding
    parameter count on a log scale; no model → the smallest row)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    rows = RECIPE_ROWS[recipe]
    best = rows[0]
    if model is not None:
        n = model.linear_params
        best = min(rows, key=lambda r: abs(math.log(n / preset(r[1]).linear_params)))  # min keeps the first on ties
    size, _preset, lr, lr2, wd = best
    return dict(size=size, lr=lr, lr2=lr2, weight_decay=wd)


def _sci(x: float) -> str:
    return f"{x:.1e}".replace("e-0", "e-")  # 2.4e-3, as the papers write it


def recipe_table() -> str:
    """One line per recipe with its size rows (for ``bitlm train --help``)."""
    lines = []
    for name, rows in RECIPE_ROWS.items():
        cells = ", ".join(f"{s} {_sci(lr)}" + (f" → {_sci(lr2)}" if lr2 else "") for s, _p, lr, lr2, _wd in rows)
        lines.append(f"{name} ({RECIPES[name]['source']}): {cells}")
    return "; ".join(lines)


@dataclass
class TrainConfig:
    recipe: str = "b1.58"
    lr: float | None = None  # peak LR (stage 1); None = the recipe's
    lr2: float | None = None  # stage-2 peak LR (b1.58 only)
    weight_decay: float | None = None
    weight_decay2: float | None = None
    warmup_steps: int | None = None  # None = recipe fraction of max_steps
    max_steps: int = 1000
    tokens: int | None = None  # token budget; overrides max_steps when set
    max_time: float | None = None  # seconds; stop (and checkpoint) when exceeded
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    grad_clip: float | None = None
    adam_eps: float = 1e-8
    bf16: bool = False  # the old spelling of precision="bf16"
    precision: str | None = None  # fp32 | bf16; None = bf16 on CUDA, fp32 elsewhere
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | mps
    compile: bool = False  # torch.compile each transformer block
    # data parallelism on torchrun (bitlm.parallel): batch_size is per rank and micro-batch, so the
    # global batch is batch_size × world size × grad_accum sequences
    parallel: str = "none"  # none | ddp | fsdp
    # tensor parallelism (bitlm.tensor_parallel): tp ranks share each batch; world = dp × tp.
    # tp_quant: "group" turns the model config into the paper's group mode (G = tp groups, no
    # communication for scales); "global" requires a config without groups (exact parity with one
    # process, one all-reduce per scale); None = the model config as it is
    tp: int = 1
    tp_quant: str | None = None
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | gloo | nccl
    dist_timeout: float = 600.0  # seconds a collective may wait for a dead or stuck rank
    global_batch: int | None = None  # sequences per optimizer step; sets grad_accum = global / (batch_size × world)
    checkpoint_format: str = "auto"  # native | dcp (torch.distributed.checkpoint); auto = dcp for --parallel runs
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = none by step count
    save_every_minutes: float = 10.0  # wall time between checkpoints; 0 = none by time
    data: str = "default"
    tokenizer: str | None = None  # tokenizer.json / HF folder; None = train a BPE on the corpus
    vocab_size: int | None = None  # BPE size when training a tokenizer; None = model vocab_size
    out_dir: str = "runs/train"
    progress: bool = True
    # warm-up quantisation (HF "Fine-tuning LLMs to 1.58bit"): λ ramps 0 → 1 over the first
    # quant_warmup_steps steps; "linear", "exponential[:k]", "sigmoid[:k]" or "none" (bitlm.convert)
    quant_warmup: str = "none"
    quant_warmup_steps: int = 0
    # LoRA (bitlm.lora): rank > 0 trains only adapters on the frozen model, saved beside it in OUT/last
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_dropout: float = 0.0
    # knowledge distillation (bitlm.distill): L = CE + kd_weight·τ²·KL(teacher‖student at τ) + kd_attention_weight·L_AD
    teacher: str | None = None  # any model bitlm.load reads; None = no distillation
    teacher_dtype: str = "fp32"  # fp32 | bf16
    kd_weight: float = 1.0
    kd_temperature: float = 5.0
    kd_attention_layers: list[int] | None = None  # attention-relation distillation at these layers (-1 = last)
    kd_attention_weight: float = 1e3

    def resolved(self, model: ModelConfig | None = None) -> dict[str, Any]:
        """Recipe defaults filled in for ``model``'s size row: the values the run really uses."""
        row = recipe_row(self.recipe, model)
        r = RECIPES[self.recipe]
        lr = self.lr if self.lr is not None else row["lr"]
        if self.lr2 is not None or row["lr2"] is None:
            lr2 = self.lr2
        else:  # keep the row's stage-2 / stage-1 ratio (FAQ: 1.5e-3 -> 1e-3) for a custom peak
            lr2 = row["lr2"] * lr / row["lr"]
        out = dict(
            schedule=r["schedule"], lr=lr, lr2=lr2, betas=r["betas"],
            weight_decay=self.weight_decay if self.weight_decay is not None else row["weight_decay"],
            weight_decay2=self.weight_decay2 if self.weight_decay2 is not None else r["weight_decay2"],
            grad_clip=self.grad_clip if self.grad_clip is not None else r["grad_clip"],
            max_steps=self.total_steps(), row=f"{self.recipe} {row['size']} ({r['source']})",
        )
        if self.warmup_steps is not None:
            out["warmup_steps"] = self.warmup_steps
        else:  # the paper's count, or the paper's fraction of a shorter run
            out["warmup_steps"] = max(1, round(r["warmup"] * min(1.0, out["max_steps"] / r["paper_steps"])))
        return out

    def total_steps(self) -> int:
        if self.tokens:
            if self.global_batch:
                return max(1, math.ceil(self.tokens / (self.global_batch * self.seq_len)))
            from .parallel import torchrun_env

            world = (torchrun_env() or {"world": 1})["world"] // self.tp if self.parallel != "none" else 1
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len * self.grad_accum * world)))
        return self.max_steps

    def validate(self) -> None:
        self.resolved()
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        from .parallel import BACKENDS, DEVICES, PARALLEL, PRECISIONS

        for opt, value, allowed in (("--device", self.device, DEVICES), ("--parallel", self.parallel, PARALLEL),
                                    ("--dist-backend", self.dist_backend, BACKENDS),
                                    ("--checkpoint-format", self.checkpoint_format, ("auto", "native", "dcp"))):
            if value not in allowed:
                raise ValueError(f"{opt} {value!r}: choose one of {', '.join(allowed)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.tp_quant not in (None, "group", "global"):
            raise ValueError(f"--tp-quant {self.tp_quant!r}: choose one of group, global")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"--global-batch must be >= 1, got {self.global_batch}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.teacher is not None:
            from .distill import TEACHER_DTYPES

            if self.teacher_dtype not in TEACHER_DTYPES:
                raise ValueError(f"--teacher-dtype {self.teacher_dtype!r}: choose one of {', '.join(TEACHER_DTYPES)}")
            if not self.kd_temperature > 0:
                raise ValueError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
            if not (self.kd_weight >= 0 and self.kd_attention_weight >= 0):
                raise ValueError(f"--kd-weight / --kd-attention-weight must be >= 0, got {self.kd_weight}, "
                                 f"{self.kd_attention_weight}")
        elif self.kd_attention_layers:
            raise ValueError("--kd-attention-layer needs --teacher")
        if self.quant_warmup != "none":
            from .layers import lambda_schedule

            lambda_schedule(self.quant_warmup, 0, self.quant_warmup_steps)  # raises on a bad name / k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the step
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, r: dict[str, Any]) -> float:
    """Learning rate for optimizer step ``step`` (0-based) under resolved recipe ``r``."""
    total, warm = r["max_steps"], r["warmup_steps"]
    if step < warm:
        return r["lr"] * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)  # 0 → 1 over the decay phase
    if r["schedule"] == "poly":
        return r["lr"] * (1.0 - frac)
    if r["schedule"] == "cosine":
        return r["lr"] * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    # two-stage (b1.58): linear decay, peak lr before the midpoint, peak lr2 after
    peak = r["lr"] if step < total // 2 else r["lr2"]
    return peak * (1.0 - frac)


def weight_decay_at(step: int, r: dict[str, Any]) -> float:
    if r["weight_decay2"] is not None and step >= r["max_steps"] // 2:
        return r["weight_decay2"]
    return r["weight_decay"]


def make_optimizer(model: torch.nn.Module, r: dict[str, Any], adam_eps: float) -> torch.optim.Optimizer:
    """AdamW; decay on matrices (weights, embeddings), none on norms and biases."""
    decay, no_decay = [], []
    seen = set()
    for _name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": r["weight_decay"], "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]
    return torch.optim.AdamW(groups, lr=r["lr"], betas=tuple(r["betas"]), eps=adam_eps)


def set_schedule(opt: torch.optim.Optimizer, step: int, r: dict[str, Any]) -> tuple[float, float]:
    lr, wd = lr_at(step, r), weight_decay_at(step, r)
    for g in opt.param_groups:
        g["lr"] = lr
        if g.get("decay"):
            g["weight_decay"] = wd
    return lr, wd


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, bf16: bool = False, device_type: str = "cpu") -> torch.Tensor:
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def time_train_step(model_cfg: ModelConfig, data, batch_size: int, seq_len: int, steps: int = 3,
                    device: str | None = None) -> float:
    """Seconds of one training step (forward, backward, AdamW) of a fresh ``model_cfg`` model:
    the best of ``steps`` after one warm-up step.  Used to size runs to a time budget.  ``device``
    (``bitlm.parallel`` names; default the CPU): where the step runs, fp32."""
    from .parallel import resolve_device, setup_training_process, to_device

    setup_training_process()  # as train() runs
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    torch.manual_seed(0)
    model = BitNetModel(model_cfg).train().to(dev)
    opt = make_optimizer(model, TrainConfig(recipe="fp").resolved(), 1e-8)
    times = []
    for step in range(steps + 1):
        x, y = data.batch(step, batch_size, seq_len, seed=999)
        x, y = to_device(x, dev), to_device(y, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        lm_loss(model, x, y, device_type=dev.type).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


@torch.no_grad()
def evaluate_loss(model, batches, bf16: bool = False, device=None, dist=None) -> dict[str, float]:
    """Mean token loss (nats) and perplexity over an iterable of (x, y) batches.

    ``device``: where the model is (batches are moved there).  ``dist`` (a ``bitlm.parallel.Dist``
    of a data-parallel run): each rank scores its share of every batch's rows and the sums are
    all-reduced, so every rank returns the loss over the whole validation set.  Every rank runs
    one forward per batch (FSDP needs them all in each forward): a rank whose share is empty
    scores one row with weight 0."""
    from .parallel import all_reduce_sum, to_device

    device = torch.device(device) if device is not None else None
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        weight = 1.0
        if dist is not None and dist.distributed:
            x, y = torch.tensor_split(x, dist.dp_world)[dist.dp_rank], torch.tensor_split(y, dist.dp_world)[dist.dp_rank]
            if x.shape[0] == 0:
                x, y, weight = x.new_zeros((1, x.shape[1])), y.new_zeros((1, y.shape[1])), 0.0
        if device is not None:
            x, y = to_device(x, device), to_device(y, device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        total += weight * F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                          reduction="sum").item()
        n += int(weight) * y.numel()
    if dist is not None:
        total, n = all_reduce_sum([total, float(n)], dist)
        total, n = total / dist.tp, int(n) // dist.tp  # the ranks of a tp group scored the same rows
    model.train(was)
    loss = total / max(1, n)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM after finishing a step and saving ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}")


class TrainingAborted(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: training stopped at once, the step in progress not saved."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"second {signal.Signals(signum).name}: stopped without saving the step in progress")


class PeerLost(ConnectionError):
    """A collective failed because another rank of a distributed run died or stopped answering;
    the message (already printed to stderr by the rank that saw it) names the checkpoint to resume."""


class _StopSignals:
    """SIGINT / SIGTERM handlers for the loop: the first signal only sets ``signum`` (the loop
    finishes its step and saves); a second one raises TrainingAborted at once.  Installed only
    in the main thread (Python allows handlers nowhere else); the old handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.forced = True
            raise TrainingAborted(signum)
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


_clock = time.monotonic  # wall clock of save_every_minutes (tests replace it)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics rows past ``step`` (steps a killed run did after its last checkpoint, which
    the resumed run does again) and a torn last line; rewritten atomically."""
    from .io.atomic import atomic_write_text

    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


@dataclass
class TrainResult:
    model: BitNetModel
    step: int
    val: dict[str, float] | None
    out_dir: Path
    seconds: float
    tokens: int


def train(
    model_cfg: ModelConfig,
    tcfg: TrainConfig,
    data=None,
    *,
    resume: bool = False,
    init_model: BitNetModel | None = None,
    log=print,
) -> TrainResult:
    """Train ``model_cfg`` under ``tcfg``; ``data`` is a ``bitlm.data.TokenData`` (built from
    ``tcfg.data`` when None).  With ``resume`` the run continues from ``out_dir/last``.

    Under torchrun with ``tcfg.parallel`` ddp / fsdp every rank calls this: rank r's micro-batch m
    is data stream ``r × grad_accum + m``, the same streams one process with
    ``grad_accum × world`` draws, so runs compare across world sizes; rank 0 alone logs, writes
    metrics and shows progress."""
    from . import parallel as P
    from .data.common import progress
    from .io.checkpoint import (
        CheckpointError,
        load_checkpoint,
        read_meta,
        save_checkpoint,
        verify_checksums,
        verify_enabled,
    )
    from .io.dcp import is_dcp, load_dcp, read_dcp_meta, save_dcp

    tcfg.validate()
    model_cfg = tp_model_config(model_cfg, tcfg)
    P.setup_training_process()
    d = P.init_distributed(tcfg.device, tcfg.parallel, tcfg.dist_backend, tcfg.dist_timeout, tcfg.tp)
    try:
        return _train(model_cfg, tcfg, data, d, resume=resume, init_model=init_model, log=log, progress=progress, P=P,
                      ck=dict(CheckpointError=CheckpointError, load_checkpoint=load_checkpoint, read_meta=read_meta,
                              save_checkpoint=save_checkpoint, verify_checksums=verify_checksums,
                              verify_enabled=verify_enabled, is_dcp=is_dcp, load_dcp=load_dcp,
                              read_dcp_meta=read_dcp_meta, save_dcp=save_dcp))
    finally:
        d.close()


def tp_model_config(model_cfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
    """The model config a ``--tp`` run trains: ``--tp-quant group`` → the paper's group mode for
    ``tcfg.tp`` ranks; ``global`` refuses a config with groups (it would not be global).  Raises
    ValueError naming ``--tp`` when the degree does not divide heads, KV heads, FFN width or vocab."""
    from .tensor_parallel import check_tp, group_config

    if tcfg.tp_quant == "group":
        model_cfg = group_config(model_cfg, tcfg.tp)
    elif tcfg.tp_quant == "global":
        grouped = {k: getattr(model_cfg, k) for k in ("weight_groups", "act_groups", "norm_groups")
                   if getattr(model_cfg, k) != 1}
        if grouped:
            k, v = next(iter(grouped.items()))
            raise ValueError(f"--tp-quant global: the model config has {k}={v}; drop the groups or use --tp-quant group")
    if tcfg.tp > 1:
        check_tp(model_cfg, tcfg.tp)
    return model_cfg


def _grad_accum(tcfg: TrainConfig, world: int) -> int:
    """Micro-batches per rank and step: ``grad_accum``, or what ``global_batch`` asks for."""
    if tcfg.global_batch is None:
        return tcfg.grad_accum
    per = tcfg.batch_size * world
    if tcfg.global_batch % per:
        raise ValueError(f"--global-batch {tcfg.global_batch} is not a multiple of --batch-size {tcfg.batch_size} "
                         f"× world size {world} = {per}")
    return tcfg.global_batch // per


def _train(model_cfg, tcfg, data, d, *, resume, init_model, log, progress, P, ck) -> TrainResult:
    CheckpointError = ck["CheckpointError"]
    main = d.main
    if not main:
        log = _silent
    ga = _grad_accum(tcfg, d.dp_world)
    precision = P.resolve_precision("bf16" if tcfg.bf16 else tcfg.precision, d.device)
    bf16 = precision == "bf16"
    dcp_format = tcfg.checkpoint_format == "dcp" or (tcfg.checkpoint_format == "auto" and d.distributed)
    if d.distributed and not dcp_format:
        raise ValueError("--checkpoint-format native: a --parallel run saves distributed checkpoints (dcp); "
                         "`bitlm checkpoint consolidate` makes a native one")
    if d.distributed and tcfg.lora_rank:
        raise ValueError("--lora-rank with --parallel: LoRA fine-tuning runs in one process")
    r = tcfg.resolved(model_cfg)
    lrs = _sci(r["lr"]) + (f" → {_sci(r['lr2'])}" if r["lr2"] is not None else "")
    wds = f"{r['weight_decay']:g}" + (f" → {r['weight_decay2']:g}" if r["weight_decay2"] is not None else "")
    log(f"recipe {r['row']}: lr {lrs}, weight decay {wds}, warm-up {r['warmup_steps']} of {r['max_steps']} steps")
    if d.distributed or d.device.type != "cpu" or tcfg.compile:
        tp_text = f", tensor parallel × {d.tp} ({tp_quant_mode(model_cfg, d.tp)} scales)" if d.tp > 1 else ""
        log(f"device {d.device}, {precision}, {tcfg.parallel} × {d.dp_world} ranks{tp_text} ({d.backend or 'one process'}), "
            f"global batch {tcfg.batch_size} × {d.dp_world} × {ga} = {tcfg.batch_size * d.dp_world * ga} sequences"
            + (", torch.compile per block" if tcfg.compile else ""))
    out = Path(tcfg.out_dir)
    last = out / "last"
    if data is None:
        from .data import is_shard_dir, load_shards, prepare_data

        if is_shard_dir(tcfg.data):  # bitlm data prepare: memory-mapped shards, each rank reads its slice
            if tcfg.tokenizer is not None:
                raise ValueError(f"--tokenizer: the shards in {tcfg.data} carry their own tokenizer; drop --tokenizer")
            data = load_shards(tcfg.data)
        else:
            data = prepare_data(tcfg.data, tokenizer=tcfg.tokenizer, vocab_size=tcfg.vocab_size or model_cfg.vocab_size)
    if hasattr(data, "streams"):  # sharded data: one slice of the training tokens per data stream
        data.streams = ga * d.dp_world
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {data.tokenizer.vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}")
    if tcfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={tcfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")

    torch.manual_seed(tcfg.seed)
    start = 0
    opt_state = None
    resume_dcp = resume and ck["is_dcp"](last)
    if resume:
        meta = ck["read_dcp_meta"](last) if resume_dcp else ck["read_meta"](last)
        saved_model = ModelConfig.from_dict(meta["model"])
        if saved_model != model_cfg:
            diff = [k for k in model_cfg.to_dict() if model_cfg.to_dict()[k] != saved_model.to_dict()[k]]
            raise CheckpointError(f"{last}: model config mismatch on resume (field {diff[0]!r}: "
                                  f"checkpoint {saved_model.to_dict()[diff[0]]!r}, now {model_cfg.to_dict()[diff[0]]!r})")
        saved_train = meta.get("train") or {}
        for key in ("recipe", "batch_size", "seq_len", "seed", "data", "quant_warmup", "quant_warmup_steps",
                    "lora_rank", "lora_alpha", "lora_targets", "teacher", "kd_weight", "kd_temperature",
                    "kd_attention_layers", "kd_attention_weight"):
            if key in saved_train and saved_train[key] != getattr(tcfg, key):
                raise CheckpointError(f"{last}: train config mismatch on resume (field {key!r}: "
                                      f"checkpoint {saved_train[key]!r}, now {getattr(tcfg, key)!r})")
        # the data streams of a step: world size × grad_accum must match (2 ranks × 1 = 1 process × 2)
        saved_streams = int(saved_train.get("grad_accum", ga)) * int(meta.get("dp", meta.get("world_size", 1)))
        if "grad_accum" in saved_train and saved_streams != ga * d.dp_world:
            raise CheckpointError(f"{last}: global batch mismatch on resume: the checkpoint's run drew "
                                  f"{saved_streams} micro-batches per step (world size × grad_accum), this one "
                                  f"{ga * d.dp_world}; set --grad-accum so that they match")
        if resume_dcp:
            model = init_model if init_model is not None else BitNetModel(model_cfg)
            start = int(meta["step"])
        else:
            if d.distributed:
                raise CheckpointError(f"{last}: a native checkpoint cannot resume a --parallel run; run the "
                                      "one-process run with --checkpoint-format dcp to resume it on several ranks")
            model, meta = ck["load_checkpoint"](last)
            start = int(meta["step"])
            opt_file = last / "optimizer.pt"
            if not opt_file.is_file():
                raise CheckpointError(f"{opt_file}: missing (cannot resume without optimizer state)")
            if ck["verify_enabled"]():
                ck["verify_checksums"](last, meta, ["optimizer.pt"])
            try:
                opt_state = torch.load(opt_file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - whatever unpickling a damaged file raises (IndexError, EOFError, ...)
                raise CheckpointError(f"{opt_file}: corrupt or truncated, not a torch optimizer state ({type(e).__name__}); "
                                      "restore it or start again without --resume") from None
    elif init_model is not None:
        model = init_model
    else:
        model = BitNetModel(model_cfg)
    if tcfg.lora_rank:  # frozen base + trainable adapters; on resume the adapters are read from `last`
        from .lora import prepare_lora_training

        model = prepare_lora_training(model, tcfg, last if resume else None)
    model.to(d.device)
    model.train()
    base = model
    P.apply_tensor_parallel(base, d)  # TP first, then compile, then FSDP2 (torchtitan's order)
    if tcfg.compile:
        P.compile_blocks(base)
    model = P.wrap_model(base, d, precision)
    opt = make_optimizer(model, r, tcfg.adam_eps)
    distiller = None
    if tcfg.teacher is not None:  # every rank loads its own frozen replica (bitlm.distill)
        from .distill import Distiller, load_teacher

        distiller = Distiller(load_teacher(tcfg.teacher, tcfg.teacher_dtype, d.device), base,
                              weight=tcfg.kd_weight, temperature=tcfg.kd_temperature,
                              attention_layers=tcfg.kd_attention_layers or (),
                              attention_weight=tcfg.kd_attention_weight, teacher_path=tcfg.teacher)
        log(f"distilling from {tcfg.teacher}: kd weight {tcfg.kd_weight:g}, temperature {tcfg.kd_temperature:g}"
            + (f", attention relations at layer(s) {tcfg.kd_attention_layers} × {tcfg.kd_attention_weight:g}"
               if tcfg.kd_attention_layers else ""))
    if resume_dcp:
        ck["load_dcp"](model, opt, last)
    if opt_state is not None:
        try:
            opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError) as e:  # another model's (or a damaged) optimizer state
            raise CheckpointError(f"{last / 'optimizer.pt'}: does not fit the model ({e}); "
                                  "restore it or start again without --resume") from None

    train_meta = {**tcfg.to_dict(), "grad_accum": ga}
    metrics = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        if not resume and metrics_path.exists():
            metrics_path.unlink()
        if resume:
            _trim_metrics(metrics_path, start)
        metrics = open(metrics_path, "a")

    def record(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    saved_step = start if resume else -1  # the step that OUT/last holds (-1: none written by this run)
    saving = False
    recipe_meta = {"recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}}
    if distiller is not None:  # what the teacher was, beside its path and the KD settings in "train"
        recipe_meta["teacher"] = distiller.describe()

    def save(step: int) -> None:
        nonlocal saved_step, saved_at, saving
        saving = True
        if dcp_format:
            ck["save_dcp"](model, opt, last, {"model": model_cfg.to_dict(), "train": train_meta, "step": step,
                                             "world_size": d.world, "parallel": tcfg.parallel, "dp": d.dp_world,
                                             "tp": d.tp, "tp_quant": tp_quant_mode(model_cfg, d.tp), **recipe_meta},
                           tokenizer=data.tokenizer)
        else:
            from .io import checkpoint as C

            saver = C.save_checkpoint
            if tcfg.lora_rank:  # the base as a native checkpoint + adapter.safetensors, one atomic folder
                from .lora import save_lora_checkpoint as saver
            saver(base, last, optimizer_state=opt.state_dict(), train_config=train_meta, step=step,
                  tokenizer=data.tokenizer, extra=recipe_meta)
        saving = False
        saved_step, saved_at = step, _clock()

    total = r["max_steps"]
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * ga * d.dp_world
    t0 = time.time()
    val = None
    step = start
    bar = progress(total=total, initial=start, enabled=tcfg.progress and main, desc=f"train {model_cfg.quant}",
                   unit="step")
    loss_ema = None
    saved_at = _clock()
    save_secs = 60.0 * tcfg.save_every_minutes if tcfg.save_every_minutes and tcfg.save_every_minutes > 0 else 0.0
    in_update = False  # inside opt.step(): the parameters may be half-updated, never save them
    stop = _StopSignals()
    stopped_by = None
    try:
        stop.install()
        while step < total:
            # every rank takes these decisions together (a signal may reach one rank only)
            sig, over = P.agree([float(stop.signum or 0),
                                 float(tcfg.max_time is not None and time.time() - t0 > tcfg.max_time)], d)
            if sig:
                stopped_by = int(sig)
                break
            if over:
                log(f"stopping at step {step}: --max-time {tcfg.max_time:.0f}s reached")
                break
            lr, wd = set_schedule(opt, step, r)
            lam = None
            if tcfg.quant_warmup != "none":  # λ is a pure function of the step: resume stays bit-identical
                from .layers import lambda_schedule, set_quant_lambda

                lam = lambda_schedule(tcfg.quant_warmup, step, tcfg.quant_warmup_steps)
                set_quant_lambda(base, lam)
            loss_sum = 0.0
            kd_sums: dict[str, float] = {}
            for micro in range(ga):
                # micro-batch m of rank r is data stream r·ga + m: grad accumulation over k
                # micro-batches equals k ranks with the same global batch
                x, y = data.batch(step, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed, rank=d.dp_rank * ga + micro)
                x, y = P.to_device(x, d.device), P.to_device(y, d.device)
                with P.no_grad_sync(model, d, sync=micro == ga - 1):
                    if distiller is None:
                        loss = lm_loss(model, x, y, bf16, d.device.type)
                    else:
                        loss, parts = distiller.loss(model, x, y, bf16, d.device.type)
                        for k, v in parts.items():
                            kd_sums[k] = kd_sums.get(k, 0.0) + v / ga
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step} (diverged; lower the LR)")
                    (loss / ga).backward()
                loss_sum += loss.item() / ga
            loss_sum = P.all_reduce_mean(loss_sum, d)  # the mean over the global batch
            kd_sums = {k: P.all_reduce_mean(v, d) for k, v in kd_sums.items()}
            gnorm = None
            if r["grad_clip"] and r["grad_clip"] > 0:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
                gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            in_update = True
            opt.step()
            in_update = False
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_ema = loss_sum if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_sum
            elapsed = time.time() - t0
            tps = (step - start) * tokens_per_step / max(elapsed, 1e-9)
            bar.set_postfix(**{"loss": f"{loss_ema:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"})
            bar.update(1)
            if step % tcfg.log_every == 0 or step == total:
                record({"step": step, "loss": loss_sum, "lr": lr, "wd": wd, "grad_norm": gnorm,
                        "tokens": step * tokens_per_step, "tok_per_s": tps, "time": elapsed,
                        **({"quant_lambda": lam} if lam is not None else {}), **kd_sums})
            if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == total):
                val = evaluate_loss(model, data.val_batches(tcfg.batch_size, tcfg.seq_len, max_batches=tcfg.eval_batches),
                                    bf16, device=d.device, dist=d)
                record({"step": step, "val_loss": val["loss"], "val_ppl": val["ppl"], "time": time.time() - t0})
                if main:
                    bar.write(f"step {step}: val loss {val['loss']:.4f}, ppl {val['ppl']:.2f}")
            if step < total:
                (due,) = P.agree([float(bool((tcfg.save_every and step % tcfg.save_every == 0)
                                             or (save_secs and _clock() - saved_at >= save_secs)))], d)
                if due:
                    save(step)
        if stopped_by is not None and step < total:
            if saved_step != step:
                save(step)
            raise TrainingInterrupted(stopped_by, step, last)
        save(step)
    except BaseException as e:
        # left between steps (an error, a KeyboardInterrupt raised by other code): the model and
        # optimizer hold the last completed step, keep it; not after a second signal (the user
        # wants out now), not mid-update, not when saving is what failed, and not in a
        # data-parallel run (saving is a collective the other ranks are not in)
        if (not stop.forced and not in_update and not saving and not isinstance(e, TrainingInterrupted)
                and step > max(saved_step, 0) and not d.distributed):
            try:
                save(step)
                log(f"{type(e).__name__} at step {step}: saved a checkpoint of the {step} completed steps to {last}")
            except Exception as save_error:  # the original exception is the one to report
                log(f"could not save a checkpoint after {type(e).__name__}: {save_error}")
        if d.distributed and _is_peer_failure(e):  # not a bug of this rank: say what happened, and what now
            held = f"{last} (step {saved_step})" if saved_step >= 0 else "no checkpoint of this run"
            lost = PeerLost(f"rank {d.rank}: lost contact with another rank of the run at step {step} (it died "
                            f"or hangs: {_first_line(e)}); the last complete checkpoint is {held}; "
                            "continue with --resume")
            # said now, while the stop handlers still hold off the launcher's SIGTERM (torchrun stops
            # the survivors as soon as it sees a rank die: after `finally` this process may not get
            # to print anything)
            print(f"bitlm train: error: {lost}", file=sys.stderr, flush=True)
            raise lost from e
        raise
    finally:
        stop.restore()
        bar.close()
        if distiller is not None:
            distiller.close()
        if metrics is not None:
            metrics.close()
    return TrainResult(base, step, val, out, time.time() - t0, (step - start) * tokens_per_step)


def _silent(*a, **k) -> None:
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering (gloo / nccl
    connection errors, the process group's timeout), not an error of this rank's own."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())) or isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "Connection reset by peer", "Connection closed by peer", "gloo", "NCCL", "timed out", "Timed out"))


# ---------------------------------------------------------------------------------------------
# CLI: bitlm train
# ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--preset", default="small", help="model preset (see bitlm.config.PRESETS)")
    p.add_argument("--config", default=None, help="JSON file with model (and optional 'train') fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="model config override, e.g. --set quant=b1 (repeatable); paper options: "
                        "act_granularity=tensor|token (training; default per tensor for b1, per token otherwise), "
                        "act_granularity_eval, weight_groups, weight_group_dim=out|in|parallel, act_groups, "
                        "norm_groups, act_nonneg (see bitlm.config.ModelConfig)")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="K=V",
                   help="train config override, e.g. --train-set lr2=5e-4 (repeatable)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="training recipe (b1: BitNet 2310.11453 App. A; b1.58: the b1.58 FAQ's two-stage LR/WD; "
                        "fp: the FAQ's LLaMA baseline); default: the model's quant")
    p.add_argument("--data", default="default", help="'default' (bundled corpus), a .txt/.jsonl/.parquet path, or hf:NAME")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--max-time", type=float, default=None, help="seconds")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (stage 1). Default: the recipe's row for the model's size, the nearest "
                        "paper size by non-embedding parameter count (smaller models: the smallest row) — "
                        + recipe_table().replace("%", "%%")
                        + ". b1.58 keeps the row's stage-2/stage-1 ratio for a custom --lr (--train-set lr2=... "
                        "to set it). Warm-up: 750 (b1) / 375 (b1.58, fp) steps, or that fraction of a shorter run; "
                        "weight decay: b1 0.01 (0.05 at 13B/30B), b1.58 0.1 → 0 at the midpoint, fp 0.1 "
                        "(--train-set warmup_steps=/weight_decay=/weight_decay2= to override). "
                        "The chosen row is printed when training starts")
    p.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16 autocast on the device's type, or fp32 (default: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--device", default=None, help="auto (CUDA when available; the default) | cpu | cuda | mps")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--parallel", default=None,
                   help="data parallelism under torchrun: none (default) | ddp | fsdp (FSDP2 fully_shard per block)")
    p.add_argument("--nproc", type=int, default=None,
                   help="run N processes on this machine: execs torchrun --nproc-per-node N -m bitlm train ... "
                        "(default --parallel ddp)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor parallelism degree under torchrun (world = dp × tp; composes with --parallel fsdp)")
    p.add_argument("--tp-quant", default=None, choices=["group", "global"],
                   help="scales under --tp: group = the BitNet paper's G = tp groups (no communication; the model "
                        "config changes, one process runs it exactly), global = whole-tensor scales (one "
                        "all-reduce each); default: the model config as it is")
    p.add_argument("--dist-backend", default=None, help="auto (nccl on CUDA, gloo on the CPU) | gloo | nccl")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a collective waits for the other ranks before the run fails (default 600)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step: grad_accum = global / (batch size × world size)")
    p.add_argument("--checkpoint-format", default=None,
                   help="native | dcp (torch.distributed.checkpoint, one shard per rank); default dcp for --parallel")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint OUT/last every N steps (default 0: off)")
    p.add_argument("--save-every-minutes", type=float, default=None,
                   help="checkpoint OUT/last every M minutes of wall time (default 10; 0: off)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--init-from", default=None, help="start from any model bitlm.load() reads")
    p.add_argument("--act-variant", default=None, metavar="VARIANT",
                   help="activation variant (bitlm.config.ACT_VARIANTS): a8 | a4.8 | v2-a8 | v2-a4; with "
                        "--init-from, the papers' recipe: continue an 8-bit checkpoint with 4-bit activations "
                        "(weights copied, optimizer fresh)")
    p.add_argument("--lora-rank", type=int, default=None, help="train only rank-R LoRA adapters on the frozen model")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (adapter output × alpha/rank)")
    p.add_argument("--teacher", default=None,
                   help="knowledge distillation from this model (anything bitlm.load reads: an fp bitlm checkpoint, "
                        "a Hugging Face Llama-family folder, GGUF); its vocabulary must be the student's. "
                        "Loss: CE + W·τ²·KL(teacher ‖ student at temperature τ) (bitlm.distill, BitDistill Eq. 13)")
    p.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default=None, help="the teacher's dtype (default fp32)")
    p.add_argument("--kd-weight", type=float, default=None, help="λ of the logit-distillation term (default 1.0)")
    p.add_argument("--kd-temperature", type=float, default=None, help="softmax temperature τ (default 5.0, BitDistill's)")
    p.add_argument("--kd-attention-layer", type=int, action="append", default=None, metavar="L",
                   help="add BitDistill's attention-relation distillation (Q, K, V relations) at layer L "
                        "(-1 = the last; repeatable; the paper recommends one late layer)")
    p.add_argument("--kd-attention-weight", type=float, default=None,
                   help="γ of the attention-relation term (default 1e3; BitDistill uses 1e5 for classification)")
    p.add_argument("--no-progress", action="store_true")


def _with_act_variant(cfg: ModelConfig, variant: str) -> ModelConfig:
    from .config import ConfigError

    try:
        return cfg.replace(act_variant=variant)
    except ConfigError as e:
        raise ConfigError(f"--act-variant {variant}: {e}") from None


def switch_act_variant(model: torch.nn.Module, variant: str, source: str | Path = "--init-from") -> BitNetModel:
    """A new model with ``act_variant=variant`` holding ``model``'s weights (BitNet a4.8 / v2's
    recipe: 8-bit activations first, then continue training with the 4-bit variant; the caller's
    optimizer starts fresh).  The variants add no parameter, so every tensor must match by name and
    shape; anything else is a one-line ValueError naming ``source``."""
    from .layers import thaw

    cfg = _with_act_variant(model.config, variant)
    thaw(model)  # frozen ternary layers (packed HF folders) → trainable latent weights
    new = BitNetModel(cfg).to(next(model.parameters()).dtype)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    missing, extra = sorted(set(new_sd) - set(old_sd)), sorted(set(old_sd) - set(new_sd))
    if missing or extra:
        raise ValueError(f"{source}: --act-variant {variant}: tensors do not match the model (missing "
                         f"{missing[:3]}, unexpected {extra[:3]})")
    for k, v in new_sd.items():
        if old_sd[k].shape != v.shape:
            raise ValueError(f"{source}: --act-variant {variant}: tensor {k} has shape {tuple(old_sd[k].shape)}, "
                             f"the model needs {tuple(v.shape)}")
    new.load_state_dict(old_sd)
    return new


def train_section(path: str | Path) -> dict[str, Any]:
    """The "train" section of a JSON config file, its keys checked against TrainConfig."""
    from .config import ConfigError, check_field_types, read_config_file

    loaded = read_config_file(path)
    section = loaded.get("train", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section 'train' must be a JSON object")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in section:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} in section 'train'")
    check_field_types(TrainConfig, section, f"{path}: section 'train'")
    return section


def _exec_torchrun(args, argv: list[str]) -> int:
    """``bitlm train --nproc N ...`` → ``python -m torch.distributed.run --nproc-per-node N -m bitlm
    train ...`` in place of this process (the same options, less --nproc)."""
    from .parallel import torchrun_env

    if torchrun_env() is not None:
        raise ValueError("--nproc inside torchrun: torchrun already started the processes; drop --nproc")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    if args.parallel is None:  # every rank in one tp group: no data parallelism; else ddp (fsdp with --tp)
        tp = args.tp or 1
        rest += ["--parallel", "none" if args.nproc == tp else "fsdp" if tp > 1 else "ddp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "bitlm", "train", *rest]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


def run(args) -> int:
    if args.nproc is not None:
        return _exec_torchrun(args, list(getattr(args, "argv", [])))
    file_train = train_section(args.config) if args.config else {}
    init_model = None
    if args.init_from:
        from .loading import detect_format, load

        if detect_format(args.init_from) == "packed":
            raise ValueError(f"{args.init_from}: --init-from needs a checkpoint, HF folder or GGUF model with "
                             "trainable weights, not a packed file")
        init_model = load(args.init_from)
        mcfg = init_model.config
        if args.overrides:
            raise ValueError("--set cannot change the architecture of an --init-from model")
        if args.act_variant is not None:
            init_model = switch_act_variant(init_model, args.act_variant, args.init_from)
            mcfg = init_model.config
    else:
        mcfg = build_config(args.preset, args.config, args.overrides)
        if args.act_variant is not None:
            mcfg = _with_act_variant(mcfg, args.act_variant)
    tkw: dict[str, Any] = {**file_train, **parse_overrides(args.train_overrides, TrainConfig)}
    cli = dict(recipe=args.recipe or tkw.get("recipe") or mcfg.quant, data=args.data, tokenizer=args.tokenizer,
               out_dir=args.out, max_steps=args.max_steps, tokens=args.tokens, max_time=args.max_time,
               batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
               seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
               save_every_minutes=args.save_every_minutes, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
               precision=args.precision, device=args.device, parallel=args.parallel, dist_backend=args.dist_backend,
               dist_timeout=args.dist_timeout, global_batch=args.global_batch, tp=args.tp, tp_quant=args.tp_quant,
               checkpoint_format=args.checkpoint_format, teacher=args.teacher, teacher_dtype=args.teacher_dtype,
               kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
               kd_attention_layers=args.kd_attention_layer, kd_attention_weight=args.kd_attention_weight)
    tkw.update({k: v for k, v in cli.items() if v is not None})
    if args.init_from and tkw.get("tokenizer") is None and (Path(args.init_from) / "tokenizer.json").is_file():
        tkw["tokenizer"] = args.init_from  # the model's own vocabulary: a freshly trained BPE would scramble its ids
    if (args.teacher and tkw.get("tokenizer") is None and Path(args.teacher).is_dir()
            and (Path(args.teacher) / "tokenizer.json").is_file()):
        tkw["tokenizer"] = args.teacher  # the teacher's vocabulary: its logits are over its own token ids
    if args.bf16:
        tkw["bf16"] = True
    if args.compile:
        tkw["compile"] = True
    if args.no_progress:  # elsewhere than a terminal (CI, a log) progress is plain lines, not redraws
        tkw["progress"] = False
    tcfg = TrainConfig(**tkw)
    try:
        res = train(mcfg, tcfg, resume=args.resume, init_model=init_model)
    except TrainingInterrupted as e:  # the step was finished and saved: say where, exit 128 + signal
        print(f"bitlm train: stopped by {signal.Signals(e.signum).name} after step {e.step}; checkpoint saved to "
              f"{e.checkpoint} (continue with --resume)", file=sys.stderr)
        return 128 + e.signum
    except TrainingAborted as e:
        print(f"bitlm train: {e}; {Path(tcfg.out_dir) / 'last'} holds the last checkpoint", file=sys.stderr)
        return 128 + e.signum
    except PeerLost:  # this rank already printed the one line saying what happened and what now
        return 1
    v = res.val or {}
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"done: {res.step} steps, {res.tokens:,} tokens in {res.seconds:.0f}s; "
          f"val loss {v.get('loss', float('nan')):.4f} ppl {v.get('ppl', float('nan')):.2f}; checkpoint {res.out_dir / 'last'}")
    return 0
