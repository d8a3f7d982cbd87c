"""``bitlm serve`` under concurrent streaming clients: aggregate decode tokens/s, time to first
token (TTFT) and time per output token (TPOT) at 1, 2, 4 and 8 concurrent streams.

The model is bench_engine's 2B4T-shaped packed model with random ternary weights (i2, int8 head
run W8A8 with ``--head-act int8``), beside a byte-level tokenizer file (256 bytes + EOS; the
model's other ids decode to nothing, so each streamed chunk is counted by its logprobs entry:
the requests ask for ``logprobs=0``, which makes every token its own chunk).  The server runs as
``bitlm serve`` in its own process on 127.0.0.1; the clients are threads streaming
``/v1/completions`` (greedy, a fixed ``--prompt-tokens``-token prompt of random bytes,
``--max-tokens`` tokens, ``ignore`` nothing: random weights almost never emit EOS).

Per concurrency level c, c client threads each send ``--requests`` requests back to back.
Reported (medians over ``--rounds`` interleaved rounds of all levels):

* ``agg_tok_s``   — output tokens of all requests / wall time of the level (prefill included);
* ``decode_tok_s`` — c / median TPOT: the steady decode rate of c streams sharing steps;
* ``ttft_ms`` / ``tpot_ms`` — medians over requests; TPOT = (last - first token) / (tokens - 1).

llama-cpp-python's server (``python -m llama_cpp.server``) runs the same load on bench_llama_cpp's
GGUF of the same shape (TQ2_0 projections, q8_0 head) with ``--llama-cpp``, when the package is
installed (``make test-llama``, or ``pip install 'bitlm[llama]'`` plus its server extra, a ~7
minute build); otherwise that side is reported as skipped.  Its requests ask for no logprobs
(its filler tokens all have text, so a chunk with text is a token) and it runs with
``--logits_all False``: its logprobs path sorts the 128k vocabulary in Python per token.

    python benchmarks/bench_serve.py                                  # 2b4t shape (builds ~0.9 GB once)
    python benchmarks/bench_serve.py --preset tiny-2b4t --max-tokens 16 --requests 1 --rounds 1  # smoke test

Writes a table to stdout and JSON (CPU model, kernel tier, every number) to --json.
"""

from __future__ import annotations

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import argparse
import importlib.util
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bitlm.info import cpu_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CACHE = Path(os.environ.get("BITLM_BENCH_CACHE", Path.home() / ".cache" / "bitlm" / "bench"))


def byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json: ids 0-255 are the bytes, 256 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from bench_llama_cpp import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    vocab["<|endoftext|>"] = 256
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    t.save(str(path))
    return path


