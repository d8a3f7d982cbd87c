"""``bitlm serve``: an OpenAI-compatible HTTP server with continuous batching.

``scheduler`` owns the slots (the KV-cache pool, one batched decode step at a time on a worker
thread); ``app`` validates, renders chat templates, streams and counts; ``templates`` turns chat
messages into prompt ids.  This module is the CLI verb: load the model (in the background, so
``/health`` answers 503 meanwhile; a model that fails to load stops the server with the usual
one-line error, exit 2), print the memory bound, run uvicorn on 127.0.0.1 by default, and exit 0 after a graceful shutdown on SIGTERM (running streams get ``--shutdown-timeout``
seconds to finish, then are cancelled).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_arguments", "run", "memory_bound", "load_into"]

MiB = 1 << 20


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="packed .bitlm file (fast engine), or anything bitlm.load reads")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or HF folder (default: the model's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the one chosen is printed)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--ctx", type=int, default=None, help="tokens per slot (default: the model's max_seq_len)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the file's name)")
    p.add_argument("--chat-template", default="auto", help="auto, jinja (tokenizer_config.json), 2b4t or plain")
    p.add_argument("--head-act", choices=["f32", "int8"], default="f32",
                   help="packed models with an int8 head: int8 runs the head W8A8 (see bitlm generate)")
    p.add_argument("--kv", default=None, metavar="{f16,f32,int8}",
                   help="packed models: KV cache storage of the slots (default f16; int8: a scale per token and head)")
    from ..generate import add_engine_argument

    add_engine_argument(p)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="threads for torch's own ops (attention, norms); the packed kernels keep their own pool "
                        "(BITLM_NUM_THREADS). 1: at decode sizes, waking OpenMP workers costs more than the work")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM before they are cancelled")


def memory_bound(model, parallel: int, ctx: int, weights_bytes: int, runtime_bytes: int) -> dict[str, int]:
    """The server's memory bound, by part: weights, the preallocated KV pool, the working set of
    the largest request (a ``ctx``-token prefill with full logits for echo + log-softmax, and the
    layer temporaries), and the process before loading (interpreter, torch, the HTTP stack)."""
    from ..engine import kv_bytes_per_token

    cfg = model.config
    kv = kv_bytes_per_token(cfg, getattr(model, "kv", "f32")) * ctx * parallel
    per_token = 4 * (3 * cfg.vocab_size + 6 * cfg.d_model + 3 * cfg.ffn_dim + 2 * cfg.n_heads * cfg.head_dim)
    attn = 4 * cfg.n_heads * ctx * ctx  # one layer's attention scores of a ctx-long prefill
    work = per_token * ctx + attn + 192 * MiB  # + slack: allocator arenas, worker threads, sockets
    return {"weights": weights_bytes, "kv_cache": kv, "working": work, "runtime": runtime_bytes,
            "total": weights_bytes + kv + work + runtime_bytes}


def _weights_bytes(model, path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if hasattr(model, "parameters"):
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(model.weight_bytes().values())


def load_into(state, args) -> None:
    """Load the model and tokenizer named by ``args``, build the scheduler, print the bound."""
    from ..generate import load_for_generation
    from ..loading import load_tokenizer_for
    from .app import _rss
    from .scheduler import Scheduler
    from .templates import ChatTemplate, find_jinja_template

    runtime = _rss() or 0
    model = load_for_generation(args)
    tok = load_tokenizer_for(args.model, args.tokenizer)
    template = ChatTemplate(tok, args.chat_template, find_jinja_template(args.model))
    sched = Scheduler(model, tok, args.parallel, args.ctx)
    b = memory_bound(model, sched.parallel, sched.ctx, _weights_bytes(model, Path(args.model)), runtime)
    state.tokenizer, state.template, state.memory_bound = tok, template, b["total"]
    state.scheduler = sched.start()
    # a --ctx beyond the model's positions cannot be served: the Scheduler caps it, and the line says so
    capped = (f" (--ctx {args.ctx} capped to the model's context of {sched.ctx} tokens)"
              if args.ctx is not None and args.ctx > sched.ctx else "")
    print(f"bitlm serve: {args.model}: {sched.parallel} slots x {sched.ctx} tokens{capped}, chat template "
          f"{template.name}; memory bound {b['total'] / MiB:.0f} MiB = weights {_mib(b['weights'])} + KV cache "
          f"{_mib(b['kv_cache'])} + working {_mib(b['working'])} + runtime {_mib(b['runtime'])} MiB", flush=True)


def _mib(n: int) -> str:
    """MiB with one decimal below 10 (a tiny model's weights are not "0 MiB")."""
    return f"{n / MiB:.1f}" if n < 10 * MiB else f"{n / MiB:.0f}"


def _check_args(args) -> None:
    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    if args.ctx is not None and args.ctx < 2:
        raise ValueError(f"--ctx must be >= 2, got {args.ctx}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.kv is not None and args.kv not in ("f16", "f32", "int8"):
        raise ValueError(f"--kv {args.kv}: the KV cache type must be f16, f32 or int8")
    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    if not Path(args.model).exists():
        raise FileNotFoundError(f"{args.model}: no such model file or folder")


def run(args) -> int:
    import signal
    import socket

    import uvicorn

    from .app import ServerState, create_app

    _check_args(args)
    import torch

    # measured on the 2B4T shape, 2 busy shared cores: SDPA of one decode query took 13 ms on 2
    # OpenMP threads (waking the second) and 0.03 ms on one; a decode step went from 630 to 173 ms
    torch.set_num_threads(args.torch_threads)
    name = args.model_name or Path(args.model).name
    state = ServerState(name, args.api_key, loader=lambda st: load_into(st, args))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise OSError(f"--host {args.host} --port {args.port}: cannot listen there: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    print(f"bitlm serve: listening on http://{args.host}:{port}/v1 (model id '{name}'; /health is 503 until "
          "loaded)", flush=True)
    config = uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    state.on_load_error = lambda e: setattr(server, "should_exit", True)  # then re-raised below: one line, exit 2
    # uvicorn re-raises a caught SIGTERM after its graceful shutdown; a no-op handler makes that
    # shutdown the end of the process with status 0 (SIGINT keeps the usual interrupted status)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if state.load_exc is not None:
        raise state.load_exc
    print("bitlm serve: shut down", flush=True)
    return 0
