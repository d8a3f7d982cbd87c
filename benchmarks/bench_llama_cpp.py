"""llama.cpp (through llama-cpp-python) on a 2B4T-shaped model with random ternary weights.

The reference side of ``bench_engine.py --llama-cpp``, and a benchmark of its own:

    python benchmarks/bench_llama_cpp.py                          # TQ2_0/TQ1_0 x q8_0/f16 head, 1 and 2 threads
    python benchmarks/bench_llama_cpp.py --threads 2 --formats tq2_0 --heads q8_0 --json /tmp/l.json

The model is a llama.cpp ``bitnet`` GGUF (the architecture, metadata keys and tensor names of
``bitlm.io.gguf``) with uniformly random ternary projections (scale 0.02, about 1/3 zeros), a
random tied embedding that is also the output head (as in microsoft/bitnet-b1.58-2B-4T) and a
synthetic byte-level vocabulary of the full 128256 tokens.  It is written one tensor at a time
straight into the file (no float model of the network exists at any point) and cached in
``~/.cache/bitlm/bench``.  llama.cpp's bitnet graph is SiLU-gated where 2B4T is ReLU²-gated: the
cost per token is the same, the function is not — this is a speed reference only.

Each (format, head, threads) configuration runs in a fresh process: load (mmap), prompt
processing of 128 and 512 random token ids (best of 2, KV cache cleared between), then a
16-token prompt and 128 single-token ``eval`` calls (greedy: argmax of the logits, as
bench_engine does), reporting the median token after 4 warm-up tokens, and VmHWM as peak RSS.
"""

from __future__ import annotations

import os
import sys

if "--_run" not in sys.argv:  # not in the llama.cpp child: it keeps OpenMP's defaults (see below)
    import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

import argparse
import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FORMATS = ("tq2_0", "tq1_0")
HEADS = ("q8_0", "f16")
DEFAULT_CACHE = os.path.expanduser("~/.cache/bitlm/bench")
N_CTX = 1024
N_BATCH = 512
WEIGHT_SCALE = 0.02
FILE_VERSION = 1  # bump when the file's contents change, so cached files are rebuilt
_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")


# =============================================================================================
# The GGUF file
# =============================================================================================


def _config(preset: Any):
    from bitlm.config import ModelConfig
    from bitlm.config import preset as make_preset

    return preset if isinstance(preset, ModelConfig) else make_preset(preset, quant="b1.58")


