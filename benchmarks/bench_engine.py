"""End-to-end benchmark of the packed engine on a 2B4T-shaped model with random ternary weights.

Measures, in one run, for each packing format (i2 2-bit, t1 1.6-bit), output-head type and
thread count: prefill tok/s (128 and 512 tokens), decode tok/s (128 tokens after a 16-token
prompt), peak RSS, and decode against the bandwidth roofline (bytes read per token ÷ the memory
read bandwidth measured by the kernel library in the same run).  Each configuration runs in its
own process so that peak RSS belongs to that configuration alone.

    python benchmarks/bench_engine.py                       # full 2b4t shape (builds ~1 GB files once)
    python benchmarks/bench_engine.py --preset tiny-2b4t --decode-tokens 32 --prefill 64   # seconds, a smoke test
    python benchmarks/bench_engine.py --llama-cpp           # + llama.cpp TQ2_0/TQ1_0 side by side
    python benchmarks/bench_engine.py --per-op              # + decode on the per-op (Python-driven) path
    python benchmarks/bench_engine.py --formats t1 --heads int8a8,int6,int4 --prefill ""   # low-bit heads
    python benchmarks/bench_engine.py --kv f16,int8 --depth 0,1024,4096 --prefill "" [--llama-cpp]   # long contexts (llama.cpp at the same depths, f16 KV)

Writes a table to stdout and JSON (CPU model, kernel tier, every number) to --json.
"""

from __future__ import annotations

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitlm.info import cpu_model
from bitlm.io.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent


