"""``bitlm info``: the environment, the kernel backend, and (optionally) a model's size in bits."""

from __future__ import annotations

import json
import platform
from typing import Any

__all__ = ["cpu_model", "environment", "model_summary", "add_arguments", "run"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import os

    import torch

    from . import __version__, memory

    env: dict[str, Any] = {
        "bitlm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hugepages": memory.status(),  # weights and KV caches on huge pages (bitlm.memory)
    }
    try:
        from .kernels import backend_info

        env["kernels"] = backend_info()
    except ImportError as e:  # the kernels package itself is missing: report, don't fail
        env["kernels"] = {"backend": "unavailable", "reason": str(e)}
    return env


def model_summary(model) -> dict[str, Any]:
    """Parameter counts and the bytes of the linear weights as trained (fp32 latent) vs packed."""
    from .model import linear_modules
    from .quant import bits_per_weight

    cfg = model.config
    if not hasattr(model, "named_modules"):  # a PackedModel (bitlm.engine): report what is stored
        wb = model.weight_bytes()
        lin = sum(w.N * w.K for L in model.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
        return {"arch": cfg.arch, "quant": cfg.quant, "packed_format": model.format, "linear_parameters": lin,
                "bits_per_linear_weight": 8 * wb["linear"] / lin, "linear_bytes_packed": wb["linear"],
                "embedding": model.embed.kind, "head": model.head.kind, "bytes": wb, "config": cfg.to_dict()}
    lin = sum(m.weight.numel() for _, m in linear_modules(model))
    total = model.num_parameters()
    packed_bits = {"b1.58": 2.0, "b1": 1.0, "fp": 16.0}[cfg.quant]  # i2 (2 bpw), b1 (1 bpw), bf16
    return {
        "arch": cfg.arch,
        "quant": cfg.quant,
        "parameters": total,
        "linear_parameters": lin,
        "other_parameters": total - lin,
        "bits_per_linear_weight": bits_per_weight(cfg.quant),
        "linear_bytes_fp32": lin * 4,
        "linear_bytes_bf16": lin * 2,
        "linear_bytes_packed": int(lin * packed_bits / 8),
        "config": cfg.to_dict(),
    }


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="also describe this model")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    out: dict[str, Any] = {"environment": environment()}
    if args.model:
        from .loading import load

        out["model"] = model_summary(load(args.model))
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    env = out["environment"]
    k = env["kernels"]
    print(f"bitlm {env['bitlm']}  python {env['python']}  torch {env['torch']}")
    print(f"cpu: {env['cpu']} ({env['cores']} cores, torch threads {env['torch_threads']})")
    print(f"kernels: backend={k.get('backend')} tier={k.get('tier')} threads={k.get('threads')}"
          + (f"  ({k['reason']})" if k.get("reason") else ""))
    hp = env["hugepages"]
    print(f"huge pages: {'on' if hp['used'] else 'off'} (kernel THP setting: {hp['thp']}"
          + ("; BITLM_HUGEPAGES=0" if hp["thp"] in ("always", "madvise") and not hp["used"] else "") + ")")
    if "model" in out and "packed_format" in out["model"]:
        m = out["model"]
        print(f"packed model: {m['arch']} quant={m['quant']} format={m['packed_format']}  linear weights "
              f"{m['linear_parameters']:,} at {m['bits_per_linear_weight']:.3f} bits ({m['linear_bytes_packed']:,} B); "
              f"embedding {m['embedding']}, head {m['head']}")
    elif "model" in out:
        m = out["model"]
        print(f"model: {m['arch']} quant={m['quant']}  parameters {m['parameters']:,} "
              f"(linear {m['linear_parameters']:,}, other {m['other_parameters']:,})")
        print(f"linear weights: {m['bits_per_linear_weight']:.3f} bits/weight; fp32 {m['linear_bytes_fp32']:,} B, "
              f"packed {m['linear_bytes_packed']:,} B")
    return 0
