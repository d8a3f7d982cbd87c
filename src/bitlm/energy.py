"""Arithmetic energy of one forward pass, from a ``ModelConfig`` (BitNet 2310.11453 §2.3).

The model is the BitNet paper's: count the scalar additions and multiplications of the matrix
products, and charge each at a per-operation energy for its number format and process node
(Table 2 of 2310.11453, itself from Horowitz, ISSCC 2014, for 45 nm and PokeBNN for 7 nm).  Memory
traffic, norms, softmax, activation functions and quantisation of activations are not counted —
neither do the papers.

For a product (m×n)·(n×p):

* full precision (Eq. 16–17):   ADD = m·(n−1)·p,  MUL = m·n·p  at the FP16 (or FP32) energies;
* BitLinear (Eq. 16 and 18):    ADD = m·(n−1)·p  at the INT8 add energy (weights are ±1 / 0, so
  the "products" are sign flips of 8-bit activations);  MUL = (m·p + m·n)  for the rescaling by β
  and γ/Q_b.  The paper does not say at which precision those rescales run; they happen on the
  de-quantised, high-precision side of the layer, so we charge them at **FP16** (they are ~1e9
  operations for a 6.7B model — invisible at the 2 decimals of Table 1 either way).

What is counted per layer, with m = T tokens (one forward pass over a prompt of T tokens):

* the projections q, k, v, o (GQA-aware: k and v have ``n_kv_heads·head_dim`` outputs) and the FFN
  matrices: 2 for the GELU FFN of ``bitnet`` (up, down), 3 for the gated FFNs (gate, up, down);
* the attention products QKᵀ and A·V of every query head, (T×d_h)·(d_h×T) and (T×T)·(T×d_h).  Like
  the papers we count the **full T×T** score matrix by default (``causal=False``); ``causal=True``
  counts only the lower triangle a causal model actually needs (T(T+1)/2 scores per head).  The
  attention products stay in high precision in BitNet too (the papers keep them at FP16), so they
  are charged at FP16 for b1 / b1.58 models and at the fp precision for fp models;
* not the embedding lookup and not the output head, unless ``include_head=True`` (the head is
  never quantised, so it is charged like attention).

This reproduces, with no fitted constant:

* BitNet Table 1 (6.7B / 13B / 30B × W32 / W16 / W1 × 7 nm / 45 nm × MUL / ADD): 34 of the 36
  cells round to the published value at 2 decimals; the two BitNet 7 nm ADD cells of 6.7B and 30B
  give 0.034 J and 0.135 J where the paper prints 0.04 and 0.14 (off by < 0.01 J; no combination
  of the published per-op constants matches all three 7 nm W1 ADD cells, see ``docs/energy.md``);
* the b1.58 paper's per-op ratio (FP16 add + mul) / INT8 add = 0.50 / 0.007 = 71.4× at 7 nm, and
  its end-to-end trend (18.6× at 1.3B rising to ≈42× at 70B, Fig. 3);
* the "Energy (estimated)" row of the 2B4T report (arXiv 2504.12285 Table 1) for all six models.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig, build_config

__all__ = [
    "ENERGY_PJ",
    "NODES",
    "ModelShape",
    "OpGroup",
    "EnergyReport",
    "count_ops",
    "estimate",
    "per_op_ratio",
    "TABLE1_PUBLISHED",
    "table1",
    "add_arguments",
    "run",
]

# Energy per scalar operation in picojoules: 2310.11453 Table 2 (Horowitz 2014 for 45 nm,
# PokeBNN for 7 nm).  node -> precision -> op -> pJ
ENERGY_PJ: dict[str, dict[str, dict[str, float]]] = {
    "45nm": {
        "fp32": {"add": 0.9, "mul": 3.7},
        "fp16": {"add": 0.4, "mul": 1.1},
        "int8": {"add": 0.03, "mul": 0.2},
    },
    "7nm": {
        "fp32": {"add": 0.38, "mul": 1.31},
        "fp16": {"add": 0.16, "mul": 0.34},
        "int8": {"add": 0.007, "mul": 0.07},
    },
}
NODES = tuple(ENERGY_PJ)

# BitNet's high-precision arithmetic (attention products, weight/activation rescales, output head)
# is FP16 in both papers; the fp baseline's precision is the caller's choice (--fp-bits).
BITNET_HIGH_PRECISION = "fp16"


def _fp_precision(fp_bits: int) -> str:
    if fp_bits not in (16, 32):
        raise ValueError(f"fp_bits must be 16 or 32, got {fp_bits}")
    return f"fp{fp_bits}"


def _check_node(node: str) -> None:
    if node not in ENERGY_PJ:
        raise ValueError(f"unknown process node {node!r}; choose one of {', '.join(NODES)}")


# ---------------------------------------------------------------------------------------------
# Shapes and op counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The matmul shapes that matter for the op count.

    Usually derived from a ``ModelConfig`` (``ModelShape.from_config``); built directly (or with
    ``from_config(cfg, head_dim=...)``) for models whose head width is not d_model / n_heads, e.g.
    Gemma-3 1B (d = 1152, 4 heads × 256).
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    gated_ffn: bool
    vocab_size: int
    quant: str = "fp"  # "fp", "b1" or "b1.58"

    @classmethod
    def from_config(cls, cfg: ModelConfig, **overrides) -> ModelShape:
        base = dict(
            d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, d_ff=cfg.ffn_dim, gated_ffn=cfg.gated_ffn, vocab_size=cfg.vocab_size,
            quant=cfg.quant,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def quantized(self) -> bool:
        return self.quant in ("b1", "b1.58")

    def projections(self) -> list[tuple[str, int, int]]:
        """(name, n_in, n_out) of every BitLinear-able projection of one layer."""
        d, q, kv, f = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.d_ff
        out = [("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)]
        if self.gated_ffn:
            out.append(("gate_proj", d, f))
        out += [("up_proj", d, f), ("down_proj", f, d)]
        return out

    def linear_weights(self) -> int:
        """Weights in the projections of all layers (no embedding, no head)."""
        return self.n_layers * sum(n * p for _, n, p in self.projections())


@dataclass(frozen=True)
class OpGroup:
    """Scalar operations of one kind of matmul, summed over layers, at one precision."""

    name: str  # "proj", "proj.rescale", "attn", "head"
    precision: str  # "fp32" | "fp16" | "int8"
    muls: int
    adds: int

    def energy_j(self, node: str) -> tuple[float, float]:
        """(MUL joules, ADD joules) at a process node."""
        e = ENERGY_PJ[node][self.precision]
        return self.muls * e["mul"] * 1e-12, self.adds * e["add"] * 1e-12


def _matmul(m: int, n: int, p: int) -> tuple[int, int]:
    """(MUL, ADD) of an (m×n)·(n×p) product: Eq. 17 and Eq. 16 of 2310.11453."""
    return m * n * p, m * (n - 1) * p


def _as_shape(model: ModelConfig | ModelShape) -> ModelShape:
    return model if isinstance(model, ModelShape) else ModelShape.from_config(model)


def count_ops(
    model: ModelConfig | ModelShape,
    seq_len: int = 512,
    *,
    fp_bits: int = 16,
    causal: bool = False,
    include_head: bool = False,
) -> list[OpGroup]:
    """Operation counts of one forward pass over ``seq_len`` tokens, grouped by matmul kind.

    Exact integers (Python ints), summed over all layers.  See the module docstring for what is
    counted and at which precision.
    """
    s = _as_shape(model)
    T, L = int(seq_len), s.n_layers
    if T < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    hp = BITNET_HIGH_PRECISION if s.quantized else _fp_precision(fp_bits)
    groups: list[OpGroup] = []

    # Projections, m = T.
    pm = pa = rescale = 0
    for _, n, p in s.projections():
        mul, add = _matmul(T, n, p)
        pm, pa = pm + mul, pa + add
        rescale += T * p + T * n  # Eq. 18: outputs rescaled by β·γ/Q_b, inputs quantised by Q_b/γ
    if s.quantized:
        groups.append(OpGroup("proj", "int8", 0, L * pa))
        groups.append(OpGroup("proj.rescale", hp, L * rescale, 0))
    else:
        groups.append(OpGroup("proj", hp, L * pm, L * pa))

    # Attention products, per query head (GQA shares K/V storage, not the arithmetic).
    H, dh = s.n_heads, s.head_dim
    if causal:
        pairs = T * (T + 1) // 2  # (query, key) pairs with key ≤ query
        am = 2 * pairs * dh  # each score: d_h muls; each output row i: (i+1)·d_h muls
        aa = pairs * (dh - 1) + (pairs - T) * dh  # score sums: d_h−1 adds; row i of A·V: i·d_h adds
    else:
        qk_m, qk_a = _matmul(T, dh, T)  # Q Kᵀ: (T×d_h)·(d_h×T)
        av_m, av_a = _matmul(T, T, dh)  # A V:  (T×T)·(T×d_h)
        am, aa = qk_m + av_m, qk_a + av_a
    groups.append(OpGroup("attn", hp, L * H * am, L * H * aa))

    if include_head:
        hm, ha = _matmul(T, s.d_model, s.vocab_size)
        groups.append(OpGroup("head", hp, hm, ha))
    return groups


# ---------------------------------------------------------------------------------------------
# Energy
# ---------------------------------------------------------------------------------------------


@dataclass
class EnergyReport:
    """Energy of one forward pass of ``seq_len`` tokens at one process node (joules)."""

    name: str
    quant: str
    node: str
    seq_len: int
    fp_bits: int
    causal: bool
    include_head: bool
    mul_j: float
    add_j: float
    groups: list[OpGroup] = field(default_factory=list)

    @property
    def total_j(self) -> float:
        return self.mul_j + self.add_j

    @property
    def mul_j_per_token(self) -> float:
        return self.mul_j / self.seq_len

    @property
    def add_j_per_token(self) -> float:
        return self.add_j / self.seq_len

    @property
    def total_j_per_token(self) -> float:
        return self.total_j / self.seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_j=self.total_j, mul_j_per_token=self.mul_j_per_token,
                 add_j_per_token=self.add_j_per_token, total_j_per_token=self.total_j_per_token)
        return d


def estimate(
    model: ModelConfig | ModelShape,
    seq_len: int = 512,
    node: str = "7nm",
    *,
    fp_bits: int = 16,
    causal: bool = False,
    include_head: bool = False,
    name: str = "",
) -> EnergyReport:
    """MUL and ADD energy (J) of one forward pass over ``seq_len`` tokens at ``node``.

    >>> from bitlm.config import preset
    >>> r = estimate(preset("bitnet-6.7b", quant="fp"), 512, "7nm", fp_bits=32)
    >>> round(r.mul_j, 2), round(r.add_j, 2)          # BitNet Table 1, W32 row
    (4.41, 1.28)
    """
    _check_node(node)
    groups = count_ops(model, seq_len, fp_bits=fp_bits, causal=causal, include_head=include_head)
    mul = add = 0.0
    for g in groups:
        m, a = g.energy_j(node)
        mul, add = mul + m, add + a
    s = _as_shape(model)
    return EnergyReport(name=name, quant=s.quant, node=node, seq_len=int(seq_len), fp_bits=fp_bits,
                        causal=causal, include_head=include_head, mul_j=mul, add_j=add, groups=groups)


def per_op_ratio(node: str = "7nm") -> float:
    """Energy of one FP16 multiply-accumulate over one INT8 add: the b1.58 paper's 71.4× at 7 nm."""
    _check_node(node)
    e = ENERGY_PJ[node]
    return (e["fp16"]["add"] + e["fp16"]["mul"]) / e["int8"]["add"]


