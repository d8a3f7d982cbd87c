"""The fast QAT step's element passes (``csrc/qat.c`` through ``bitlm.kernels.qat_*``) against
their torch twins (``kernels.reference``) and ``bitlm.quant``, == on every native tier; and the
sharing of one input's activation codes (q/k/v, gate/up) and of W_fq in ``bitlm.layers``, against
today's fast projection computed op by op."""

from __future__ import annotations

import pytest
import torch

from bitlm import kernels
from bitlm import layers as L
from bitlm import quant as Q
from bitlm.kernels import native, reference
from bitlm.layers import BitLinear
from bitlm.model import BitNetModel
from bitlm.train import lm_loss
from helpers import VOCAB, tiny_config


def _codes(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)


@pytest.mark.parametrize("m,k", [(1, 1), (5, 37), (64, 256), (300, 683)])
@pytest.mark.parametrize("op", ["div", "mul"])
def test_qat_rows_to_f32_native_equals_reference(tier, m, k, op):
    q = _codes(m, k, m + k)
    f = torch.rand(m, generator=torch.Generator().manual_seed(k)) * 50 + 1e-3
    want = reference.qat_rows_to_f32(q, f, op)
    assert torch.equal(native.qat_rows_to_f32(q, f, op), want)
    # one factor for every row, given as a stride-0 view (the per-tensor scale) or one value
    one = f[:1].expand(m)
    want1 = reference.qat_rows_to_f32(q, one, op)
    assert torch.equal(native.qat_rows_to_f32(q, one, op), want1)
    assert torch.equal(native.qat_rows_to_f32(q, f[:1], op), want1)


def test_qat_rows_to_f32_is_the_ste_operands():
    """div: X_fq = q / a as fake_quant_activation computes it; mul: W_fq = dequantize_weight."""
    x = torch.randn(40, 70) * 3
    q, a = Q.activation_quantize(x, 8, "token")
    got = kernels.qat_rows_to_f32(q.to(torch.int8), a.reshape(-1), "div")
    assert torch.equal(got, q / a)
    w = torch.randn(24, 70)
    t, s = Q.ternary_quantize(w)
    assert torch.equal(kernels.qat_rows_to_f32(t, s, "mul"), Q.dequantize_weight(t, s, torch.float32))


def _weights(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(96, 256, generator=g) * 0.02, torch.randn(7, 37, generator=g), torch.zeros(4, 8)]
    tie = torch.tensor([[0.5, -0.5, 1.5, -1.5, 0.49999997, 2.5, -2.5, 1e9, -1e9, 0.0, -0.0, 1.0]])
    ws.append(tie)  # s = mean|w| is huge here, so also the same row scaled to s = 1 exactly below
    return ws


@pytest.mark.parametrize("i", range(4))
def test_qat_ternary_native_equals_reference_and_quant(tier, i):
    w = _weights(i)[i]
    t, s = Q.ternary_quantize(w)
    assert torch.equal(reference.qat_ternary(w, s), t)
    assert torch.equal(native.qat_ternary(w, s), t)
    one = torch.ones(1)  # w / 1 = w: the ties 0.5, 1.5, 2.5 round half to even
    assert torch.equal(native.qat_ternary(w, one), reference.qat_ternary(w, one))
    assert native.qat_ternary(torch.tensor([0.5, -0.5, 1.5, -1.5]), one).tolist() == [0, 0, 1, -1]


@pytest.mark.parametrize("i", range(4))
def test_qat_binary_native_equals_reference_and_quant(tier, i):
    w = _weights(i)[i]
    t, _, alpha = Q.binary_quantize(w)
    assert torch.equal(reference.qat_binary(w, alpha), t)
    assert torch.equal(native.qat_binary(w, alpha), t)
    at = torch.tensor([[1.0, 2.0, 0.5, 3.0]])  # w - α = 0 maps to -1 (the paper's Sign)
    assert native.qat_binary(at, torch.tensor([2.0])).tolist() == [[-1, -1, -1, 1]]