def gguf_path(preset: str = "2b4t", ternary_type: str = "tq2_0", head_type: str = "q8_0", seed: int = 0,
              cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Where :func:`build_gguf` caches a file by default."""
    tail = "" if seed == 0 else f"-s{seed}"
    return Path(cache_dir) / f"{preset}-{ternary_type}-{head_type}-llamacpp-v{FILE_VERSION}{tail}.gguf"


def _bytes_to_unicode() -> list[str]:
    """The printable character that byte-level BPE vocabularies (GPT-2, LLaMA 3) use for each
    byte value: printable Latin-1 stands for itself, the other bytes are moved to U+0100 onward."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return out


def synthetic_vocab(vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE vocabulary of ``vocab_size`` tokens laid out like 2B4T's: the 256 byte
    tokens, a few merge results, printable filler tokens up to ``vocab_size - 256``, then 256
    control tokens (``<|begin_of_text|>`` = bos, ``<|end_of_text|>`` = eos, reserved ones).
    Enough for llama.cpp to load a ``gpt2`` tokenizer; the benchmark feeds token ids directly."""
    from bitlm.io.gguf import _TT_CONTROL, _TT_NORMAL

    n_special = 256 if vocab_size >= 1024 else 2
    byte_tokens = _bytes_to_unicode()
    sp, nl = byte_tokens[ord(" ")], byte_tokens[ord("\n")]
    pairs = [(sp, sp), (sp, "t"), (sp, "a"), ("h", "e"), ("i", "n"), (nl, nl)]
    tokens = byte_tokens + [a + b for a, b in pairs]
    n_normal = vocab_size - n_special
    if n_normal < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level vocabulary")
    tokens += [f"[fill{i}]" for i in range(len(tokens), n_normal)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(n_special - len(specials))]
    types = [_TT_NORMAL] * n_normal + [_TT_CONTROL] * n_special
    return {"tokens": tokens + specials, "types": types, "merges": [f"{a} {b}" for a, b in pairs],
            "bos": n_normal, "eos": n_normal + 1, "n_normal": n_normal}


def build_gguf(path: str | Path | None = None, preset: Any = "2b4t", ternary_type: str = "tq2_0",
               head_type: str = "q8_0", seed: int = 0, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """A llama.cpp ``bitnet`` GGUF of the ``preset`` shape with uniformly random ternary
    projections (scale 0.02) and a random N(0, 0.02²) tied embedding in ``head_type``; returns
    its path (default: :func:`gguf_path` in ``cache_dir``).  An existing file is reused.

    Tensors are generated, quantised (``gguf.quants``, checked by ``bitlm.io.gguf``'s encoder)
    and written one at a time, so peak memory is about one tensor; the file appears atomically."""
    import gguf
    import numpy as np
    import torch

    from bitlm.io.atomic import atomic_write
    from bitlm.io.gguf import (
        _ARCH_TO_ACTIVATION,
        _FILE_TYPE,
        ACTIVATION_KEY,
        ARCH,
        QK_K,
        _encode_float,
        _encode_ternary,
        write_hparams,
        write_vocab,
    )

    if ternary_type not in FORMATS:
        raise ValueError(f"ternary_type must be one of {FORMATS}, got {ternary_type!r}")
    if head_type not in HEADS:
        raise ValueError(f"head_type must be one of {HEADS}, got {head_type!r}")
    cfg = _config(preset)
    if path is None:
        if not isinstance(preset, str):
            raise ValueError("give a path when preset is a ModelConfig")
        path = gguf_path(preset, ternary_type, head_type, seed, cache_dir)
    path = Path(path)
    if path.exists():
        return path
    d, f, hd, V = cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.vocab_size
    if d % QK_K or f % QK_K or (cfg.n_heads * hd) % QK_K:
        raise ValueError(f"{cfg.arch} d={d}, ffn={f}: TQ1_0/TQ2_0 need rows that are multiples of {QK_K}")
    qtype = gguf.GGMLQuantizationType.TQ2_0 if ternary_type == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    htype = gguf.GGMLQuantizationType.Q8_0 if head_type == "q8_0" else gguf.GGMLQuantizationType.F16
    s16 = np.float32(np.float16(WEIGHT_SCALE))
    qd, kvd = cfg.n_heads * hd, cfg.kv_heads * hd
    proj_shapes = {"attn_q": (qd, d), "attn_k": (kvd, d), "attn_v": (kvd, d), "attn_output": (d, qd),
                   "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    norm_dims = {"attn_norm": d, "attn_sub_norm": qd, "ffn_norm": d, "ffn_sub_norm": f}
    vocab = synthetic_vocab(V)

    # (name, (numpy dtype of the data, shape as written), producer of the data)
    plan: list[tuple[str, Any, Any, Any, Any]] = []

    def head() -> np.ndarray:
        rng = np.random.default_rng([seed, 1 << 20])
        chunks = []
        for r0 in range(0, V, 8192):  # ~80 MB of float32 at a time
            w = rng.standard_normal((min(8192, V - r0), d), dtype=np.float32) * np.float32(WEIGHT_SCALE)
            chunks.append(_encode_float(w, head_type, "token_embd.weight", gguf)[0])
        return np.concatenate(chunks, axis=0)

    def ternary(layer: int, j: int, name: str, shape: tuple[int, int]) -> Any:
        def make() -> np.ndarray:
            t = np.random.default_rng([seed, layer, j]).integers(-1, 2, size=shape, dtype=np.int8)
            return _encode_ternary(torch.from_numpy(t), s16, qtype, name, gguf)[0]
        return make

    def ones(n: int) -> Any:
        return lambda: np.ones(n, dtype=np.float32)

    if htype == gguf.GGMLQuantizationType.F16:
        plan.append(("token_embd.weight", np.float16, (V, d), None, head))
    else:
        plan.append(("token_embd.weight", np.uint8, gguf.quants.quant_shape_to_byte_shape((V, d), htype), htype, head))
    plan.append(("output_norm.weight", np.float32, (d,), None, ones(d)))
    for i in range(cfg.n_layers):
        for nm in _NORMS:
            plan.append((f"blk.{i}.{nm}.weight", np.float32, (norm_dims[nm],), None, ones(norm_dims[nm])))
        for j, nm in enumerate(_PROJ):
            name = f"blk.{i}.{nm}.weight"
            plan.append((name, np.uint8, gguf.quants.quant_shape_to_byte_shape(proj_shapes[nm], qtype), qtype,
                         ternary(i, j, name, proj_shapes[nm])))

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name(f"bitlm benchmark: random ternary {cfg.arch} ({ternary_type}, head {head_type})")
        w.add_file_type(_FILE_TYPE[ternary_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, cfg)
        w.add_string(ACTIVATION_KEY, _ARCH_TO_ACTIVATION.get(cfg.arch, "silu"))
        write_vocab(w, vocab, "llama-bpe")
        for name, dtype, shape, raw, _ in plan:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            w.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        t0 = time.perf_counter()
        for k, (name, dtype, shape, _, make) in enumerate(plan):
            if k % 16 == 0 or k == len(plan) - 1:
                print(f"  {path.name}: tensor {k + 1}/{len(plan)} ({time.perf_counter() - t0:.0f} s)",
                      end="\r", file=sys.stderr, flush=True)
            arr = np.ascontiguousarray(make())
            if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
                raise RuntimeError(f"{name}: produced {arr.dtype}{arr.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
            w.write_tensor_data(arr)
        w.close()
        print(file=sys.stderr)

    atomic_write(path, write)
    return path


def weight_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of the ternary projections and of the head (``token_embd``, tied) in a GGUF."""
    from bitlm.io.gguf import read_gguf

    with read_gguf(path) as g:
        tern = sum(t.nbytes for n, t in g.tensors.items() if n.split(".")[-2] in _PROJ)
        head = g.tensors["output.weight" if "output.weight" in g.tensors else "token_embd.weight"].nbytes
    return {"ternary": tern, "head": head}


# =============================================================================================
# Measuring (in a fresh process per configuration)
# =============================================================================================


def _hwm() -> int:
    """Peak RSS of this process (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(path: str, threads: int, decode_tokens: int, prefill: list[int], depth: int = 0) -> dict:
    """Runs inside a fresh process: load, prompt processing, decode; speeds and peak RSS.
    ``depth``: the decode runs after a prompt of ``depth`` + 16 tokens (llama.cpp's f16 KV cache
    then holds that many rows), instead of 16."""
    if "bitlm" in sys.modules:  # its import would have set OMP_WAIT_POLICY for llama.cpp's OpenMP too
        raise RuntimeError("the llama.cpp child process imported bitlm")
    import llama_cpp
    import numpy as np

    base_rss = _hwm()  # python + numpy + llama.cpp's libraries, before the model exists
    t0 = time.perf_counter()
    n_ctx = max(N_CTX, depth + 16 + decode_tokens + 16)
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=N_BATCH, logits_all=False, verbose=False)
    out: dict = {"load_s": time.perf_counter() - t0}
    n_vocab = llm.n_vocab()
    rng = random.Random(1)
    hi = min(n_vocab, 128000)  # ordinary (non-control) token ids

    def ids(n: int) -> list[int]:
        return [rng.randrange(hi) for _ in range(n)]

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    llm.reset()
    llm.eval(ids(8))  # warm-up: pages in the weights
    for n in prefill:
        if n > n_ctx:
            continue
        toks = ids(n)
        best = float("inf")
        for _ in range(2):
            llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
            t = time.perf_counter()
            llm.eval(toks)
            best = min(best, time.perf_counter() - t)
        out[f"prefill_{n}_tok_s"] = n / best
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids(depth + 16))
    out["context_fill_s"] = time.perf_counter() - t
    nxt = greedy()
    for _ in range(4):  # warm-up decode steps
        llm.eval([nxt])
        nxt = greedy()
    times = []
    for _ in range(decode_tokens - 4):
        t = time.perf_counter()
        llm.eval([nxt])
        nxt = greedy()
        times.append(time.perf_counter() - t)
    times.sort()
    out["decode_tok_s"] = 1.0 / times[len(times) // 2]
    out["decode_mean_tok_s"] = len(times) / sum(times)
    out["decode_p90_ms"] = 1e3 * times[int(0.9 * (len(times) - 1))]
    out["n_vocab"] = n_vocab
    out["depth"], out["kv"], out["n_ctx"] = depth, "f16", n_ctx
    out["peak_rss_bytes"] = _hwm()
    out["baseline_rss_bytes"] = base_rss
    return out


def _bandwidth(threads: list[int]) -> dict[int, float]:
    """Read bandwidth per thread count, by bench_engine's probe (bitlm's native kernels); {} if
    the native kernels are not available."""
    try:
        sys.path.insert(0, str(HERE))
        from bench_engine import measure_bandwidth

        os.environ.setdefault("BITLM_BACKEND", "native")
        return {t: measure_bandwidth(t) for t in threads}
    except Exception as e:  # noqa: BLE001 - the roofline column is optional
        print(f"bandwidth probe skipped: {e}", file=sys.stderr)
        return {}


def llama_cpp_info() -> dict[str, str]:
    try:
        import llama_cpp
    except ImportError:
        return {}
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}


def run_llama_cpp(args: Any, threads: list[int]) -> list[dict]:
    """Rows for every (format, head, threads): llama.cpp on the ``args.preset`` shape, each in a
    fresh process.  ``args`` needs nothing (bench_engine's namespace works): preset, cache_dir,
    decode_tokens, prefill, llama_formats and llama_heads are read when present."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"llama.cpp rows skipped: {e}", file=sys.stderr)
        return []
    preset = getattr(args, "preset", "2b4t")
    cache_dir = getattr(args, "cache_dir", DEFAULT_CACHE)
    decode_tokens = int(getattr(args, "decode_tokens", 128))
    depths = [int(x) for x in _csv(str(getattr(args, "depth", "0") or "0"))]
    prefill = str(getattr(args, "prefill", "128,512"))
    formats = _csv(getattr(args, "llama_formats", None) or ",".join(FORMATS))
    heads = _csv(getattr(args, "llama_heads", None) or ",".join(HEADS))
    cfg = _config(preset)
    if cfg.d_model % 256 or cfg.ffn_dim % 256:
        print(f"llama.cpp rows skipped: preset {preset} has rows that are not multiples of 256 (TQ1_0/TQ2_0)",
              file=sys.stderr)
        return []
    bw = _bandwidth(threads)
    kv_bytes = 2 * cfg.n_layers * N_CTX * cfg.kv_heads * cfg.head_dim * 2  # f16 K and V for n_ctx
    rows = []
    for fmt in formats:
        for head in heads:
            path = build_gguf(None, preset, fmt, head, cache_dir=cache_dir)
            wb = weight_bytes(path)
            for t, depth in [(t, d) for d in depths for t in threads]:
                row: dict[str, Any] = {"engine": "llama.cpp", "format": fmt, "head": head, "threads": t}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_run", f"{path}:{t}",
                       "--decode-tokens", str(decode_tokens), "--prefill", prefill, "--depth", str(depth)]
                env = {**os.environ, "OMP_NUM_THREADS": str(t)}
                # llama.cpp runs with its own OpenMP defaults (bitlm's PASSIVE setting is for torch;
                # ggml's OpenMP threads wait between tokens and measured slower with it)
                env.pop("OMP_WAIT_POLICY", None)
                if os.environ.get("LLAMA_OMP_WAIT_POLICY"):
                    env["OMP_WAIT_POLICY"] = os.environ["LLAMA_OMP_WAIT_POLICY"]
                load_before = os.getloadavg()[0]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                    ok = r.returncode == 0
                    err = r.stderr
                except subprocess.TimeoutExpired as e:
                    ok, err = False, f"timed out after {e.timeout} s"
                if not ok:
                    print(f"llama.cpp {fmt}/{head} at {t} threads failed:\n{err[-3000:]}", file=sys.stderr)
                    row["error"] = err.strip().splitlines()[-1] if err.strip() else "failed"
                else:
                    row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                # other processes on the machine skew 2-thread runs most (spinning barriers)
                row.update(load_avg_1m_before=load_before, load_avg_1m_after=os.getloadavg()[0])
                row.update(file_bytes=os.path.getsize(path), ternary_bytes=wb["ternary"], head_bytes=wb["head"],
                           bytes_per_token=wb["ternary"] + wb["head"], kv_cache_bytes=kv_bytes, n_ctx=N_CTX)
                if t in bw:
                    row["bandwidth_gb_s"] = bw[t]
                    row["roofline_tok_s"] = bw[t] * 1e9 / row["bytes_per_token"]
                    if "decode_tok_s" in row:
                        row["pct_of_roofline"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
                if "peak_rss_bytes" in row:
                    row["rss_over_file_plus_kv"] = (row["peak_rss_bytes"] - row["baseline_rss_bytes"]) / (
                        row["file_bytes"] + kv_bytes)
                rows.append(row)
                print(f"  llama.cpp {fmt}/{head} {t} thr, depth {depth}: decode "
                      f"{row.get('decode_tok_s', float('nan')):.1f} tok/s",
                      file=sys.stderr, flush=True)
    return rows


# =============================================================================================
# Standalone
# =============================================================================================


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def print_table(rows: list[dict]) -> None:
    hdr = (f"{'engine':<10}{'fmt':<7}{'head':<6}{'thr':>4}{'pp128':>9}{'pp512':>9}{'decode':>9}{'mean':>8}"
           f"{'roof%':>7}{'MB/tok':>9}{'file MB':>9}{'RSS MB':>9}{'load s':>8}")
    print(hdr)
    print("-" * len(hdr))

    def g(r: dict, k: str, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
        return fmt.format(r[k] * scale) if r.get(k) is not None else "-"

    for r in rows:
        print(f"{r['engine']:<10}{r['format']:<7}{r['head']:<6}{r['threads']:>4}{g(r, 'prefill_128_tok_s'):>9}"
              f"{g(r, 'prefill_512_tok_s'):>9}{g(r, 'decode_tok_s'):>9}{g(r, 'decode_mean_tok_s'):>8}"
              f"{g(r, 'pct_of_roofline', '{:.0f}'):>7}{g(r, 'bytes_per_token', '{:.1f}', 1e-6):>9}"
              f"{g(r, 'file_bytes', '{:.0f}', 1e-6):>9}{g(r, 'peak_rss_bytes', '{:.0f}', 1e-6):>9}"
              f"{g(r, 'load_s', '{:.2f}'):>8}" + (f"  ERROR: {r['error']}" if r.get("error") else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--formats", dest="llama_formats", default=",".join(FORMATS))
    ap.add_argument("--heads", dest="llama_heads", default=",".join(HEADS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill", default="128,512")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--json", default="benchmarks/results/llama_cpp.json")
    ap.add_argument("--depth", default="0", help="context depths to decode at, comma separated (e.g. 0,1024,4096): "
                    "the decode follows a prompt of this many + 16 tokens (f16 KV cache)")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefill = [int(x) for x in _csv(args.prefill)]
    if args._run:
        path, threads = args._run.rsplit(":", 1)
        print(json.dumps(run_one(path, int(threads), args.decode_tokens, prefill, int(args.depth))))
        return 0
    # only now: the --_run child above must never import bitlm, whose import sets
    # OMP_WAIT_POLICY=PASSIVE for torch (llama.cpp's OpenMP measured 28 -> 18 tok/s with it)
    from bitlm.info import cpu_model

    if args.decode_tokens < 8:
        ap.error("--decode-tokens must be at least 8")
    threads = [int(t) for t in _csv(args.threads)]
    load = os.getloadavg()
    rows = run_llama_cpp(args, threads)
    info = llama_cpp_info()
    print(f"\n{cpu_model()} — llama-cpp-python {info.get('llama_cpp_python', '?')}; "
          f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print_table(rows)
    out = {"cpu": cpu_model(), **info, "preset": args.preset, "n_ctx": N_CTX, "n_batch": N_BATCH,
           "load_average_start": load, "load_average_end": os.getloadavg(), "rows": rows,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
