"""The ik_llama.cpp side of ``bench_engine.py``: the fastest CPU BitNet engine we know of, on the
same random weights as bitlm's side.

ik_llama.cpp (github ikawrakow/ik_llama.cpp) is not a Python package: build its ``llama-bench``
yourself (CPU only, ``-DGGML_NATIVE=ON``; docs/performance.md has the commands) and name it with
``bench_engine.py --ik-bench PATH`` or ``BITLM_IK_BENCH=PATH``.  The model file is written here,
not converted: the projections and the tied embedding are drawn from the same generator, in the
same order, as ``bench_engine.build_random_packed`` draws bitlm's (so both engines multiply the
same ternary matrices), and stored in ik's ``bitnet-25`` architecture (its 2B4T graph: ReLU²,
sub-norms, tied head) with IQ2_BN_R4 projections (2.0 bpw, 4 rows interleaved, a float scale per
row) and a q8_0 embedding/head, by bitlm's own GGUF encoders (``bitlm.io.gguf``, whose IQ2_BN_R4
bytes tests/test_gguf_ik.py checks against ik_llama.cpp's own outputs).

Timing is ik's: ``llama-bench -m FILE -t T -p 128,512 -n N -r R -o json`` (flash attention and
f16 KV by default, mmap); pp = prompt tokens ÷ time, tg = N generated tokens ÷ time from an
empty cache.  ik's threads must not inherit bitlm's ``OMP_WAIT_POLICY=PASSIVE`` (see
bench_llama_cpp.py): the child environment drops it.

    python benchmarks/bench_ik.py --ik-bench ~/ik/build/bin/llama-bench --threads 2   # ik alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = os.path.expanduser("~/.cache/bitlm/bench")
ENV_BENCH = "BITLM_IK_BENCH"
WEIGHT_SCALE = 0.02  # as bench_engine.build_random_packed


def find_llama_bench(path: str | None) -> Path | None:
    """The ik_llama.cpp ``llama-bench`` named by ``path`` or $BITLM_IK_BENCH; None if neither is
    given; an error naming the option if the file is not an executable."""
    p = path or os.environ.get(ENV_BENCH)
    if not p:
        return None
    q = Path(os.path.expanduser(p))
    if not (q.is_file() and os.access(q, os.X_OK)):
        raise SystemExit(f"--ik-bench / {ENV_BENCH}: {q} is not an executable llama-bench")
    return q


def ik_gguf_path(preset: str, seed: int = 0, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    return Path(cache_dir) / f"ik-{preset}-iq2_bn_r4-q8_0-s{seed}.gguf"


def build_ik_gguf(preset: str = "2b4t", seed: int = 0, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The ``bitnet-25`` IQ2_BN_R4 / q8_0 GGUF of bench_engine's random ``preset`` model (seed
    ``seed``); an existing file is reused.  Tensors are made and written one at a time."""
    import gguf
    import numpy as np
    import torch

    from bench_llama_cpp import synthetic_vocab
    from bitlm.config import preset as make_preset
    from bitlm.io import gguf_types as GT
    from bitlm.io.atomic import atomic_write
    from bitlm.io.gguf import _encode_bn, _encode_float, gguf_architecture, write_hparams, write_vocab

    path = ik_gguf_path(preset, seed, cache_dir)
    if path.exists():
        return path
    cfg = make_preset(preset, quant="b1.58")
    arch = gguf_architecture(cfg.arch, "iq2_bn_r4")
    if arch != "bitnet-25":
        raise SystemExit(f"preset {preset}: a {cfg.arch} model has no ik_llama.cpp bitnet-25 graph")
    d, hd, f, V = cfg.d_model, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    type_id = GT.TERNARY_TYPE_IDS["iq2_bn_r4"]
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([WEIGHT_SCALE])

    def enc(name: str, t: torch.Tensor) -> tuple[Any, Any]:
        arr, tid = _encode_bn(t, scale, type_id, name)
        if tid is None:
            raise SystemExit(f"{name}: shape {tuple(t.shape)} does not fit IQ2_BN_R4 (rows of >= 512, 4-row groups)")
        return arr

    vocab = synthetic_vocab(V)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(f"bitlm benchmark: random ternary {cfg.arch} (iq2_bn_r4, head q8_0)")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, cfg)
        write_vocab(w, vocab, "llama-bpe")
        # the draw order of build_random_packed: per layer q, k, v, o, up (gate rows, then up
        # rows), down; then the embedding
        blocks = []
        t0 = time.perf_counter()
        for i in range(cfg.n_layers):
            print(f"  {path.name}: layer {i + 1}/{cfg.n_layers} ({time.perf_counter() - t0:.0f} s)", end="\r",
                  file=sys.stderr, flush=True)

            def rand(n: int, k: int) -> torch.Tensor:
                return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)

            q, k, v, o = rand(cfg.n_heads * hd, d), rand(cfg.kv_heads * hd, d), rand(cfg.kv_heads * hd, d), \
                rand(d, cfg.n_heads * hd)
            up, down = rand(2 * f, d), rand(d, f)
            p = f"blk.{i}."
            blocks += [(p + "attn_q.weight", enc("attn_q", q)), (p + "attn_k.weight", enc("attn_k", k)),
                       (p + "attn_v.weight", enc("attn_v", v)), (p + "attn_output.weight", enc("attn_output", o)),
                       (p + "ffn_gate.weight", enc("ffn_gate", up[:f])), (p + "ffn_up.weight", enc("ffn_up", up[f:])),
                       (p + "ffn_down.weight", enc("ffn_down", down))]
            for nm, n in (("attn_norm", d), ("attn_sub_norm", cfg.n_heads * hd), ("ffn_norm", d), ("ffn_sub_norm", f)):
                blocks.append((p + nm + ".weight", np.ones(n, dtype=np.float32)))
        emb = (torch.randn(V, d, generator=g) * WEIGHT_SCALE).numpy()
        head, htype = _encode_float(emb, "q8_0", "token_embd.weight", gguf)
        del emb
        w.add_tensor("token_embd.weight", head, raw_dtype=htype)
        w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
        for name, arr in blocks:
            if isinstance(arr, tuple):  # (bytes, logical shape) of an ik type gguf does not know
                w.add_tensor(name, arr[0].view(np.int8), raw_shape=arr[1], raw_dtype=type_id)
            else:
                w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(file=sys.stderr)

    atomic_write(path, write)
    return path


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of the ternary projections and of the (tied) head in the ik GGUF."""
    from bitlm.io.gguf import read_gguf

    out = {"ternary": 0, "head": 0}
    with read_gguf(path) as f:
        for name, t in f.tensors.items():
            if name == "token_embd.weight":
                out["head"] += t.nbytes
            elif name.endswith("_norm.weight"):
                continue
            else:
                out["ternary"] += t.nbytes
    return out


def run_ik(bench: Path, model: Path, threads: int, prefill: list[int], decode_tokens: int, reps: int = 3,
           timeout: float = 1800) -> dict:
    """One llama-bench run (pp for every prefill length, tg for decode_tokens) → tok/s medians
    as ik reports them (avg_ts over ``reps`` repetitions), with the load average around it."""
    cmd = [str(bench), "-m", str(model), "-t", str(threads), "-p", ",".join(str(p) for p in prefill),
           "-n", str(decode_tokens), "-r", str(reps), "-o", "json"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    load_before = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    row: dict[str, Any] = {"engine": "ik_llama.cpp", "format": "iq2_bn_r4", "head": "q8_0", "threads": threads,
                           "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
                           "command": " ".join(cmd)}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"ik_llama.cpp at {threads} threads failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        row["error"] = tail
        return row
    text = r.stdout[r.stdout.index("["):] if "[" in r.stdout else r.stdout
    for e in json.loads(text):
        npr, ngen = int(e.get("n_prompt", 0)), int(e.get("n_gen", 0))
        if npr and not ngen:
            row[f"prefill_{npr}_tok_s"] = float(e["avg_ts"])
        elif ngen and not npr:
            row["decode_tok_s"] = float(e["avg_ts"])
            row["decode_samples_tok_s"] = e.get("samples_ts")
        row.setdefault("build_commit", e.get("build_commit"))
        row.setdefault("cpu_info", e.get("cpu_info"))
    return row


def main() -> int:
    sys.path.insert(0, str(HERE))
    import bitlm  # noqa: F401  (sets the environment the parent of every engine shares)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ik-bench", default=None, help=f"ik_llama.cpp llama-bench (or ${ENV_BENCH})")
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--prefill", default="128,512")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    args = ap.parse_args()
    bench = find_llama_bench(args.ik_bench)
    if bench is None:
        raise SystemExit(f"--ik-bench: give ik_llama.cpp's llama-bench (or set {ENV_BENCH})")
    model = build_ik_gguf(args.preset, cache_dir=args.cache_dir)
    for t in (int(x) for x in args.threads.split(",")):
        print(json.dumps(run_ik(bench, model, t, [int(p) for p in args.prefill.split(",")], args.decode_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