@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (2048, 64), (3, 4, 50)])
def test_qat_quantize_tensor_native_equals_reference_and_quant(tier, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 4
    want_q, want_a = Q.activation_quantize(x, 8, "tensor")
    q, a = reference.qat_quantize_tensor(x)
    assert torch.equal(q.float(), want_q) and torch.equal(a, want_a.reshape(1))
    nq, na = native.qat_quantize_tensor(x)
    assert nq.dtype == torch.int8 and torch.equal(nq, q) and torch.equal(na, a)
    z = torch.zeros(shape)  # the scale clamp
    assert torch.equal(native.qat_quantize_tensor(z)[1], reference.qat_quantize_tensor(z)[1])
    tie = torch.tensor([[127.0, 0.5, 1.5, -2.5, -0.5, 126.5]])  # a = 1: ties round half to even
    assert native.qat_quantize_tensor(tie)[0].tolist() == [[127, 0, 2, -2, 0, 126]]


@pytest.mark.parametrize("weight_quant", ["b1.58", "b1"])
def test_quantize_weight_codes_equals_weight_quantize(weight_quant):
    for w in _weights(9)[:3]:
        t, s = L.quantize_weight_codes(w, weight_quant)
        t0, s0 = Q.weight_quantize(w, weight_quant)
        assert torch.equal(t, t0) and torch.equal(s, s0)


def _todays_projection(x, m: BitLinear, g):
    """The fast projection before sharing, op by op: y = int8_product(q, a, T, s) (+ b),
    grad_x = g · dequantize_weight(T, s), grad_w = gᵀ · (q.float() / a), grad_b = Σ g."""
    x2 = x.reshape(-1, x.shape[-1])
    q, a = L.quantize_activation_rows(x2, m.act_granularity if m.training else m.act_granularity_eval)
    t, s = Q.weight_quantize(m.weight, m.weight_quant)
    y = L.int8_product(q, a, t, s)
    if m.bias is not None:
        y = y + m.bias.detach()
    g2 = g.reshape(-1, t.shape[0])
    grad_x = (g2 @ Q.dequantize_weight(t, s, torch.float32)).reshape(x.shape)
    grad_w = g2.t() @ q.to(torch.float32).div_(a.unsqueeze(1))
    grad_b = g2.sum(0) if m.bias is not None else None
    return y.reshape(*x.shape[:-1], -1), grad_x, grad_w, grad_b


@pytest.mark.parametrize("weight_quant,gran", [("b1.58", "token"), ("b1", "tensor")])
def test_shared_codes_equal_todays_projection(weight_quant, gran):
    """q/k/v on one input share one quantisation and one X_fq; outputs and every gradient are
    the very bits (==) of today's per-projection computation; the input's gradient is their sum
    in autograd's order (the last projection's first), as before."""
    torch.manual_seed(11)
    mods = [BitLinear(48, n, bias=n == 16, weight_quant=weight_quant, act_granularity=gran).train()
            for n in (32, 16, 16)]
    x = (torch.randn(3, 9, 48) * 2).requires_grad_()
    gs = [torch.randn(3, 9, mm.out_features) for mm in mods]
    calls = []
    real = L.quantize_activation_rows
    L.quantize_activation_rows = lambda *a: calls.append(1) or real(*a)
    try:
        ys = [mm(x) for mm in mods]
    finally:
        L.quantize_activation_rows = real
    assert len(calls) == 1  # one quantisation for the three projections
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    gxs = []
    for mm, y, g in zip(mods, ys, gs):
        wy, gx, gw, gb = _todays_projection(x.detach(), mm, g)
        assert torch.equal(y.detach(), wy)
        assert torch.equal(mm.weight.grad, gw)
        assert (mm.bias is None and gb is None) or torch.equal(mm.bias.grad, gb)
        gxs.append(gx)
    assert torch.equal(x.grad, (gxs[2] + gxs[1]) + gxs[0])  # autograd: the latest node's gradient first
    assert ys[0].grad_fn.name().startswith("_Int8Projection")


def test_codes_not_shared_across_different_or_changed_inputs():
    torch.manual_seed(12)
    a_mod, b_mod = BitLinear(32, 8).train(), BitLinear(32, 8).train()
    x = torch.randn(5, 32)
    y1 = a_mod(x)
    with torch.no_grad():
        x.mul_(3.0)  # in place: a new version, new codes
    assert torch.equal(b_mod(x), _todays_projection(x, b_mod, torch.zeros(5, 8))[0])
    assert not torch.equal(a_mod(x), y1)
    other = x.clone()  # equal values, another tensor: quantised again, the same result
    assert torch.equal(b_mod(other), b_mod(x))


def test_activation_dequant_released_after_the_last_backward():
    torch.manual_seed(13)
    mods = [BitLinear(16, 8).train() for _ in range(3)]
    x = torch.randn(4, 16, requires_grad=True)
    ys = [mm(x) for mm in mods]
    codes = ys[0].grad_fn.acodes
    assert codes is ys[2].grad_fn.acodes and codes.users == 3 and codes._xdq is None
    sum(y.sum() for y in ys).backward()
    assert codes.users == 0 and codes._xdq is None  # built once, dropped after the third backward


def test_backward_scratch_buffers_are_reused_and_values_unchanged():
    """X_fq and W_fq go back to the scratch pool after use: two backwards of one weight version
    reuse the same buffers, and give the same gradients (==) as the first."""
    torch.manual_seed(14)
    model = BitNetModel(tiny_config()).train()
    tok = torch.randint(0, VOCAB, (2, 17))

    def grads():
        model.zero_grad(set_to_none=True)
        lm_loss(model, tok[:, :-1], tok[:, 1:]).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    first = grads()
    pooled = {k: [t.data_ptr() for t in v] for k, v in L._SCRATCH.free.items()}
    assert pooled  # X_fq / W_fq / |w| buffers came back
    second = grads()
    assert {k: [t.data_ptr() for t in v] for k, v in L._SCRATCH.free.items()} == pooled
    for k in first:
        assert torch.equal(first[k], second[k]), k
