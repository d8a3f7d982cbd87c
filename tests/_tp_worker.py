"""Run by tests/test_tp.py under torchrun: one tiny model, the same copy sharded over a (dp × tp)
mesh (tensor parallelism, FSDP2 on dp when dp > 1) and unsharded in every process; prints a JSON
report from rank 0 — the largest logit and weight-gradient differences, and the scale collectives
counted (``bitlm.tensor_parallel.comm_counts``) in one forward + backward.

argv[1]: JSON {"preset", "tp", "dp", "mode": "group" | "global", "overrides": {...}}, or
{"train": {TrainConfig fields}, "overrides": {...}}: ``bitlm.train.train`` on the pattern data, and
the trained (sharded) model's eval-mode logits on one fixed input in the report (taken just before
the process group closes)."""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from bitlm import tensor_parallel as TP  # noqa: E402
from bitlm.model import BitNetModel  # noqa: E402
from helpers import tiny_config  # noqa: E402


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(a: dict) -> None:
    import bitlm.parallel as P
    import bitlm.train as T
    from helpers import pattern_data

    seen, orig_apply, orig_close = {}, P.apply_tensor_parallel, P.Dist.close

    def apply(model, d):
        seen["model"] = model
        return orig_apply(model, d)

    def close(d):
        m = seen.get("model")
        if m is not None and d.mesh is not None:
            m.eval()
            with torch.no_grad():
                seen["logits"] = m(torch.arange(16)[None] % m.config.vocab_size).tolist()
        orig_close(d)

    P.apply_tensor_parallel, P.Dist.close = apply, close
    stop_after, calls, orig_loss = a.get("stop_after"), {"n": 0}, T.lm_loss
    ga = int(a["train"].get("grad_accum", 1))

    def loss(*x, **k):  # rank 0 alone gets SIGINT during step stop_after: the run saves and stops after it
        calls["n"] += 1
        if stop_after is not None and os.environ.get("RANK", "0") == "0" and calls["n"] == (stop_after - 1) * ga + 1:
            os.kill(os.getpid(), signal.SIGINT)
        return orig_loss(*x, **k)

    T.lm_loss = loss
    try:
        T.train(tiny_config(a.get("preset", "tiny"), **a.get("overrides", {})), T.TrainConfig(**a["train"]),
                pattern_data(), resume=bool(a.get("resume")), log=lambda *x: None)
    except T.TrainingInterrupted:
        pass
    if int(os.environ.get("RANK", "0")) == 0:
        print("REPORT " + json.dumps({"logits": seen.get("logits")}))


def compare(a: dict, mode: str, mesh, tp: int, dp: int) -> dict:
    cfg = tiny_config(a.get("preset", "tiny"), **a.get("overrides", {}))
    if mode == "group":
        cfg = TP.group_config(cfg, tp)
    torch.manual_seed(0)
    ref = BitNetModel(cfg).train()
    model = copy.deepcopy(ref)
    TP.apply_tp(model, mesh["tp"])
    if dp > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (4, 16), generator=g)
    y = torch.randint(0, cfg.vocab_size, (4, 16), generator=g)
    want = ref(x)
    F.cross_entropy(want.reshape(-1, want.shape[-1]), y.reshape(-1)).backward()
    r = mesh["dp"].get_local_rank()
    xs, ys = torch.tensor_split(x, dp)[r], torch.tensor_split(y, dp)[r]
    TP.reset_comm_counts()
    got = model(xs)
    fwd = TP.comm_counts()
    F.cross_entropy(got.reshape(-1, got.shape[-1]), ys.reshape(-1)).backward()
    counts = TP.comm_counts()
    logit_diff = float((got - torch.tensor_split(want, dp)[r]).detach().abs().max())
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    grad_diff, worst = 0.0, ""
    for n, p in model.named_parameters():
        gd = float((_full(p.grad) - ref_grads[n]).abs().max())
        if gd > grad_diff:
            grad_diff, worst = gd, n
    norms = {"norm_ref": float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)),
             "norm_tp": float(_full(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)))}
    return {"logit_diff": logit_diff, "grad_diff": grad_diff, "worst": worst, "forward_counts": fwd,
            "counts": counts, "logit_scale": float(want.detach().abs().max()), **norms}


def main() -> None:
    a = json.loads(sys.argv[1])
    if "train" in a:
        return train(a)
    tp, dp = int(a.get("tp", 2)), int(a.get("dp", 1))
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    out = {mode: compare(a, mode, mesh, tp, dp) for mode in a.get("modes", ["global", "group"])}
    if dist.get_rank() == 0:
        print("REPORT " + json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
