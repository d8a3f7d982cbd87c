"""``PackedModel.decode_batch`` (serving's continuous batching) against the single-sequence
engine: a sequence's logits are the same bits whatever else shares its step; with the native
batched attention the same bits as the fused native decode (ReLU² models), with torch's attention
(``batch_attention = False``) the same bits as the per-op single-sequence path.  ``KVPool``."""

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
        if mode in ("batch", "batch-sdpa"):
            pm.batch_attention = mode == "batch"
            out = pm.decode_batch(cur, caches)
            pm.batch_attention = True
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
    together_sdpa_t, together_sdpa_l = _run(pm, [0, 1, 2, 3], mode="batch-sdpa")
    for i in range(4):
        alone_t, alone_l = _run(pm, [i])
        assert alone_t[i] == together_t[i]
        for a, b in zip(alone_l[i], together_l[i]):
            assert torch.equal(a, b)  # the same bits, not just the same argmax
        # torch's attention per sequence (batch_attention off): the per-op path's bits
        per_op_t, per_op_l = _run(pm, [i], mode="per-op")
        assert per_op_t[i] == together_sdpa_t[i] == alone_t[i]
        for a, b in zip(together_sdpa_l[i], per_op_l[i]):
            assert torch.equal(a, b)
        fused_t, fused_l = _run(pm, [i], mode="fused")
        assert fused_t[i] == alone_t[i]
        for a, b, c in zip(alone_l[i], fused_l[i], per_op_l[i]):
            # the native batched attention is the fused step's (same rounding): where the fused
            # step runs the same FFN activation (ReLU²), the same bits; torch's SDPA rounds
            # differently (close)
            if pm._fused_decode_ok() and pm.config.arch == "bitnet-2b4t":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-3)


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


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
def test_batched_attention_is_the_fused_steps(tier, kv):
    """The native batched attention (RoPE, cache rows, attention: ``bitlm_attn_batch``) on every KV
    cache type: each row the fused native step's bits, at different positions, and the cache
    contents the fused step's; torch's per-sequence attention gives the same tokens."""
    pm = _packed("tiny-2b4t", "i2", "int8")
    pm.kv = kv
    assert pm._fused_decode_ok() and pm.config.arch == "bitnet-2b4t"
    toks, logits = _run(pm, [0, 1, 2, 3], steps=4)
    for i in range(4):
        fused_t, fused_l = _run(pm, [i], steps=4, mode="fused")
        assert fused_t[i] == toks[i]
        for a, b in zip(logits[i], fused_l[i]):
            assert torch.equal(a, b)
    sdpa_t, _ = _run(pm, [0, 1, 2, 3], steps=4, mode="batch-sdpa")
    assert sdpa_t == toks
    # the caches hold the fused step's rows
    caches = [pm.new_cache(1, 32) for _ in range(2)]
    fused = [pm.new_cache(1, 32) for _ in range(2)]
    for c, f, p in zip(caches, fused, ([1, 2, 3], [4])):
        pm(torch.tensor([p]), cache=c)
        pm(torch.tensor([p]), cache=f)
    pm.decode_batch([5, 6], caches)
    for f, t in zip(fused, [5, 6]):
        pm(torch.tensor([[t]]), cache=f)
    for c, f in zip(caches, fused):
        assert c.pos == f.pos
        names = ("k", "v", "k_scale", "v_scale") if kv == "int8" else ("k", "v")
        for name in names:
            for x, y in zip(getattr(c, name), getattr(f, name)):
                assert torch.equal(x, y)


def test_batched_attention_errors():
    from bitlm import kernels

    if kernels.backend() != "native":
        pytest.skip("needs the native kernels")
    from bitlm.kernels import native

    pm = _packed("tiny-2b4t", "i2", "int8")
    cfg = pm.config
    c = pm.new_cache(1, 4)
    c.pos = 4  # full: nothing may be written
    with pytest.raises(ValueError, match="pos < max_len"):
        native.BatchAttention([c], "f16", cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers)
    c.pos = 0
    with pytest.raises(ValueError, match=r"cache 0 k\[0\]: expected a contiguous torch.float32"):
        native.BatchAttention([c], "f32", cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers)
    ba = native.BatchAttention([c], "f16", cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers)
    D = cfg.head_dim
    with pytest.raises(ValueError, match="batched attention k"):
        ba.run(0, torch.zeros(1, cfg.n_heads, D), torch.zeros(2, cfg.kv_heads, D), torch.zeros(1, cfg.kv_heads, D),
               torch.zeros(1, D), torch.zeros(1, D))


@pytest.mark.parametrize("name,expect", [("tiny-2b4t", True), ("tiny", False)])
def test_one_sequence_runs_the_fused_step_where_it_has_the_same_bits(name, expect, monkeypatch):
    """A batch of one (a server with one active request) takes the fused native step when that
    gives the batched step's bits (ReLU² models, native attention), else the batched path."""
    from bitlm import kernels

    pm = _packed(name, "i2", "f32")
    calls = []
    real = type(pm)._decode_fused
    monkeypatch.setattr(type(pm), "_decode_fused", lambda self, *a: calls.append(1) or real(self, *a))
    cache = pm.new_cache(1, 16)
    pm(torch.tensor([PROMPTS[0]]), cache=cache, last_only=True)
    out = pm.decode_batch([3], [cache])
    native = kernels.backend() == "native"
    assert bool(calls) == (expect and native) and out.shape == (1, pm.config.vocab_size) and cache.pos == 6
    pm.batch_attention = False  # torch's attention: other bits, so the batched path
    calls.clear()
    pm.decode_batch([4], [cache])
    assert not calls and cache.pos == 7


