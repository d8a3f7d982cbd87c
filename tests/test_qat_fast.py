"""The fast QAT step (``bitlm.layers``): the per-version weight-code cache and the integer
projection ``_Int8Projection``, each against the fake-quant float path it replaces
(``BITLM_QAT_FAST=0`` / ``layers.QAT_FAST = False``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bitlm import layers as L
from bitlm import quant as Q
from bitlm.layers import BitLinear, quantize_activation_rows, set_quant_lambda
from bitlm.model import BitNetModel
from bitlm.train import TrainConfig, lm_loss, make_optimizer
from helpers import VOCAB, tiny_config


@pytest.fixture
def legacy(monkeypatch):
    """A function running ``fn()`` with the fast step off (the path before it existed)."""

    def run(fn):
        monkeypatch.setattr(L, "QAT_FAST", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(L, "QAT_FAST", True)

    return run


def _fwd_bwd(m: BitLinear, x: torch.Tensor, g: torch.Tensor):
    """(y, grad_x, grad_w, grad_b) of one forward + backward from fresh gradients."""
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = m(x)
    y.backward(g)
    return y.detach(), x.grad, m.weight.grad, None if m.bias is None else m.bias.grad


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (64, 256, 96), (300, 37, 29), (2048, 704, 256), (2048, 301, 67)])
def test_int8_product_native_equals_torch_int_mm(m, k, n, monkeypatch):
    """The native W8A8 kernel and torch._int_mm + the epilogue: the same float32 bits."""
    g = torch.Generator().manual_seed(m + k)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    t = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    a = torch.rand(m, generator=g) * 10 + 0.01
    s = torch.rand((), generator=g) + 0.001
    monkeypatch.setattr(L, "QAT_MATMUL", "torch")
    want = L.int8_product(q, a, t, s)
    assert torch.equal(want, torch._int_mm(q, t.t()).float() * (s / a).unsqueeze(1))
    monkeypatch.setattr(L, "QAT_MATMUL", "native")
    got = L.int8_product(q, a, t, s)
    assert torch.equal(got, want)


def _fake_quant_bound(m: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """|X_fq|·|W_fq|ᵀ: the scale of the float sums' rounding error in the fake-quant path."""
    q, a = Q.activation_quantize(x.detach(), 8, m.act_granularity if m.training else m.act_granularity_eval)
    t, s = Q.weight_quantize(m.weight, m.weight_quant)
    return (q.abs() / a) @ (t.abs().float() * s).T  # a: (..., 1)