class Proc:
    """A server subprocess; ``url`` once ``ready_path`` answers 200 (bitlm: /health, 503 while loading)."""

    def __init__(self, argv: list[str], env: dict[str, str], port_re: str | None, port: int | None,
                 ready_path: str = "/health") -> None:
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        if port_re is not None:
            for line in self.p.stdout:
                self.lines.append(line)
                m = re.search(port_re, line)
                if m:
                    port = int(m.group(1))
                    break
        if port is None:
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True).start()
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            try:
                if requests.get(self.url + ready_path, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready after 600 s")

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()


def one_request(url: str, model: str, prompt, max_tokens: int, logprobs: bool = True) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if logprobs:
        body["logprobs"] = 0
    t0 = time.perf_counter()
    times: list[float] = []
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ch = json.loads(line[6:])
            for c in ch.get("choices", []):
                lp = c.get("logprobs") or {}
                n = len(lp.get("tokens") or []) or (1 if c.get("text") else 0)
                times += [time.perf_counter()] * n
    n = len(times)
    return {"tokens": n, "ttft": times[0] - t0 if n else None,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else None}


def scrape(url: str) -> dict[str, float]:
    """bitlm's decode counters from /metrics (seconds in the engine's batched step, steps, rows)."""
    want = ("bitlm_decode_seconds_total", "bitlm_decode_steps_total", "bitlm_decode_sequences_total")
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[name] = float(value)
    return out


def run_level(url: str, model: str, prompt, c: int, per_client: int, max_tokens: int, logprobs: bool = True,
              counters: bool = False) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            r = one_request(url, model, prompt, max_tokens, logprobs)
            with lock:
                results.append(r)

    before = scrape(url) if counters else None
    t0 = time.perf_counter()
    th = [threading.Thread(target=client) for _ in range(c)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    tpot = statistics.median(r["tpot"] for r in results if r["tpot"] is not None)
    row = {"streams": c, "requests": len(results), "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
           "decode_tok_s": c / tpot, "ttft_ms": 1e3 * statistics.median(r["ttft"] for r in results),
           "tpot_ms": 1e3 * tpot}
    if before is not None:  # the engine's share of a step: the rest of TPOT is serving, sampling and the clients
        d = {k: v - before.get(k, 0.0) for k, v in scrape(url).items()}
        steps = d.get("bitlm_decode_steps_total", 0.0)
        if steps:
            row["step_ms"] = 1e3 * d["bitlm_decode_seconds_total"] / steps
            row["rows_per_step"] = d["bitlm_decode_sequences_total"] / steps
    return row


def measure(url: str, model: str, prompt, args, logprobs: bool = True, counters: bool = False) -> list[dict]:
    one_request(url, model, prompt, 4, logprobs)  # warm-up
    rounds: dict[int, list[dict]] = {c: [] for c in args.streams}
    for rnd in range(args.rounds):
        for c in args.streams:
            r = run_level(url, model, prompt, c, args.requests, args.max_tokens, logprobs, counters)
            rounds[c].append(r)
            step = f", engine step {r['step_ms']:.1f} ms ({r['rows_per_step']:.1f} rows)" if "step_ms" in r else ""
            print(f"  round {rnd + 1}: {c} streams: {r['agg_tok_s']:.1f} tok/s aggregate, TTFT {r['ttft_ms']:.0f} ms, "
                  f"TPOT {r['tpot_ms']:.1f} ms{step}", file=sys.stderr, flush=True)
    out = []
    for c, rs in rounds.items():
        keys = ["agg_tok_s", "decode_tok_s", "ttft_ms", "tpot_ms"] + (["step_ms", "rows_per_step"] if counters else [])
        row = {k: statistics.median(r[k] for r in rs if k in r) for k in keys if any(k in r for r in rs)}
        out.append({"streams": c, **row, "rounds": rs})
    base = out[0]["agg_tok_s"]
    for row in out:
        row["agg_vs_1_stream"] = row["agg_tok_s"] / base
    return out


def bitlm_side(args, env) -> tuple[list[dict], dict]:
    from bench_engine import build_random_packed

    path = build_random_packed(args.preset, "i2", "int8", CACHE / f"serve-{args.preset}-i2-int8.bitlm")
    tok = path.with_suffix(".tokenizer.json")
    if not tok.exists():
        byte_tokenizer(tok)
    srv = Proc([sys.executable, "-m", "bitlm.cli", "serve", "--model", str(path), "--port", "0", "--parallel",
                str(max(args.streams)), "--ctx", str(args.ctx), "--head-act", "int8"], env,
               r"http://127\.0\.0\.1:(\d+)/v1", None)
    try:
        rng = random.Random(0)
        prompt = [rng.randrange(32, 127) for _ in range(args.prompt_tokens)]  # token ids = ASCII bytes
        rows = measure(srv.url, path.name, prompt, args, counters=True)
        metrics = requests.get(srv.url + "/metrics", timeout=10).text
    finally:
        rc = srv.stop()
    info = {"model": str(path), "server_exit": rc, "startup": [x.strip() for x in srv.lines if "memory bound" in x],
            "metrics_tail": [x for x in metrics.splitlines() if x.startswith(("bitlm_decode", "bitlm_memory",
                                                                               "bitlm_process"))]}
    return rows, info


def llama_side(args, env) -> tuple[list[dict] | None, str]:
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "skipped: llama-cpp-python is not installed (pip install 'bitlm[llama]', ~7 min build)"
    missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings") if importlib.util.find_spec(m) is None]
    if missing:
        return None, (f"skipped: llama-cpp-python's server extra is not installed (missing {', '.join(missing)}: "
                      "pip install sse-starlette starlette-context pydantic-settings)")
    import socket

    from bench_llama_cpp import build_gguf, gguf_path

    g = gguf_path(args.preset, "tq2_0", "q8_0")
    if not Path(g).exists():
        build_gguf(g, args.preset, "tq2_0", "q8_0")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    # No logprobs here: llama-cpp-python computes them by sorting the whole 128k vocabulary in
    # Python per token, and only with --logits_all (logits of every prompt token) — ~100 ms a
    # token that is its Python layer's, not llama.cpp's.  Its vocabulary's filler tokens all have
    # text, so each streamed chunk with text is one token.
    srv = Proc([sys.executable, "-m", "llama_cpp.server", "--model", str(g), "--host", "127.0.0.1", "--port", str(port),
                "--n_ctx", str(args.ctx), "--n_threads", str(os.cpu_count()), "--logits_all", "False"], env, None, port,
               "/v1/models")
    try:
        rng = random.Random(0)
        prompt = "".join(chr(rng.randrange(97, 123)) for _ in range(args.prompt_tokens))
        rows = measure(srv.url, "llama", prompt, args, logprobs=False)
    finally:
        srv.stop()
    return rows, f"llama-cpp-python server on {g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--streams", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=2, help="requests per client thread per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama-cpp", action="store_true", help="also llama-cpp-python's server (if installed)")
    ap.add_argument("--json", default=str(HERE / "results" / "serve.json"))
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    from bitlm import kernels

    print(f"bitlm serve benchmark: preset {args.preset}, streams {args.streams}, {args.requests} requests per "
          f"stream, {args.max_tokens} tokens, prompt {args.prompt_tokens}; CPU {cpu_model()} ({os.cpu_count()} cores), "
          f"kernels {kernels.backend_info()}", file=sys.stderr, flush=True)
    load = {"start": os.getloadavg()}
    rows, info = bitlm_side(args, env)
    llama, llama_note = llama_side(args, env) if args.llama_cpp else (None, "not requested (--llama-cpp)")
    print(f"\n{'engine':<8} {'streams':>7} {'agg tok/s':>10} {'x 1 stream':>10} {'decode tok/s':>12} "
          f"{'TTFT ms':>8} {'TPOT ms':>8} {'step ms':>8}")
    for name, rs in (("bitlm", rows), ("llama", llama or [])):
        for r in rs:
            step = f"{r['step_ms']:>8.1f}" if "step_ms" in r else f"{'-':>8}"
            print(f"{name:<8} {r['streams']:>7} {r['agg_tok_s']:>10.1f} {r['agg_vs_1_stream']:>10.2f} "
                  f"{r['decode_tok_s']:>12.1f} {r['ttft_ms']:>8.0f} {r['tpot_ms']:>8.1f} {step}")
    print("step ms: bitlm's batched decode step inside the server (/metrics); TPOT minus it is sampling, "
          "streaming and the clients (which share these CPUs)")
    load["end"] = os.getloadavg()
    if llama is None:
        print(f"llama-cpp-python: {llama_note}")
    print(f"load average (1, 5, 15 min): {load['start']} at the start, {load['end']} at the end")
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": load, "kernels": kernels.backend_info(), "preset": args.preset,
           "args": {k: v for k, v in vars(args).items() if k != "json"}, "bitlm": rows, "bitlm_info": info,
           "llama_cpp": llama, "llama_cpp_note": llama_note, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
