"""transformers' BitNetForCausalLM with and without bitlm's kernels (``bitlm.integrations.
transformers.accelerate``), and bitlm's own engine on the same weights, in one run.

A 2B4T-shaped model (hidden 2560, FFN 6912, 20 heads / 5 KV heads, vocab 128256, tied bf16
embedding; ``--layers`` fewer than 30 keeps the per-layer widths) with uniformly random ternary
weights is built directly in transformers' packed ``BitLinear`` form (``--linear-class
bitlinear``, transformers' default: unpacks on every call) or ``autobitlinear`` (offline:
unpacked once at load into bf16) — no float model is ever made.  Timed through
``model.generate`` (greedy): prefill = prompt → first token, decode = median time between
tokens (a logits processor stamps each step).  Rounds interleave five paths: transformers'
own layers (swapped back in for their turn), the swapped model (the decode step's layers in one
native call, ``BitlmBitNetModel``), the same with that step off (each decoder layer in two native
calls around transformers' cache update and attention, ``BitlmDecoderLayer``), the swapped model
module by module (its layers' ``bitlm_fused = False``: one native call per projection group and
norm), and
``bitlm.engine.PackedModel`` with a bf16 head (the same head transformers reads).  Resident memory: process RSS with only
transformers' layers, then after the swap with the originals dropped.

    python benchmarks/bench_transformers.py                      # 2B4T shape, bitlinear
    python benchmarks/bench_transformers.py --layers 2 --prompt 16 --decode 8 --hf-decode 2   # smoke

Prints a table and writes JSON (CPU, kernel tier, threads, every number) to --json.
"""

from __future__ import annotations

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bitlm import kernels
from bitlm.info import cpu_model

HERE = Path(__file__).resolve().parent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_hf(layers: int, linear_class: str, seed: int = 0):
    """transformers BitNetForCausalLM, 2B4T widths, random ternary projections, bf16 floats."""
    import transformers
    from transformers.integrations.bitnet import pack_weights, replace_with_bitnet_linear
    from transformers.models.bitnet.modeling_bitnet import BitNetRotaryEmbedding

    cfg = transformers.BitNetConfig(
        vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=layers, num_attention_heads=20,
        num_key_value_heads=5, max_position_embeddings=4096, hidden_act="relu2", rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, dtype="bfloat16")
    qc = transformers.BitNetQuantConfig(linear_class=linear_class, quantization_mode="offline")
    cfg.quantization_config = qc
    with torch.device("meta"):
        model = transformers.BitNetForCausalLM(cfg).to(torch.bfloat16)
        replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale"):
                t = torch.randint(-1, 2, (m.out_features, m.in_features), generator=g, dtype=torch.int8)
                if linear_class == "bitlinear":
                    m.weight.copy_(pack_weights(t.clone()))
                    m.weight_scale.fill_(50.0)  # divides: s = 0.02
                else:
                    m.weight.copy_(t.to(m.weight.dtype))
                    m.weight_scale.fill_(0.02)  # multiplies
            elif name.endswith("norm"):
                m.weight.fill_(1.0)
        model.model.embed_tokens.weight.normal_(0, 0.02, generator=g)
        model.model.rotary_emb = BitNetRotaryEmbedding(cfg)  # its buffers are not persistent: rebuild
    model.tie_weights()
    return model.eval()