def build_random_packed(preset_name: str, fmt: str, head: str, path: Path, seed: int = 0) -> Path:
    """A packed model with uniformly random ternary weights (about 1/3 zeros, like trained BitNet
    weights) built directly in packed form — no float model of 2B parameters is ever made."""
    from bitlm.config import preset
    from bitlm.engine import Dense, PackedLayer, PackedModel, save_packed
    from bitlm.packing import pack_weight

    if path.exists():
        return path
    cfg = preset(preset_name, quant="b1.58")
    g = torch.Generator().manual_seed(seed)
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim

    def rand(n: int, k: int, groups: int = 1):
        t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        return pack_weight(t, torch.full((groups,), 0.02), fmt, groups)

    layers = []
    for i in range(cfg.n_layers):
        print(f"  building layer {i + 1}/{cfg.n_layers}", end="\r", file=sys.stderr, flush=True)
        ones = lambda n: torch.ones(n)  # noqa: E731
        layers.append(PackedLayer(q=rand(cfg.n_heads * hd, d), k=rand(cfg.kv_heads * hd, d), v=rand(cfg.kv_heads * hd, d),
                                  o=rand(d, cfg.n_heads * hd), up=rand(2 * f, d, groups=2), down=rand(d, f),
                                  input_norm=ones(d), attn_sub_norm=ones(cfg.n_heads * hd), post_norm=ones(d),
                                  ffn_sub_norm=ones(f)))
    table = torch.randn(cfg.vocab_size, d, generator=g) * 0.02
    head_d = Dense.from_float(head, table)
    # int6 / int4 are head-only formats: the (tied) embedding rows then stay int8
    emb = head_d if head_d.bits is None else Dense.from_float("int8", table)
    pm = PackedModel(cfg, layers, emb, head_d, torch.ones(d), format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_packed(pm, path)
    print(file=sys.stderr)
    return path


def greedy(logits: torch.Tensor) -> int:
    """The next token as ``bitlm.generate`` picks it at temperature 0 from logits (``sample_next``:
    the first maximum, native)."""
    from bitlm.generate import SamplingParams, sample_next

    return int(sample_next(logits[:, -1], SamplingParams(temperature=0.0)))


def decode_next(pm, tok: int, cache) -> int:
    """One decode token as ``bitlm.generate`` runs it at temperature 0: the packed model's one
    native call (``decode_greedy``) where it applies, else the forward and the pick from its logits."""
    nxt = pm.decode_greedy(tok, cache)
    return nxt if nxt is not None else greedy(pm(torch.tensor([[tok]]), cache=cache))


def run_one(path: str, threads: int, decode_tokens: int, prefill: list[int], head_act: str = "f32",
            phases: bool = False, kv: str = "f16", depth: int = 0) -> dict:
    """Runs inside a fresh process: load (mmap), prefill, decode; reports speeds and peak RSS.
    ``kv``: the KV cache type; ``depth``: decode after this many cached tokens of context.  The
    cache is filled with random keys / values (rounded as the cache stores them) instead of a
    ``depth``-token prefill — the decode reads the same bytes, in minutes less on a loaded VM.
    ``phases``: then decode as many tokens again with the fused step's per-phase timers on
    (``native.decode_profile``) and the head timed from Python, and report ms per token per
    phase (the timed decode above runs without them)."""
    from bitlm import kernels
    from bitlm.engine import load_packed

    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    _touch_torch_code()
    base_rss = _hwm()  # python + torch + the kernel library, before the model exists
    t0 = time.perf_counter()
    pm = load_packed(path, verify=False)
    if pm.head.bits is None:  # int6 / int4 heads always read int8 activations
        pm.head_act = head_act
    pm.kv = kv
    if depth + decode_tokens * (2 if phases else 1) + 32 > pm.config.max_seq_len:  # RoPE runs at any position
        pm.config.max_seq_len = depth + decode_tokens * (2 if phases else 1) + 32
    out: dict = {"load_s": time.perf_counter() - t0}
    V = pm.config.vocab_size
    g = torch.Generator().manual_seed(1)
    kv_peak = 0  # the largest KV cache alive at any time (prefill 512's, not decode's)
    cache = None
    for n in prefill:
        if n >= pm.config.max_seq_len:
            continue
        ids = torch.randint(0, V, (1, n), generator=g)
        pm(ids[:, :8], cache=pm.new_cache(1, 8), last_only=True)  # warm-up
        best = float("inf")
        for _ in range(2):
            cache = None  # drop the previous cache before making the next one
            cache = pm.new_cache(1, n)
            kv_peak = max(kv_peak, cache.nbytes())
            t = time.perf_counter()
            pm(ids, cache=cache, last_only=True)  # as in generation: logits of the last token only
            best = min(best, time.perf_counter() - t)
        out[f"prefill_{n}_tok_s"] = n / best
    prompt = torch.randint(0, V, (1, 16), generator=g)
    cache = None
    cache = pm.new_cache(1, depth + 16 + decode_tokens * (2 if phases else 1) + 1)
    if depth:
        cfg = pm.config
        for i in range(cfg.n_layers):
            kv_rand = torch.randn(2, 1, cfg.kv_heads, depth, cfg.head_dim, generator=g)
            cache.update(i, kv_rand[0], kv_rand[1])
        cache.advance(depth)
    kv_peak = max(kv_peak, cache.nbytes())
    nxt = greedy(pm(prompt, cache=cache, last_only=True))
    for _ in range(4):  # warm-up decode steps (page in every weight)
        nxt = decode_next(pm, nxt, cache)
    times = []
    for _ in range(decode_tokens - 4):
        t = time.perf_counter()
        nxt = decode_next(pm, nxt, cache)
        times.append(time.perf_counter() - t)
    times.sort()
    out["decode_tok_s"] = 1.0 / times[len(times) // 2]  # median token
    out["decode_mean_tok_s"] = len(times) / sum(times)
    if phases:
        out.update(profile_decode(pm, cache, nxt, decode_tokens - 4))
    wb = pm.weight_bytes()
    out["bytes_per_token"] = wb["linear"] + (wb["head"] or wb["embedding"])
    out["kv"], out["depth"] = kv, depth
    # attention reads the cache up to the current position: depth + prompt + half the decode, on average
    ctx = depth + 16 + decode_tokens // 2
    from bitlm.engine import kv_bytes_per_token

    out["kv_bytes_per_token"] = ctx * kv_bytes_per_token(pm.config, kv)
    out["bytes_per_token"] += out["kv_bytes_per_token"]
    out["kv_cache_bytes"] = cache.nbytes()
    out["kv_cache_peak_bytes"] = kv_peak
    out["file_bytes"] = os.path.getsize(path)
    out["peak_rss_bytes"] = _hwm()
    out["baseline_rss_bytes"] = base_rss
    out["kernel_config"] = kernels.backend_info().get("kernel_config")  # this process's (env-dependent) plan
    # this VM's bandwidth drifts (40-80 GB/s at 2 threads): probe again right after the decode,
    # in this process (after the peak RSS is read: the probe's buffer is 1 GiB)
    out["bandwidth_after_gb_s"] = measure_bandwidth(threads)
    return out


def head_gemv(preset_name: str, heads: list[str], threads: list[int], reps: int = 15) -> list[dict]:
    """The output head alone, decode-shaped (M = 1): each head type of the preset's (V, d) shape
    from the same random matrix, timed interleaved (rep by rep) so that a drifting bandwidth hits
    them alike; medians and the GB/s each streams."""
    from bitlm import kernels
    from bitlm.config import preset
    from bitlm.engine import Dense

    cfg = preset(preset_name)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(cfg.vocab_size, cfg.d_model, generator=g) * 0.02
    store = {h: Dense.from_float("int8" if h == "int8a8" else h, table) for h in heads}
    xq, a = kernels.quantize_rows(torch.randn(1, cfg.d_model, generator=g))
    rows = []
    for t in threads:
        kernels.set_num_threads(t)
        times: dict[str, list[float]] = {h: [] for h in heads}
        for _ in range(reps):
            for h in heads:
                t0 = time.perf_counter()
                store[h].matmul_q(xq, a)
                times[h].append(time.perf_counter() - t0)
        for h in heads:
            ts = sorted(times[h])
            med = ts[len(ts) // 2]
            rows.append({"head": h, "threads": t, "ms": med * 1e3, "bytes": store[h].nbytes,
                         "gb_s": store[h].nbytes / med / 1e9})
    return rows


def profile_decode(pm, cache, nxt: int, n: int) -> dict:
    """``n`` more decode tokens with the fused step's phase timers on and the final norm + head
    timed (inside the native token call, else ``PackedModel._final`` from Python) → ms per token
    per phase; ``python_gap`` is what is left of the token (the Python around the native call(s),
    the greedy pick; with the head in Python also the embedding row, the calls between step and head)."""
    from bitlm.kernels import native

    final, head_s = pm._final, [0.0]

    def timed_final(*a, **kw):
        t = time.perf_counter()
        r = final(*a, **kw)
        head_s[0] += time.perf_counter() - t
        return r

    pm._final = timed_final
    native.decode_profile(True)
    t0 = time.perf_counter()
    try:
        for _ in range(n):
            nxt = decode_next(pm, nxt, cache)
    finally:
        total = time.perf_counter() - t0
        prof = native.decode_profile(False)
        del pm._final
    steps = prof.pop("steps") or 1
    jobs = prof.pop("jobs")
    ms = {k: 1e3 * v / steps for k, v in prof.items()}
    ms["head"] += 1e3 * head_s[0] / steps  # in the native token call (C timer), else around _final
    ms["token"] = 1e3 * total / steps
    ms["python_gap"] = ms["token"] - ms["step"] - ms["head"]
    return {"phases_ms_per_token": ms, "syncs_per_token": jobs / steps, "phases_tokens": int(steps)}


def _touch_torch_code() -> None:
    """Run the torch ops the engine uses once on tiny tensors, so that libtorch's code pages
    (~10 MB, paged in on first use) count in the baseline, not as model memory."""
    import torch.nn.functional as F

    x = torch.randn(1, 2, 4, 8)
    F.scaled_dot_product_attention(x, x, x, is_causal=True)
    F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    y = torch.randn(4, 8)
    F.silu(y).mul_(F.relu(y).square_()), torch.rsqrt(y.pow(2).mean(-1)), torch.cat([y, -y]).cos().sin()
    F.linear(y.bfloat16(), y.bfloat16()), F.layer_norm(y, (8,)), F.gelu(y), y.argmax(-1)


def _hwm() -> int:
    """Peak RSS of this process (VmHWM).  Not getrusage: after fork+exec ru_maxrss still carries
    the parent's peak on Linux, and the parent holds a 1 GiB bandwidth buffer."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Read bandwidth (GB/s) of a buffer far larger than the last-level cache, via the kernel
    library's SIMD read loop on its thread pool: the best of 5 reads of a buffer on 4 KiB pages
    (torch's allocator) and of 5 of one on huge pages where the OS offers them — the best read
    this machine allows, whatever pages the engine's weights sit on (which of the two reads
    faster changes with where the pages land: ±5 % on this project's VM)."""
    from bitlm import kernels, memory
    from bitlm.kernels import native

    kernels.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    best = float("inf")
    for huge in (False, True) if memory.available() else (False,):
        # both zeroed by writing, so every page is backed (an untouched one would read the zero page)
        buf = memory.zeros(1, (n,), torch.float32, hugepages=True)[0] if huge else torch.zeros(n)
        native.mem_read(buf)
        for _ in range(5):
            t = time.perf_counter()
            native.mem_read(buf)
            best = min(best, time.perf_counter() - t)
        del buf
    return n * 4 / best / 1e9


def bitlm_rows(args, threads: list[int], bw: dict[int, float]) -> list[dict]:
    """One fresh process per (format, head, threads[, per-op]) configuration of bitlm."""
    rows = []
    kvs, depths = args.kv.split(","), [int(x) for x in args.depth.split(",")]
    for fmt in args.formats.split(","):
        for head in args.heads.split(","):
            # int8a8: the int8 head file, read with int8 activations (PackedModel.head_act)
            store, head_act = ("int8", "int8") if head == "int8a8" else (head, "f32")
            path = build_random_packed(args.preset, fmt, store, Path(args.cache_dir) / f"{args.preset}-{fmt}-{store}.bitlm")
            for t, per_op, kv, depth in [(t, p, kv, dp) for p in ([False, True] if args.per_op else [False])
                                         for kv in kvs for dp in depths for t in threads]:
                cmd = [sys.executable, __file__, "--_run", f"{path}:{t}", "--decode-tokens", str(args.decode_tokens),
                       "--prefill", args.prefill, "--_head-act", head_act, "--kv", kv, "--depth", str(depth)] + (
                           ["--phases"] if args.phases else [])
                env = {**os.environ, "OMP_NUM_THREADS": str(t), "BITLM_FUSED_DECODE": "0" if per_op else "1"}
                load_before = os.getloadavg()[0]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    raise SystemExit(f"benchmark run failed for {path} at {t} threads")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res["load_avg_1m_before"] = load_before
                res["load_avg_1m_after"] = os.getloadavg()[0]
                # the roofline uses the higher of the two probes (start of the run, right after
                # this decode): the stricter bound
                res.update(engine="bitlm-perop" if per_op else "bitlm", format=fmt, head=head, threads=t,
                           bandwidth_start_gb_s=bw[t], bandwidth_gb_s=max(bw[t], res["bandwidth_after_gb_s"]),
                           decode_path="per-op" if per_op else "fused")
                roof = res["bandwidth_gb_s"] * 1e9 / res["bytes_per_token"]
                res["roofline_tok_s"] = roof
                res["pct_of_roofline"] = 100 * res["decode_tok_s"] / roof
                # the target (peak RSS <= file + KV cache + 10%) is checked on what the model adds to
                # the process, against the largest KV cache alive (the 512-token prefill's); the
                # interpreter + torch baseline is reported beside it
                res["rss_over_file_plus_kv"] = (res["peak_rss_bytes"] - res["baseline_rss_bytes"]) / (
                    res["file_bytes"] + res["kv_cache_peak_bytes"])
                rows.append(res)

    return rows


_KEY = ("engine", "format", "head", "threads", "kv", "depth")


def aggregate(runs: list[dict]) -> list[dict]:
    """Rounds of the same configuration → one row of medians (speeds, RSS, bandwidth), with every
    round's decode / prefill-512 speed kept under ``rounds``.  Interleaving rounds of every engine
    is what makes a comparison fair on a VM whose bandwidth drifts within minutes."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r.get(k) for k in _KEY), []).append(r)
    out = []
    for rs in groups.values():
        row = dict(rs[0])
        for k, v in rs[0].items():
            if k in _KEY or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            vals = sorted(r[k] for r in rs if isinstance(r.get(k), (int, float)))
            n = len(vals)
            row[k] = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
        row["rounds"] = [{k: r.get(k) for k in ("decode_tok_s", "prefill_512_tok_s", "bandwidth_gb_s")} for r in rs]
        if row.get("roofline_tok_s") and row.get("decode_tok_s"):
            row["pct_of_roofline"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
        out.append(row)
    return out


def ik_rows(args, threads: list[int], bw: dict[int, float]) -> list[dict]:
    """ik_llama.cpp (IQ2_BN_R4, q8_0 head) on the same random weights: benchmarks/bench_ik.py."""
    from bench_ik import build_ik_gguf, run_ik, weight_bytes

    path = build_ik_gguf(args.preset, cache_dir=args.cache_dir)
    wb = weight_bytes(path)
    rows = []
    for t in threads:
        row = run_ik(args.ik_bench_path, path, t, [int(p) for p in args.prefill.split(",") if p],
                     args.decode_tokens, reps=args.ik_reps)
        row.update(file_bytes=os.path.getsize(path), bytes_per_token=wb["ternary"] + wb["head"])
        if t in bw:  # the probe just before this side of the round
            row["bandwidth_gb_s"] = bw[t]
            row["roofline_tok_s"] = bw[t] * 1e9 / row["bytes_per_token"]
            if row.get("decode_tok_s"):
                row["pct_of_roofline"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
        rows.append(row)
        print(f"  ik_llama.cpp {t} thr: decode {row.get('decode_tok_s', float('nan')):.1f} tok/s, "
              f"pp512 {row.get('prefill_512_tok_s', float('nan')):.1f}", file=sys.stderr, flush=True)
    return rows


def _median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


RATIO_KEYS = ("decode_tok_s", "prefill_128_tok_s", "prefill_512_tok_s")


def ratios(runs: list[dict], probes: list[dict]) -> list[dict]:
    """bitlm (fused) ÷ every peer row of the same round and thread count, per speed: the median
    over rounds, the spread (min, max) and every round's value beside that round's read probes."""
    out = []
    by_round: dict[int, list[dict]] = {}
    for r in runs:
        by_round.setdefault(r.get("round", 0), []).append(r)
    pairs: dict[tuple, list[tuple[int, float]]] = {}
    for rnd, rs in by_round.items():
        # each bitlm row against the peers' rows of the same thread count and context depth
        # (llama.cpp decodes at --depth with its f16 cache; ik_llama.cpp at depth 0 only)
        for a in (r for r in rs if r["engine"] == "bitlm"):
            for b in (r for r in rs if r["engine"] not in ("bitlm", "bitlm-perop") and r["threads"] == a["threads"]
                      and (r.get("depth") or 0) == (a.get("depth") or 0)):
                for k in RATIO_KEYS:
                    if a.get(k) and b.get(k):
                        depth = f", depth {a['depth']}" if a.get("depth") else ""
                        key = (a["format"], f"{a['head']}, kv {a.get('kv', 'f16')}{depth}", b["engine"], b["format"],
                               b["head"], a["threads"], k)
                        pairs.setdefault(key, []).append((rnd, a[k] / b[k]))
    for (fa, ha, eb, fb, hb, t, k), vals in pairs.items():
        rs = [v for _, v in vals]
        out.append({"bitlm": f"{fa}/{ha}", "peer": f"{eb} {fb}/{hb}", "threads": t, "metric": k,
                    "median": _median(rs), "min": min(rs), "max": max(rs),
                    "rounds": [{"round": rnd, "ratio": v,
                                "probes_gb_s": next((p["probes_gb_s"].get(t) for p in probes if p["round"] == rnd),
                                                    None)} for rnd, v in vals]})
    return out


def sustained_share(rows: list[dict], probes: list[dict]) -> dict[int, float]:
    """Each decode row's GB/s (decode tok/s x bytes per token) as a percentage of the sustained
    read bandwidth: the median of every probe of the sitting at that thread count, stored as
    ``pct_of_sustained_probe``.  ``pct_of_roofline`` holds a side against the probe just before
    it, and this project's VM reads a burst right after a quiet spell (Zen 4: the first 2-thread
    probe of a round 54-60 GB/s, the next ones 28-32), which makes that share read low.
    Returns the sustained probe per thread count."""
    per_t: dict[int, list[float]] = {}
    for rp in probes:
        for t, vs in rp["probes_gb_s"].items():
            per_t.setdefault(int(t), []).extend(vs)
    sustained = {t: _median(vs) for t, vs in per_t.items() if vs}
    for r in rows:
        s = sustained.get(r.get("threads"))
        if s and r.get("decode_tok_s") and r.get("bytes_per_token"):
            r["pct_of_sustained_probe"] = 100 * r["decode_tok_s"] * r["bytes_per_token"] / (s * 1e9)
    return sustained


def report(args, cpu: dict, info: dict, bw: dict, runs: list[dict], probes: list[dict], final: bool) -> None:
    """The table, the ratios and the JSON of the rounds so far (written after every round, so
    that an interrupted run keeps what it measured; the table is printed at the end only)."""
    rows = aggregate(runs) if len(probes) > 1 else runs
    rat = ratios(runs, probes)
    sustained = sustained_share(rows, probes)
    out = {"cpu": cpu_model(), "cpu_identity": cpu, "kernels": info, "torch": torch.__version__,
           "preset": args.preset, "bandwidth_gb_s": bw, "sustained_probe_gb_s": sustained, "round_probes": probes,
           "rows": rows, "runs": runs,
           "ratios": rat, "rounds": len(probes), "rounds_asked": args.rounds, "complete": final,
           "loadavg_end": list(os.getloadavg()),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(out, indent=2) + "\n")
    if not final:
        return
    from cpu_info import describe

    hdr = (f"{'engine':<13}{'fmt':<10}{'head':<8}{'kv':<5}{'depth':>6}{'thr':>4}{'pp128':>9}{'pp512':>9}{'decode':>9}{'GB/s':>6}{'roof%':>7}"
           f"{'sust%':>7}"
           f"{'MB/tok':>9}{'RSS MB':>9}{'base MB':>9}{'(RSS-base)/(file+kv)':>22}")
    print(f"\n{describe(cpu)}\nkernels: {info.get('backend')} {info.get('tier')} "
          f"[{info.get('kernel_config', '')}]; load average at the end {os.getloadavg()}")
    print("roof%: decode ÷ the probe just before that side; sust%: ÷ the sitting's median probe ("
          + ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in sorted(sustained.items())) + ")")
    for rp in probes:
        print(f"round {rp['round'] + 1} ({' → '.join(rp['order'])}): read probes "
              + "; ".join(f"{t} thr " + " / ".join(f"{v:.1f}" for v in vs) + " GB/s" for t, vs in rp["probes_gb_s"].items())
              + f"; load {rp['loadavg'][0][0]:.2f} → {rp['loadavg'][-1][0]:.2f}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        def g(k, fmt="{:.1f}", r=r):
            return fmt.format(r[k]) if r.get(k) is not None else "-"
        print(f"{r['engine']:<13}{r['format']:<10}{r['head']:<8}{r.get('kv') or '-':<5}{r.get('depth') or 0:>6}"
              f"{r['threads']:>4}{g('prefill_128_tok_s'):>9}"
              f"{g('prefill_512_tok_s'):>9}{g('decode_tok_s'):>9}{g('bandwidth_gb_s', '{:.0f}'):>6}"
              f"{g('pct_of_roofline', '{:.0f}'):>7}{g('pct_of_sustained_probe', '{:.0f}'):>7}"
              f"{(r['bytes_per_token'] / 1e6 if r.get('bytes_per_token') else float('nan')):>9.1f}"
              f"{(r['peak_rss_bytes'] / 1e6 if r.get('peak_rss_bytes') else float('nan')):>9.0f}"
              f"{(r['baseline_rss_bytes'] / 1e6 if r.get('baseline_rss_bytes') else float('nan')):>9.0f}"
              f"{g('rss_over_file_plus_kv', '{:.3f}'):>22}")
        if r.get("phases_ms_per_token"):
            ph = r["phases_ms_per_token"]
            print("    phases ms/token: " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items())
                  + f"; syncs/token {r['syncs_per_token']:.0f}")
    if rat:
        print("\nratios bitlm ÷ peer (median [min – max] over rounds; per round with its read probes, GB/s):")
        for q in rat:
            per = "; ".join(f"r{x['round'] + 1} {x['ratio']:.2f} ("
                            + "/".join(f"{v:.0f}" for v in (x["probes_gb_s"] or [])) + ")" for x in q["rounds"])
            print(f"  {q['bitlm']:<12} ÷ {q['peer']:<24} {q['threads']} thr {q['metric']:<18} "
                  f"{q['median']:.2f} [{q['min']:.2f} – {q['max']:.2f}]   {per}")
    print(f"\nJSON: {args.json}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--formats", default="i2,t1")
    ap.add_argument("--heads", default="int8a8,int8,bf16",
                    help="output heads: int8a8 (int8 rows x int8 activations, like llama.cpp's q8_0), int8 "
                         "(int8 rows x float activations), bf16, f32, int6 / int4 (6 / 4-bit rows, one f16 scale "
                         "per 32 columns, int8 activations)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill", default="128,512")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/bitlm/bench"))
    ap.add_argument("--json", default="benchmarks/results/engine.json")
    ap.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp (needs llama-cpp-python)")
    ap.add_argument("--llama-formats", default=None, help="llama.cpp weight types (default tq2_0,tq1_0)")
    ap.add_argument("--llama-heads", default=None, help="llama.cpp head types (default q8_0,f16)")
    ap.add_argument("--ik-bench", default=None,
                    help="also run ik_llama.cpp: its llama-bench executable (or $BITLM_IK_BENCH); IQ2_BN_R4 "
                         "with a q8_0 head on the same random weights (benchmarks/bench_ik.py)")
    ap.add_argument("--ik-reps", type=int, default=3, help="llama-bench -r for the ik_llama.cpp side")
    ap.add_argument("--per-op", action="store_true",
                    help="also time decode on the per-op path (BITLM_FUSED_DECODE=0: one torch/ctypes call per "
                         "projection, norm, RoPE, attention), the fused step's reference twin")
    ap.add_argument("--phases", action="store_true",
                    help="after the timed decode, decode as many tokens again with the fused step's per-phase "
                         "timers on and report ms per token per phase (passes, waits, head, Python gap)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every configuration (engines interleaved, the first one alternating) and report "
                         "medians, every ratio with its round-by-round spread, and read probes at the start, "
                         "between engines and at the end of every round")
    ap.add_argument("--kv", default="f16", help="KV cache types, comma separated: f16 (the engine's default), f32, int8")
    ap.add_argument("--depth", default="0",
                    help="context depths to decode at, comma separated (e.g. 0,1024,4096): the cache holds this many "
                         "tokens (random keys / values) before the 16-token prompt")
    ap.add_argument("--head-gemv", action="store_true",
                    help="time the output head alone (M = 1) for each --heads type that reads int8 activations "
                         "(int8a8, int6, int4), interleaved, and exit")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_head-act", default="f32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefill = [int(x) for x in args.prefill.split(",") if x]
    if args._run:
        path, threads = args._run.rsplit(":", 1)
        print(json.dumps(run_one(path, int(threads), args.decode_tokens, prefill, args._head_act, args.phases,
                                 args.kv, int(args.depth))))
        return 0
    if args.head_gemv:
        from bitlm import kernels
        from cpu_info import cpu_identity, describe

        rows = head_gemv(args.preset, args.heads.split(","), [int(t) for t in args.threads.split(",")])
        print(f"{describe(cpu_identity())} — kernels: {kernels.backend_info().get('tier')}")
        for r in rows:
            print(f"head {r['head']:<7} threads {r['threads']}: {r['ms']:8.2f} ms  {r['bytes'] / 1e6:7.1f} MB  "
                  f"{r['gb_s']:6.1f} GB/s")
        return 0

    from bench_ik import find_llama_bench
    from cpu_info import cpu_identity

    args.ik_bench_path = find_llama_bench(args.ik_bench)
    os.environ.setdefault("BITLM_BACKEND", "native")
    from bitlm import kernels

    info = kernels.backend_info()
    cpu = cpu_identity()
    threads = [int(t) for t in args.threads.split(",")]
    sides = [("bitlm", lambda bw: bitlm_rows(args, threads, bw))]
    if args.llama_cpp:
        sides.append(("llama.cpp", lambda bw: llama_cpp_rows(args, threads)))
    if args.ik_bench_path:
        sides.append(("ik_llama.cpp", lambda bw: ik_rows(args, threads, bw)))
    runs: list[dict] = []
    probes: list[dict] = []
    bw: dict[int, float] = {}
    for rnd in range(args.rounds):
        order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]  # who goes first alternates
        print(f"round {rnd + 1}/{args.rounds}: {', '.join(n for n, _ in order)}; load {os.getloadavg()}",
              file=sys.stderr, flush=True)
        rp = {"round": rnd, "order": [n for n, _ in order], "probes_gb_s": {t: [] for t in threads},
              "loadavg": [list(os.getloadavg())]}
        for _name, side in order:
            for t in threads:
                rp["probes_gb_s"][t].append(measure_bandwidth(t))
            bw = {t: rp["probes_gb_s"][t][-1] for t in threads}
            for r in side(bw):
                r["round"] = rnd
                runs.append(r)
            rp["loadavg"].append(list(os.getloadavg()))
        for t in threads:
            rp["probes_gb_s"][t].append(measure_bandwidth(t))
        probes.append(rp)
        if rnd + 1 < args.rounds:
            report(args, cpu, info, bw, runs, probes, final=False)
    report(args, cpu, info, bw, runs, probes, final=True)
    return 0


def llama_cpp_rows(args, threads: list[int]) -> list[dict]:
    """llama.cpp on the same shape (TQ2_0 / TQ1_0) through llama-cpp-python, if installed."""
    try:
        from bench_llama_cpp import run_llama_cpp  # benchmarks/bench_llama_cpp.py
    except ImportError as e:
        print(f"llama.cpp side-by-side skipped: {e}", file=sys.stderr)
        return []
    return run_llama_cpp(args, threads)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
