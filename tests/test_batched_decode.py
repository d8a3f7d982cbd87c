"""``PackedModel.decode_batch`` (serving's continuous batching) against the single-sequence
engine: a sequence's logits are the same bits whatever else shares its step, and the same bits as
the per-op single-sequence path; greedy tokens equal the fused native decode's.  ``KVPool``."""

from __future__ import annotations

import pytest
import torch

from bitlm.engine import KVPool, convert
from helpers import tiny_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3]]


def _packed(name: str, fmt: str, head: str, **kw):
    return convert(tiny_model(name, sharpen=50, sharpen_head=False, max_seq_len=96, **kw), fmt, head=head)


def _run(pm, idxs: list[int], steps: int = 8, mode: str = "batch"):
    """Prefill each prompt in its own cache, then ``steps`` greedy steps of all of them together
    (``batch``), or one by one through ``forward`` (``per-op``: fused_decode off; ``fused``)."""
    caches = [pm.new_cache(1, 64) for _ in idxs]
    cur = [int(pm(torch.tensor([PROMPTS[i]]), cache=c, last_only=True)[0, -1].argmax()) for i, c in zip(idxs, caches)]
    toks: dict[int, list[int]] = {i: [] for i in idxs}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in idxs}
    for _ in range(steps):
        for i, t in zip(idxs, cur):
            toks[i].append(t)
        if mode == "batch":
            out = pm.decode_batch(cur, caches)
        else:
            pm.fused_decode = mode == "fused"
            out = torch.stack([pm(torch.tensor([[t]]), cache=c)[0, -1] for t, c in zip(cur, caches)])
            pm.fused_decode = True
        for i, o in zip(idxs, out):
            logits[i].append(o)
        cur = [int(o.argmax()) for o in out]
    return toks, logits


@pytest.mark.parametrize("name,fmt,head,kw", [
    ("tiny", "i2", "f32", {}), ("tiny", "t1", "bf16", {"sub_norm": False, "qkv_bias": True}),
    ("tiny-2b4t", "i2", "int8", {}), ("tiny-2b4t", "b1", "f32", {"quant": "b1"}), ("tiny-2b4t", "t1", "bf16", {}),
])
def test_batched_decode_equals_alone(name, fmt, head, kw):
    pm = _packed(name, fmt, head, **kw)
    together_t, together_l = _run(pm, [0, 1, 2, 3])
    for i in range(4):
        alone_t, alone_l = _run(pm, [i])
        assert alone_t[i] == together_t[i]
        for a, b in zip(alone_l[i], together_l[i]):
            assert torch.equal(a, b)  # the same bits, not just the same argmax
        per_op_t, per_op_l = _run(pm, [i], mode="per-op")
        assert per_op_t[i] == alone_t[i]
        for a, b in zip(alone_l[i], per_op_l[i]):
            assert torch.equal(a, b)
        fused_t, fused_l = _run(pm, [i], mode="fused")
        assert fused_t[i] == alone_t[i]  # the native fused step rounds attention differently: tokens
        for a, b in zip(alone_l[i], fused_l[i]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_batched_decode_mixed_positions_and_errors():
    pm = _packed("tiny", "i2", "f32")
    caches = [pm.new_cache(1, 8) for _ in range(2)]
    pm(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), cache=caches[0])
    pm(torch.tensor([[1]]), cache=caches[1])
    pm.decode_batch([3, 4], caches)
    assert [c.pos for c in caches] == [8, 2]
    with pytest.raises(ValueError, match="KV cache overflow"):
        pm.decode_batch([3, 4], caches)
    with pytest.raises(ValueError, match="2 caches"):
        pm.decode_batch([3], caches)


def test_kv_pool_bounds_memory_and_recycles_slots():
    pm = _packed("tiny", "i2", "f32")
    pool = KVPool(pm, 3, 16)
    cfg = pm.config
    assert pool.nbytes == 3 * 2 * cfg.n_layers * cfg.kv_heads * 16 * cfg.head_dim * 2  # f16 KV by default
    pm.kv = "int8"  # one byte per value plus a float32 scale per token and head
    assert KVPool(pm, 3, 16).nbytes == 3 * 2 * cfg.n_layers * cfg.kv_heads * 16 * (cfg.head_dim + 4)
    pm.kv = "f16"
    slots = [pool.acquire() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and pool.acquire() is None and pool.free == 0
    pm(torch.tensor([[1, 2, 3]]), cache=pool.caches[slots[1]])
    assert pool.tokens_used() == 3
    pool.release(slots[1])
    assert pool.tokens_used() == 0 and pool.free == 1
    with pytest.raises(ValueError, match="twice"):
        pool.release(slots[1])
    again = pool.acquire()
    assert again == slots[1] and pool.caches[again].pos == 0