# ---------------------------------------------------------------------------------------------
# BitNet Table 1
# ---------------------------------------------------------------------------------------------

# 2310.11453 Table 1, joules for 512 tokens: (model, weight bits) -> (7nm MUL, 7nm ADD, 45nm MUL, 45nm ADD)
TABLE1_PUBLISHED: dict[tuple[str, int], tuple[float, float, float, float]] = {
    ("6.7B", 32): (4.41, 1.28, 12.46, 3.03),
    ("6.7B", 16): (1.14, 0.54, 3.70, 1.35),
    ("6.7B", 1): (0.02, 0.04, 0.08, 0.13),
    ("13B", 32): (8.58, 2.49, 24.23, 5.89),
    ("13B", 16): (2.23, 1.05, 7.20, 2.62),
    ("13B", 1): (0.04, 0.06, 0.12, 0.24),
    ("30B", 32): (20.09, 5.83, 56.73, 13.80),
    ("30B", 16): (5.21, 2.45, 16.87, 6.13),
    ("30B", 1): (0.06, 0.14, 0.20, 0.53),
}
TABLE1_COLUMNS = (("7nm", "mul"), ("7nm", "add"), ("45nm", "mul"), ("45nm", "add"))
# The two cells that our (and every natural) reading of the paper's recipe misses by < 0.01 J.
TABLE1_KNOWN_MISSES = {("6.7B", 1, "7nm", "add"), ("30B", 1, "7nm", "add")}