@pytest.mark.parametrize("name,fmt,head,kv", [
    ("tiny", "i2", "f32", "f16"), ("tiny-2b4t", "i2", "int8", "int8"), ("tiny-2b4t", "t1", "bf16", "f32"),
    ("tiny", "t1", "int8", "f32")])
@pytest.mark.parametrize("attention", ["native", "torch"])
def test_prompts_folded_into_a_decode_step_are_their_own_prefills(name, fmt, head, kv, attention):
    """decode_batch(..., prompts=...): the decode rows are decode_batch's bits, each prompt's row
    forward(prompt, last_only=True)'s, the caches hold the same rows, and the next step agrees."""
    pm = _packed(name, fmt, head)
    pm.batch_attention = attention == "native"
    if head == "int8":
        pm.head_act = "int8"
    worlds = []
    for mixed in (False, True):
        caches = [pm.new_cache(1, 64, kv) for _ in range(2)]
        for c, p in zip(caches, PROMPTS[:2]):
            pm(torch.tensor([p]), cache=c, last_only=True)
        joining = [pm.new_cache(1, 64, kv) for _ in range(2)]
        new_prompts = [PROMPTS[2], [4, 5, 6]]
        if mixed:
            out = pm.decode_batch([3, 4], caches, new_prompts, joining)
        else:
            out = torch.cat([pm.decode_batch([3, 4], caches)] + [
                pm(torch.tensor([p]), cache=c, last_only=True)[0] for p, c in zip(new_prompts, joining)])
        nxt = pm.decode_batch([5, 6, 7, 8], caches + joining)
        worlds.append((out, nxt, caches + joining))
    (o1, n1, c1), (o2, n2, c2) = worlds
    assert o2.shape == (4, pm.config.vocab_size)
    assert torch.equal(o1, o2) and torch.equal(n1, n2)
    for a, b in zip(c1, c2):
        rows = lambda c: c.k + c.v + list(getattr(c, "k_scale", [])) + list(getattr(c, "v_scale", []))  # noqa: E731
        assert a.pos == b.pos and len(rows(a)) == len(rows(b))
        assert all(torch.equal(x, y) for x, y in zip(rows(a), rows(b)))


def test_folded_prompts_errors():
    pm = _packed("tiny", "i2", "f32")
    c = pm.new_cache(1, 8)
    with pytest.raises(ValueError, match="2 or more tokens"):
        pm.decode_batch([], [], [[1]], [c])
    with pytest.raises(ValueError, match="prompts"):
        pm.decode_batch([], [], [[1, 2]], [])
    with pytest.raises(ValueError, match="KV cache overflow"):
        pm.decode_batch([], [], [list(range(9))], [c])
    out = pm.decode_batch([], [], [[1, 2, 3]], [c])  # prompts alone: a batched prefill
    assert out.shape == (1, pm.config.vocab_size) and c.pos == 3


@pytest.mark.parametrize("kv", ["f32", "f16", "int8"])
def test_whole_batched_step_in_one_native_call_is_the_per_op_path(tier, kv, monkeypatch):
    """``bitlm_decode_rows`` (decode_batch of N >= 2 as one native call) against the per-op batched
    path it replaces (``rows_decode = False``): the same logits and cache contents, bit for bit, on
    every tier and KV type — and it is the path decode_batch takes."""
    from bitlm import kernels

    if kernels.backend() != "native":
        pytest.skip("needs the native kernels")
    from bitlm.kernels import native

    pm = _packed("tiny-2b4t", "t1", "int8")
    pm.kv = kv
    calls = []
    real = native.Decoder.rows
    monkeypatch.setattr(native.Decoder, "rows", lambda self, *a: calls.append(1) or real(self, *a))
    runs = {}
    for rows in (True, False):
        pm.rows_decode = rows
        caches = [pm.new_cache(1, 32) for _ in range(3)]
        for c, p in zip(caches, PROMPTS):
            pm(torch.tensor([p]), cache=c)
        outs = [pm.decode_batch(t, caches) for t in ([5, 6, 7], [8, 9, 10], [1, 1, 2])]
        runs[rows] = outs, caches
        assert bool(calls) == rows
        calls.clear()
    for a, b in zip(runs[True][0], runs[False][0]):
        assert torch.equal(a, b)
    names = ("k", "v", "k_scale", "v_scale") if kv == "int8" else ("k", "v")
    for c, f in zip(runs[True][1], runs[False][1]):
        assert c.pos == f.pos == len(PROMPTS[runs[True][1].index(c)]) + 3
        for name in names:
            for x, y in zip(getattr(c, name), getattr(f, name)):
                assert torch.equal(x, y)
    pm.rows_decode = True
    dec = pm._rows_decoder("f16" if kv != "f16" else "f32")  # a decoder for another KV type refuses
    caches = [pm.new_cache(1, 8) for _ in range(2)]
    cfg = pm.config
    ba = native.BatchAttention(caches, kv, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers)
    D = cfg.head_dim
    with pytest.raises(ValueError, match="KV type does not match"):
        dec.rows(torch.zeros(2, cfg.d_model), ba, torch.zeros(2, D), torch.zeros(2, D))
    with pytest.raises(ValueError, match="decode rows x"):
        pm._rows_decoder(kv).rows(torch.zeros(3, cfg.d_model), ba, torch.zeros(2, D), torch.zeros(2, D))