def packed_engine(model, bitnet_layers):
    """bitlm.engine.PackedModel with the same ternary weights and a bf16 head (fp32 floats)."""
    from bitlm.config import ModelConfig
    from bitlm.engine import Dense, PackedLayer, PackedModel
    from bitlm.integrations.transformers import _ternary_of
    from bitlm.packing import pack_weight

    c = model.config
    cfg = ModelConfig(arch="bitnet-2b4t", quant="b1.58", vocab_size=c.vocab_size, d_model=c.hidden_size,
                      n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                      d_ff=c.intermediate_size, max_seq_len=c.max_position_embeddings, rope_theta=500000.0,
                      norm_eps=c.rms_norm_eps, tie_embeddings=True)
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    layers = []
    for i, blk in enumerate(model.model.layers):
        w = {k: _ternary_of(f"{i}.{k}", bitnet_layers[f"model.layers.{i}.{p}"])
             for k, p in [("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                          ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                          ("down", "mlp.down_proj")]}
        pk = {k: pack_weight(w[k][0], w[k][1], "i2") for k in ("q", "k", "v", "o", "down")}
        pk["up"] = pack_weight(torch.cat([w["gate"][0], w["up"][0]]), torch.cat([w["gate"][1], w["up"][1]]), "i2", 2)
        layers.append(PackedLayer(**pk, input_norm=f32(blk.input_layernorm.weight),
                                  attn_sub_norm=f32(blk.self_attn.attn_sub_norm.weight),
                                  post_norm=f32(blk.post_attention_layernorm.weight),
                                  ffn_sub_norm=f32(blk.mlp.ffn_sub_norm.weight)))
    emb = Dense("bf16", model.model.embed_tokens.weight.detach().to(torch.bfloat16).contiguous())
    # on huge pages, as convert() / load_packed() give a user (accelerate() does the same for transformers)
    return PackedModel(cfg, layers, emb, emb, f32(model.model.norm.weight)).to_hugepages()


class Stamps:
    """A logits processor that records when each generation step's logits are ready."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def time_generate(model, ids: torch.Tensor, new: int) -> tuple[float, list[float]]:
    from transformers import LogitsProcessorList

    st = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             logits_processor=LogitsProcessorList([st]), pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new
    return st.t[0] - t0, [b - a for a, b in zip(st.t, st.t[1:])]


def time_engine(pm, ids: torch.Tensor, new: int) -> tuple[float, list[float]]:
    cache = pm.new_cache(1, ids.shape[1] + new + 1)
    t0 = time.perf_counter()
    logits = pm(ids, cache, last_only=True)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    stamps = [time.perf_counter()]
    for _ in range(new - 1):
        nxt = pm(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def time_modules(modules: list, head, reps: int = 5) -> float:
    """One decode step's bitlm modules alone: every swapped module (projections, norms, then the
    head) called on one bf16 token in model order, no transformers around them — the kernels'
    share of a step.  Siblings that share their input in the model (q/k/v, gate/up: one kernel
    call) get one tensor here too, so their product is computed once as in a decode step."""
    by_group: dict[int, torch.Tensor] = {}
    xs = []
    for m in modules:
        k = m.weight.shape[0] if not hasattr(m, "in_features") else m.in_features
        key = id(m.shared) if getattr(m, "shared", None) is not None else id(m)
        xs.append(by_group.setdefault(key, torch.randn(1, 1, k).to(torch.bfloat16)))
    hx = torch.randn(1, 1, head.in_features).to(torch.bfloat16)
    ts = []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            for m, x in zip(modules, xs):
                m(x)
            head(hx)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_fused(layers: list, head, pos: int, reps: int = 5) -> float:
    """One decode step's native work alone: the one-call step over every layer
    (``native.HfStack.decode``, attention over ``pos`` cached rows of zeros) on one bf16 token,
    then the head, with no transformers around them — bitlm's share of a swapped step."""
    from bitlm.kernels import native

    stack = native.HfStack(layers)
    hx = torch.randn(1, 1, head.in_features).to(torch.bfloat16)
    l0 = layers[0]
    kv = [torch.zeros(1, l0.kv_heads, pos + 1, l0.head_dim, dtype=torch.bfloat16) for _ in range(2 * len(layers))]
    ts = []
    with torch.inference_mode():
        x = torch.randn(1, 1, l0.d_model).to(torch.bfloat16)
        cos = torch.randn(l0.head_dim).to(torch.bfloat16)
        for _ in range(reps):
            t0 = time.perf_counter()
            stack.decode(x, cos, cos, kv[::2], kv[1::2], pos, l0.head_dim ** -0.5)
            head(hx)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def split_step(model, ids: torch.Tensor, steps: int = 12) -> dict[str, float]:
    """Where one swapped decode step's time goes, inside the model (``model(token, cache=DynamicCache)``
    as generate calls it, after a prefill of ``ids``): ms per step in the one-call step over the
    layers (``stack``), or with it off in the fused layers' native calls (``qkv``, ``out``) and
    transformers' cache update and attention function; the head; and the rest (transformers' and
    bitlm's Python: the model forward, RoPE tables, embedding, final norm, the cache views).
    Timers wrap those calls (a few µs each)."""
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from bitlm.kernels import native

    acc = dict.fromkeys(("stack", "qkv", "out", "head", "attention", "cache_update"), 0.0)

    def timed(key, fn):
        def f(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
        return f

    impl = model.config._attn_implementation
    saved = [(native.HfStack, "decode"), (native.HfLayer, "qkv"), (native.HfLayer, "out"),
             (type(model.lm_head), "forward"), (transformers.DynamicCache, "update")]
    originals = [getattr(o, n) for o, n in saved]
    attn = ALL_ATTENTION_FUNCTIONS[impl]
    for (o, n), fn, key in zip(saved, originals, ("stack", "qkv", "out", "head", "cache_update")):
        setattr(o, n, timed(key, fn))
    ALL_ATTENTION_FUNCTIONS[impl] = timed("attention", attn)
    try:
        with torch.inference_mode():
            cache = transformers.DynamicCache(config=model.config)
            nxt = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            for k in acc:
                acc[k] = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = model(nxt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            total = time.perf_counter() - t0
    finally:
        for (o, n), fn in zip(saved, originals):
            setattr(o, n, fn)
        ALL_ATTENTION_FUNCTIONS[impl] = attn
    out = {k: v / steps * 1e3 for k, v in acc.items()}
    out["forward"] = total / steps * 1e3
    out["rest"] = out["forward"] - sum(acc.values()) / steps * 1e3
    return out


def profile_step(model, ids: torch.Tensor, steps: int = 4, top: int = 8) -> tuple[float, list[tuple[str, float, float]]]:
    """torch's own ops in one decode step of the swapped model (``model(token, past_key_values=
    DynamicCache)`` as generate calls it, after a prefill of ``ids``): (their total ms per step,
    the ``top`` ops as (name, ms per step, calls per step)).  bitlm's native calls are not torch
    ops and do not appear."""
    from torch.profiler import profile
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        nxt = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        with profile() as pr:
            for _ in range(steps):
                nxt = model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    ev = sorted(pr.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev) / 1e3 / steps
    return total, [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in ev[:top]]


def rss_child(args, kind: str) -> dict:
    """Resident memory of one configuration in a fresh process (so freed memory of the other
    does not count): transformers' own layers after the build, or the swapped model after
    accelerate() and an 8-token generate."""
    import subprocess

    cmd = [sys.executable, __file__, "--rss-only", kind, "--layers", str(args.layers),
           "--linear-class", args.linear_class, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_only(args) -> int:
    import resource

    from bitlm.integrations.transformers import accelerate

    torch._dynamo.config.disable = True
    model = build_hf(args.layers, args.linear_class)
    if args.rss_only == "bitlm":
        accelerate(model)
        gc.collect()
        time_generate(model, torch.randint(1000, 100000, (1, 64)), 8)
    print(json.dumps({"rss_bytes": rss(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def swap(model, modules: dict) -> None:
    for name, m in modules.items():
        model.set_submodule(name, m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (2B4T: 30)")
    ap.add_argument("--linear-class", default="bitlinear", choices=["bitlinear", "autobitlinear"])
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="generated tokens (swapped model and engine)")
    ap.add_argument("--hf-decode", type=int, default=3, help="generated tokens on transformers' own layers (slow)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=6,
                    help="then this many back-to-back (swapped, engine) decodes of 12 tokens: the decode ratio "
                         "of runs seconds apart, less exposed to a shared machine's changing load")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--swapped-torch-threads", type=int, default=None,
                    help="torch's threads while the swapped model runs (default: --threads); bitlm's kernels keep "
                         "--threads.  At decode transformers' own ops are tiny and each parallel one wakes torch's pool")
    ap.add_argument("--eager", action="store_true", help="disable torch.compile (transformers compiles its BitNet helpers)")
    ap.add_argument("--json", default=str(HERE / "results" / "transformers.json"))
    ap.add_argument("--rss-only", choices=["own", "bitlm"], help=argparse.SUPPRESS)  # the memory child
    args = ap.parse_args()
    for opt in ("decode", "hf_decode"):  # decode time is the median gap between generated tokens
        if getattr(args, opt) < 2:
            ap.error(f"--{opt.replace('_', '-')} must be at least 2 (decode time is the gap between tokens)")
    if args.pairs < 0:
        ap.error("--pairs must be at least 0")
    if args.rounds < 1 or args.layers < 1 or args.prompt < 1:
        ap.error("--rounds, --layers and --prompt must be at least 1")
    swapped_torch_threads = args.threads if args.swapped_torch_threads is None else args.swapped_torch_threads
    if swapped_torch_threads < 1:
        ap.error("--swapped-torch-threads must be at least 1")
    if args.rss_only:
        torch.set_num_threads(args.threads)
        kernels.set_num_threads(args.threads)
        return rss_only(args)

    import transformers
    from transformers.utils import logging

    from bitlm.integrations.transformers import (
        BitlmDecoderLayer,
        BitlmLinear,
        BitlmRMSNorm,
        _bitnet_layers,
        accelerate,
    )

    logging.set_verbosity_error()
    if args.eager:
        torch._dynamo.config.disable = True
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    info = kernels.backend_info()

    base = rss()
    load_start = os.getloadavg()  # the machine's load: timings on a shared machine are only as good as it
    t0 = time.perf_counter()
    model = build_hf(args.layers, args.linear_class)
    build_s = time.perf_counter() - t0
    originals = dict(_bitnet_layers(model))
    own_proj_bytes = sum(b.numel() * b.element_size() for m in originals.values() for b in m.buffers())
    own_proj_bytes += sum(p.numel() * p.element_size() for m in originals.values() for p in m.parameters())
    print(f"built {args.layers}-layer 2B4T-shaped model ({args.linear_class}) in {build_s:.1f} s", file=sys.stderr)

    accelerate(model)
    swapped = {n: model.get_submodule(n) for n in originals}
    packed_bytes = sum(m.packed.nbytes for m in swapped.values())
    pm = packed_engine(model, originals)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 100000, (1, args.prompt), generator=g)

    # warm-up: torch.compile of transformers' helpers (prefill and decode shapes), caches, pools
    t0 = time.perf_counter()
    swap(model, originals)
    time_generate(model, ids[:, :8], 2)
    time_generate(model, ids, 2)
    warm_own = time.perf_counter() - t0
    swap(model, swapped)
    time_generate(model, ids, 2)
    time_engine(pm, ids, 2)
    print(f"warm-up (transformers' own incl. torch.compile): {warm_own:.1f} s", file=sys.stderr)

    fused_layers = [m for m in model.modules() if isinstance(m, BitlmDecoderLayer)]

    base_model = model.model

    def mode(kind: str) -> None:  # bitlm: one call per step; layers: two per layer; modules: per module
        base_model.bitlm_fused = kind == "bitlm"
        for m in fused_layers:
            m.bitlm_fused = kind != "modules"

    kinds = ("own", "bitlm", "layers", "modules", "engine")
    res: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            if kind == "engine":
                p, d = time_engine(pm, ids, args.decode)
            else:
                swap(model, originals if kind == "own" else swapped)
                mode(kind)
                torch.set_num_threads(args.threads if kind == "own" else swapped_torch_threads)
                p, d = time_generate(model, ids, args.hf_decode if kind == "own" else args.decode)
                torch.set_num_threads(args.threads)
                mode("bitlm")
            res[kind]["prefill"].append(p)
            res[kind]["decode"].extend(d)
            print(f"  round {r + 1} {kind}: prefill {p * 1e3:.0f} ms, decode {statistics.median(d) * 1e3:.1f} ms/token",
                  file=sys.stderr)

    swap(model, swapped)
    pairs = []
    for _ in range(args.pairs):
        torch.set_num_threads(swapped_torch_threads)
        d_acc = statistics.median(time_generate(model, ids, 12)[1])
        torch.set_num_threads(args.threads)
        d_eng = statistics.median(time_engine(pm, ids, 12)[1])
        pairs.append((d_acc * 1e3, d_eng * 1e3))
    assert not list(_bitnet_layers(model)) and all(isinstance(m, BitlmLinear) for m in swapped.values())
    norms = [m for m in model.modules() if isinstance(m, BitlmRMSNorm)]
    torch.set_num_threads(swapped_torch_threads)
    modules_s = time_modules(list(swapped.values()) + norms, model.lm_head)
    hfs = [m._bitlm_state(torch.bfloat16) for m in fused_layers]
    fused_s = (time_fused(hfs, model.lm_head, args.prompt + args.decode // 2) if hfs and all(h is not None for h in hfs)
               else float("nan"))
    split = split_step(model, ids)
    mode("layers")
    split_layers = split_step(model, ids)
    mode("bitlm")
    torch_ms, top_ops = profile_step(model, ids)
    torch.set_num_threads(args.threads)
    del originals, pm, model
    gc.collect()
    mem = {k: rss_child(args, k) for k in ("own", "bitlm")}
    rss_own, rss_swapped = mem["own"]["rss_bytes"], mem["bitlm"]["rss_bytes"]

    def med(x: list[float]) -> float:
        return statistics.median(x)

    rows = {}
    for kind in res:
        p, d = med(res[kind]["prefill"]), med(res[kind]["decode"])
        rows[kind] = {"prefill_ms": p * 1e3, "prefill_tok_s": args.prompt / p, "decode_ms": d * 1e3,
                      "decode_tok_s": 1 / d, "decode_samples": len(res[kind]["decode"])}
    own, acc, eng, mods, lay = rows["own"], rows["bitlm"], rows["engine"], rows["modules"], rows["layers"]
    out = {
        "cpu": cpu_model(), "kernels": info, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": args.threads, "swapped_torch_threads": swapped_torch_threads, "layers": args.layers,
        "linear_class": args.linear_class, "prompt": args.prompt,
        "decode_tokens": args.decode, "hf_decode_tokens": args.hf_decode, "rounds": args.rounds,
        "torch_compile": not args.eager, "rows": rows,
        "decode_speedup_vs_transformers": acc["decode_tok_s"] / own["decode_tok_s"],
        "prefill_speedup_vs_transformers": acc["prefill_tok_s"] / own["prefill_tok_s"],
        "decode_vs_engine": acc["decode_tok_s"] / eng["decode_tok_s"],
        "decode_per_module_vs_engine": mods["decode_tok_s"] / eng["decode_tok_s"],
        "decode_per_layer_vs_engine": lay["decode_tok_s"] / eng["decode_tok_s"],
        "fused_layers": len(fused_layers), "decode_fused_native_ms": fused_s * 1e3,
        "prefill_vs_engine": acc["prefill_tok_s"] / eng["prefill_tok_s"],
        "paired_decode_ms": [{"swapped": a, "engine": e} for a, e in pairs],
        "paired_decode_vs_engine": statistics.median(e / a for a, e in pairs) if pairs else None,
        "decode_fused_step_split_ms": split, "decode_per_layer_step_split_ms": split_layers,
        "decode_kernels_alone_ms": modules_s * 1e3, "decode_torch_ops_ms": torch_ms,
        "decode_torch_top_ops": [{"op": k, "ms_per_step": t, "calls_per_step": c} for k, t, c in top_ops],
        "rss_baseline_bytes": base, "rss_transformers_bytes": rss_own, "rss_swapped_bytes": rss_swapped,
        "peak_rss_swapped_bytes": mem["bitlm"]["peak_rss_bytes"],
        "projection_bytes_transformers": own_proj_bytes, "projection_bytes_bitlm": packed_bytes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
    }
    print(f"\n2B4T-shaped, {args.layers} layers, {args.linear_class}, bf16 floats, {args.threads} threads "
          f"(torch {swapped_torch_threads} while the swapped model runs), "
          f"{info.get('tier')} kernels, {cpu_model()}, load average {out['loadavg_start'][0]:.2f} -> "
          f"{out['loadavg_end'][0]:.2f}")
    print(f"{'path':<28}{'prefill ms':>12}{'tok/s':>9}{'decode ms/tok':>15}{'tok/s':>9}")
    names = {"own": "transformers (own BitNet)", "bitlm": "transformers + bitlm", "layers": "  (2 calls per layer)",
             "modules": "  (per module, unfused)", "engine": "bitlm engine (bf16 head)"}
    for k, r in rows.items():
        print(f"{names[k]:<28}{r['prefill_ms']:>12.0f}{r['prefill_tok_s']:>9.1f}{r['decode_ms']:>15.1f}"
              f"{r['decode_tok_s']:>9.2f}")
    print(f"decode: {out['decode_speedup_vs_transformers']:.1f}x transformers' own, "
          f"{100 * out['decode_vs_engine']:.0f} % of the engine; prefill: "
          f"{out['prefill_speedup_vs_transformers']:.1f}x, {100 * out['prefill_vs_engine']:.0f} % of the engine")
    if pairs:
        print(f"paired decode ({len(pairs)} back-to-back 12-token runs): swapped "
              f"{statistics.median(a for a, _ in pairs):.1f} ms, engine {statistics.median(e for _, e in pairs):.1f} ms "
              f"per token; median ratio {100 * out['paired_decode_vs_engine']:.0f} % of the engine")
    print(f"decode step, swapped: {acc['decode_ms']:.1f} ms = {fused_s * 1e3:.1f} ms in bitlm's native work (the "
          f"one call over {len(fused_layers)} layers and the head, called alone) + "
          f"{acc['decode_ms'] - fused_s * 1e3:.1f} ms in transformers (embedding, RoPE, final norm, Python, generate)")
    gen_ms = statistics.median(a for a, _ in pairs) if pairs else acc["decode_ms"]  # pairs: nearest in time
    print(f"one swapped decode step inside the model (model(token), no generate): {split['forward']:.1f} ms = the "
          f"layers' one call {split['stack']:.1f} + head {split['head']:.1f} + rest (transformers' and bitlm's Python) "
          f"{split['rest']:.1f} ms; generate adds {gen_ms - split['forward']:.1f} ms (against the "
          f"{'paired' if pairs else 'rounds'} decode median)")
    sl = split_layers
    print(f"  with 2 calls per layer: {sl['forward']:.1f} ms = native q/k/v {sl['qkv']:.1f} + native rest of the "
          f"layers {sl['out']:.1f} + head {sl['head']:.1f} + transformers' attention {sl['attention']:.1f} + cache "
          f"update {sl['cache_update']:.1f} + rest (transformers' Python) {sl['rest']:.1f} ms")
    print(f"decode step, per module: {mods['decode_ms']:.1f} ms = {modules_s * 1e3:.1f} ms in bitlm's modules (the "
          f"{len(swapped)} projections, {len(norms)} norms and the head called alone) + "
          f"{mods['decode_ms'] - modules_s * 1e3:.1f} ms in transformers (RoPE, cache, attention, residuals, Python, "
          "generate)")
    print(f"torch ops in one swapped decode step (profiler, self time): {torch_ms:.1f} ms; top: " + ", ".join(
        f"{k.removeprefix('aten::')} {t:.2f} ms/{c:.0f}" for k, t, c in top_ops))
    print(f"RSS (fresh processes): {rss_own / 2**20:.0f} MiB with transformers' layers, {rss_swapped / 2**20:.0f} MiB "
          f"swapped after generating (peak {mem['bitlm']['peak_rss_bytes'] / 2**20:.0f} MiB); projections "
          f"{own_proj_bytes / 2**20:.0f} -> {packed_bytes / 2**20:.0f} MiB")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