def table1(seq_len: int = 512) -> list[dict]:
    """Recompute 2310.11453 Table 1; one dict per cell with the published value and the delta.

    The paper's shapes are the ``bitnet-6.7b`` / ``-13b`` / ``-30b`` presets (Table 5); W32 and
    W16 are the same shapes with ``quant="fp"`` at FP32 / FP16, W1 is ``quant="b1"``.
    """
    rows = []
    for (size, wbits), published in TABLE1_PUBLISHED.items():
        cfg = build_config(f"bitnet-{size.lower()}", quant="b1" if wbits == 1 else "fp")
        fp_bits = 32 if wbits == 32 else 16
        for (node, op), pub in zip(TABLE1_COLUMNS, published):
            r = estimate(cfg, seq_len, node, fp_bits=fp_bits)
            val = r.mul_j if op == "mul" else r.add_j
            rows.append(dict(model=size, wbits=wbits, node=node, op=op.upper(), computed=val, published=pub,
                             delta=round(round(val, 2) - pub, 2), known_miss=(size, wbits, node, op) in TABLE1_KNOWN_MISSES))
    return rows


# ---------------------------------------------------------------------------------------------
# CLI: bitlm energy
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="model preset (repeatable), e.g. bitnet-6.7b, b1.58-1.3b, 2b4t")
    p.add_argument("--config", metavar="FILE", help="model config JSON (instead of / on top of one --preset)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="overrides",
                   help="override a config field, e.g. --set quant=fp (repeatable)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per forward pass (default 512, as the papers)")
    p.add_argument("--node", choices=("7nm", "45nm", "both"), default="both", help="process node (default both)")
    p.add_argument("--fp-bits", type=int, choices=(16, 32), default=16,
                   help="precision of full-precision (quant=fp) models (default 16)")
    p.add_argument("--causal", action="store_true", help="count only the causal lower triangle of QKᵀ and A·V")
    p.add_argument("--include-head", action="store_true", help="also count the output head (T × d × vocab)")
    p.add_argument("--compare-fp", action="store_true",
                   help="for each quantised model also print its fp twin and the fp/quantised energy ratio")
    p.add_argument("--table1", action="store_true",
                   help="reproduce 2310.11453 Table 1 (published values side by side, with the delta)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _fmt(x: float) -> str:
    return f"{x:.4g}"  # 4 significant figures: the values span 1e-3 J (BitNet) to 1e2 J (fp32, 45nm)


def _print_table(headers: list[str], rows: list[list[str]], out=None) -> None:
    """Left-align the first column, right-align the others."""
    out = out or sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(fmt(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(fmt(r), file=out)


def _run_table1(args) -> int:
    rows = table1(args.seq_len)
    print(f"BitNet (2310.11453) Table 1: energy of one forward pass of {args.seq_len} tokens, joules")
    print("cell = computed (published); * = round(computed, 2) differs from the published value\n")
    cells = {(r["model"], r["wbits"], r["node"], r["op"]): r for r in rows}
    table = []
    for size, wbits in TABLE1_PUBLISHED:
        line = [size, f"W{wbits}"]
        for node, op in TABLE1_COLUMNS:
            r = cells[(size, wbits, node, op.upper())]
            mark = " *" if abs(r["delta"]) > 1e-9 else "  "
            line.append(f"{r['computed']:.4f} ({r['published']:.2f}){mark}")
        table.append(line)
    _print_table(["model", "WBits"] + [f"{node} {op.upper()}" for node, op in TABLE1_COLUMNS], table)
    exact = sum(abs(r["delta"]) < 1e-9 for r in rows)
    misses = [r for r in rows if abs(r["delta"]) > 1e-9]
    print(f"\n{exact}/{len(rows)} cells equal the published value at 2 decimals.")
    for r in misses:
        known = "known: see docs/energy.md" if r["known_miss"] else "UNEXPECTED"
        print(f"  {r['model']} W{r['wbits']} {r['node']} {r['op']}: {r['computed']:.4f} vs {r['published']:.2f} "
              f"(delta {r['delta']:+.2f} J; {known})")
    if args.json:
        from .io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"seq_len": args.seq_len, "table1": rows}, indent=2))
    return 0