@pytest.mark.parametrize("weight_quant", ["b1.58", "b1"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 37), (64, 48)])  # K=37: not a multiple of anything
@pytest.mark.parametrize("gran", ["token", "tensor"])  # per tensor: the b1 paper's training granularity
def test_int8_projection_equals_fake_quant_path(weight_quant, bias, shape, gran, legacy):
    torch.manual_seed(0)
    k, n = shape[-1], 29
    m = BitLinear(k, n, bias=bias, weight_quant=weight_quant, act_granularity=gran).train()
    x = torch.randn(*shape) * 3
    x[..., 0, :] = 0.0  # an all-zero token: the scale clamp
    g = torch.randn(*shape[:-1], n)
    fast = _fwd_bwd(m, x, g)
    assert m(x.requires_grad_()).grad_fn.name().startswith("_Int8Projection")  # the fast path ran
    ref = legacy(lambda: _fwd_bwd(m, x, g))
    # forward: exact integer sums; the only differences are the float path's rounding of its sums
    # and of the scale multiply (float32 eps · the sum of |terms|)
    assert (fast[0] - ref[0]).abs().le(1e-6 * _fake_quant_bound(m, x) + 1e-6).all()
    assert not torch.equal(fast[0], torch.zeros_like(fast[0]))
    # backward: the STE's gradients, the same float32 products
    for got, want in zip(fast[1:], ref[1:]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_int8_projection_eval_and_no_grad(legacy):
    torch.manual_seed(1)
    m = BitLinear(40, 24, bias=True).eval()
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        y = m(x)
        want = legacy(lambda: m(x))
    assert (y - want).abs().le(1e-6 * _fake_quant_bound(m, x) + 1e-6).all()


def test_int8_projection_saves_int8_codes_not_float_copies():
    """The autograd graph of the fast projection holds the int8 codes + scales, not a float32 X."""
    torch.manual_seed(2)
    m = BitLinear(64, 32).train()
    x = torch.randn(128, 64, requires_grad=True)

    def saved(fast: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        L.QAT_FAST = fast
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
                m(x)
        finally:
            L.QAT_FAST = True
        return out

    fast, slow = saved(True), saved(False)
    big_float = [t for t in fast if t.dtype == torch.float32 and t.numel() >= x.numel()]
    assert big_float == []
    assert any(t.dtype == torch.int8 and t.shape == x.shape for t in fast)
    assert sum(t.numel() * t.element_size() for t in fast) < sum(t.numel() * t.element_size() for t in slow) / 2


@pytest.mark.parametrize("kw", [
    dict(weight_groups=2), dict(act_groups=2), dict(act_granularity="tensor", act_groups=2), dict(act_nonneg=True),
    dict(act_quant="absmean", act_bits=4), dict(act_topk=0.5), dict(hadamard=True), dict(act_bits=None),
    dict(norm="rmsnorm", weight_groups=2, weight_group_dim="in"),
])
def test_other_cases_keep_the_float_path_exactly(kw, legacy):
    """Groups, per-tensor / η / absmean / top-K / Hadamard activations: the float path, and with
    the weight cache the very same values (==) as without it."""
    torch.manual_seed(3)
    m = BitLinear(32, 16, bias=True, **kw).train()
    x, g = torch.randn(4, 6, 32), torch.randn(4, 6, 16)
    got = _fwd_bwd(m, x, g)
    assert "Int8Projection" not in m(x).grad_fn.name()
    want = legacy(lambda: _fwd_bwd(m, x, g))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_quant", ["b1.58", "b1"])
def test_lambda_below_one_keeps_the_float_path_exactly(weight_quant, legacy):
    torch.manual_seed(4)
    m = BitLinear(32, 16, bias=True, weight_quant=weight_quant, quant_lambda=0.3).train()
    x, g = torch.randn(5, 32), torch.randn(5, 16)
    got = _fwd_bwd(m, x, g)
    assert "Int8Projection" not in m(x).grad_fn.name()
    want = legacy(lambda: _fwd_bwd(m, x, g))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_weight_codes_cached_once_per_optimizer_step():
    """Micro-batches and evaluation reuse one quantisation per weight version; the optimizer's
    in-place update, load_state_dict and a dtype change invalidate it; the codes always equal a
    fresh quantisation of the current weight."""
    torch.manual_seed(5)
    model = BitNetModel(tiny_config()).train()
    bls = [m for m in model.modules() if isinstance(m, BitLinear)]
    opt = make_optimizer(model, TrainConfig(recipe="fp").resolved(), 1e-8)

    def counts() -> list[int]:
        return [m.__dict__.get("weight_quantizations", 0) for m in bls]

    x = torch.randint(0, VOCAB, (3, 2, 17))
    for step in range(3):
        for micro in range(3):  # grad accumulation: three forwards, one quantisation
            (lm_loss(model, x[micro, :, :-1], x[micro, :, 1:]) / 3).backward()
        assert counts() == [step + 1] * len(bls)
        model.eval()
        with torch.no_grad():
            model(x[0])  # evaluation between steps: still the same codes
        model.train()
        assert counts() == [step + 1] * len(bls)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in bls:  # after the update: the cache is stale and must not be used
            t, s = m.cached_quantized_weight()
            t0, s0 = Q.weight_quantize(m.weight, m.weight_quant)
            assert torch.equal(t, t0) and torch.equal(s, s0)
        assert counts() == [step + 2] * len(bls)
    state = {k: v.clone() * 1.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    for m in bls:
        t, s = m.cached_quantized_weight()
        assert torch.equal(s, Q.weight_quantize(m.weight, m.weight_quant)[1])
    n = counts()
    model.double()
    model(x[0])
    assert counts() == [c + 1 for c in n]


def test_weight_cache_off_under_legacy_switch(legacy):
    m = BitLinear(16, 8)
    assert legacy(lambda: m.cached_quantized_weight()) is None
    m(torch.randn(2, 16))
    m(torch.randn(2, 16))
    assert m.weight_quantizations == 1


def test_quantize_activation_rows_equals_activation_quantize(monkeypatch):
    torch.manual_seed(6)
    x = torch.randn(50, 70) * torch.logspace(-6, 3, 50).unsqueeze(1)
    x[3] = 0.0
    x[4, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # a = 1: ties round half to even
    want_q, want_a = Q.activation_quantize(x, 8, "token")
    for backend in ("native", "reference"):
        monkeypatch.setenv("BITLM_BACKEND", backend)
        q, a = quantize_activation_rows(x)
        assert q.dtype == torch.int8 and torch.equal(q.float(), want_q) and torch.equal(a, want_a.reshape(-1))
    want_q, want_a = Q.activation_quantize(x, 8, "tensor")
    q, a = quantize_activation_rows(x, "tensor")
    assert torch.equal(q.float(), want_q) and a.shape == (50,) and torch.equal(a, want_a.reshape(1).expand(50))


@pytest.mark.parametrize("name", ["tiny", "tiny-bitnet"])  # b1.58 per-token, b1 per-tensor activations
def test_tiny_model_training_fast_equals_legacy(name, legacy):
    """Three AdamW steps of a tiny model: losses and weights agree to float rounding."""

    def run():
        torch.manual_seed(7)
        model = BitNetModel(tiny_config(name)).train()
        assert any(isinstance(m, BitLinear) for m in model.modules())
        opt = make_optimizer(model, TrainConfig(recipe="fp").resolved(), 1e-8)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            tok = torch.randint(0, VOCAB, (2, 17), generator=g)
            loss = lm_loss(model, tok[:, :-1], tok[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, model.state_dict()

    fast, ref = run(), legacy(run)
    assert fast[0] == pytest.approx(ref[0], rel=1e-5)
    for k in ref[1]:
        torch.testing.assert_close(fast[1][k], ref[1][k], rtol=1e-4, atol=1e-5)


def test_autocast_and_other_dtypes_keep_the_float_path():
    m = BitLinear(16, 8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Int8Projection" not in m(torch.randn(2, 16, requires_grad=True)).grad_fn.name()
    m64 = BitLinear(16, 8, dtype=torch.float64).train()
    y = m64(torch.randn(2, 16, dtype=torch.float64, requires_grad=True))
    assert y.dtype == torch.float64 and "Int8Projection" not in y.grad_fn.name()


def test_set_quant_lambda_switches_paths():
    m = BitLinear(16, 8).train()
    x = torch.randn(2, 16, requires_grad=True)
    assert m(x).grad_fn.name().startswith("_Int8Projection")
    set_quant_lambda(m, 0.5)
    assert "Int8Projection" not in m(x).grad_fn.name()
    set_quant_lambda(m, 1.0)
    assert m(x).grad_fn.name().startswith("_Int8Projection")


@pytest.mark.parametrize("value, fast", [("0", False), ("off", False), ("1", True), (None, True)])
def test_env_switch(value, fast):
    env = {k: v for k, v in os.environ.items() if k != "BITLM_QAT_FAST"}
    if value is not None:
        env["BITLM_QAT_FAST"] = value
    code = ("import torch; from bitlm.layers import BitLinear, QAT_FAST; m = BitLinear(8, 4).train(); "
            "print(QAT_FAST, m(torch.randn(2, 8, requires_grad=True)).grad_fn.name())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    assert out[0] == str(fast) and out[1].startswith("_Int8Projection") == fast


def test_weight_cache_off_when_storage_is_rewritten_in_place():
    """``weight_cache = False`` (what ``parallel.wrap_model`` sets under FSDP2, whose all-gather
    rewrites the weight's storage without a version bump): every forward quantises afresh, and the
    fast projection still runs."""
    torch.manual_seed(8)
    m = BitLinear(16, 8).train()
    x = torch.randn(3, 16, requires_grad=True)
    m(x)
    with torch.no_grad():  # a write that bypasses the version counter, as a collective's output does
        m.weight.data.copy_(torch.randn(8, 16))
    assert m.cached_quantized_weight()[1] != Q.weight_quantize(m.weight, "b1.58")[1]  # stale: why it exists
    m.weight_cache = False
    assert m.cached_quantized_weight() is None
    y = m(x)
    assert y.grad_fn.name().startswith("_Int8Projection")
    m.weight_cache = True
    m.__dict__.pop("_wq_cache")
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)


def test_scratch_made_under_inference_mode_serves_a_later_training_step():
    """The fast step's scratch pool (|w|, W_fq buffers): a buffer first made during an
    inference_mode forward (generation) comes back to a training step outside it — it must be a
    normal tensor, not an inference tensor (in-place writes to those fail outside the mode)."""
    torch.manual_seed(0)
    m = BitNetModel(tiny_config()).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.inference_mode():
        m(ids)
    loss = lm_loss(m, ids, ids)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
