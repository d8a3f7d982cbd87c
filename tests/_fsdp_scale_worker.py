"""Run by tests/test_parallel.py under torchrun (2 ranks): a BitLinear with 5 output rows (uneven
shards 3 + 2) sharded by FSDP2; prints a JSON report from rank 0."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from bitlm import quant as Q
from bitlm.layers import BitLinear
from bitlm.parallel import global_absmean


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    ref = BitLinear(16, 5)
    with torch.no_grad():  # rows of very different sizes: shard means differ from the whole one
        ref.weight.mul_(torch.tensor([[1.0], [1.0], [1.0], [5.0], [5.0]]))
    x = torch.randn(3, 16)
    want_y = ref(x)
    want_t, want_s = Q.ternary_quantize(ref.weight)
    layer = BitLinear(16, 5)
    layer.load_state_dict(ref.state_dict())
    fully_shard(layer, mesh=mesh)
    seen = {}

    def spy(m, args):
        seen["dtensor_in_forward"] = isinstance(m.weight, DTensor)

    layer.register_forward_pre_hook(spy)
    w = layer.weight  # sharded (a DTensor) before the forward; the root keeps it unsharded after
    local_mean = float(w.to_local().abs().mean())
    t, s = layer.quantized_weight()
    y = layer(x)
    out = {
        "sharded": isinstance(w, DTensor), "local_rows": list(w.to_local().shape),
        "global": float(global_absmean(w)), "want": float(want_s[0]), "local_mean": local_mean,
        "scale": float(s[0]), "t_equal": bool(torch.equal(t.full_tensor(), want_t)),
        "y_close": bool(torch.allclose(y, want_y, atol=1e-6)), **seen,
    }
    if dist.get_rank() == 0:
        print("REPORT " + json.dumps(out))
    dist.barrier()  # no rank closes its gloo connections while the other still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