def run(args) -> int:
    if args.table1:
        return _run_table1(args)
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
    names: list[str | None] = list(args.preset) or [None]
    if not args.preset and not args.config:
        raise ValueError("give --preset NAME (repeatable), --config FILE, or --table1")
    nodes = NODES if args.node == "both" else (args.node,)
    reports: list[EnergyReport] = []
    for name in names:
        cfg = build_config(name, args.config, args.overrides)
        label = name or Path(args.config).stem
        variants = [(label, cfg)]
        if args.compare_fp and cfg.quant != "fp":
            variants.append((f"{label} (fp{args.fp_bits})", cfg.replace(quant="fp")))
        for lab, c in variants:
            for node in nodes:
                reports.append(estimate(c, args.seq_len, node, fp_bits=args.fp_bits, causal=args.causal,
                                        include_head=args.include_head, name=lab))
    rows = []
    for r in reports:
        rows.append([r.name, r.quant if r.quant != "fp" else f"fp{r.fp_bits}", r.node, _fmt(r.mul_j),
                     _fmt(r.add_j), _fmt(r.total_j), _fmt(r.total_j_per_token * 1e3)])
    what = "causal attention" if args.causal else "full T x T attention"
    head = ", with output head" if args.include_head else ", no embedding/head"
    print(f"Energy of one forward pass of {args.seq_len} tokens ({what}{head}), joules")
    _print_table(["model", "quant", "node", "MUL J", "ADD J", "total J", "mJ/token"], rows)
    if args.compare_fp:
        by_key = {(r.name, r.node): r for r in reports}
        for r in reports:
            twin = by_key.get((f"{r.name} (fp{args.fp_bits})", r.node))
            if twin is not None:
                print(f"{r.name} @ {r.node}: fp{args.fp_bits} / {r.quant} = {twin.total_j / r.total_j:.1f}x")
    if args.json:
        from .io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"reports": [r.to_dict() for r in reports]}, indent=2))
    return 0
