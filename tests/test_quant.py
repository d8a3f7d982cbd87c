"""Every formula of bitlm.quant against hand-computed values (paper equations in the docstrings)."""

import math

import pytest
import torch

from bitlm import quant as Q


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- rounding rule ---------------------------------------------------------------------------


def test_round_half_even_ties():
    x = t([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997, 126.5, 127.5])
    assert Q.round_half_even(x).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0, 0.0, 126.0, 128.0]


# --- b1.58 ternary absmean -------------------------------------------------------------------


def test_ternary_hand_computed():
    w = t([[0.3, -0.1, 0.0, 0.6], [-0.9, 0.15, 0.05, -0.25]])
    tq, s = Q.ternary_quantize(w)
    # mean|W| = (0.3+0.1+0+0.6+0.9+0.15+0.05+0.25)/8 = 2.35/8 = 0.29375
    assert s.tolist() == pytest.approx([0.29375])
    # W/s = [1.021, -0.340, 0, 2.043], [-3.064, 0.511, 0.170, -0.851] -> round, clip to [-1, 1]
    assert tq.tolist() == [[1, 0, 0, 1], [-1, 1, 0, -1]]
    assert tq.dtype == torch.int8


def test_ternary_ties_round_half_even():
    # mean|W| = 1 exactly: W/s = ±0.5 ties go to 0, 1.5 goes to 2 then clips to 1
    w = t([[0.5, -0.5, 1.5, 1.0, -1.5, 1.0]])
    tq, s = Q.ternary_quantize(w)
    assert s.item() == 1.0
    assert tq.tolist() == [[0, 0, 1, 1, -1, 1]]


def test_ternary_zeros_and_constant_rows():
    tq, s = Q.ternary_quantize(torch.zeros(3, 5))
    assert s.item() == pytest.approx(Q.SCALE_EPS)  # clamped, no division by zero
    assert (tq == 0).all()
    tq, s = Q.ternary_quantize(torch.full((2, 4), -0.7))
    assert s.item() == pytest.approx(0.7)
    assert (tq == -1).all()


def test_ternary_groups_along_output_dim():
    w = t([[1.0, -1.0], [2.0, 0.0], [0.1, 0.3], [-0.2, 0.0]])
    tq, s = Q.ternary_quantize(w, groups=2)
    # group 0 = rows 0-1: mean|W| = 1.0; group 1 = rows 2-3: mean|W| = 0.15
    assert s.tolist() == pytest.approx([1.0, 0.15])
    assert tq.tolist() == [[1, -1], [1, 0], [1, 1], [-1, 0]]
    with pytest.raises(ValueError, match="groups"):
        Q.ternary_quantize(w, groups=3)


def test_dequantize_is_s_times_t():
    w = torch.randn(8, 16)
    tq, s = Q.ternary_quantize(w, groups=4)
    deq = Q.dequantize_weight(tq, s)
    for g in range(4):
        rows = slice(2 * g, 2 * g + 2)
        assert torch.equal(deq[rows], tq[rows].float() * s[g])


# --- b1 binary -------------------------------------------------------------------------------


def test_binary_hand_computed_and_sign_zero():
    w = t([[1.0, 2.0], [3.0, -2.0]])
    tq, beta, alpha = Q.binary_quantize(w)
    assert alpha.item() == 1.0  # mean W
    assert beta.item() == 2.0  # mean |W| of W, not of W - alpha
    # W - alpha = [[0, 1], [2, -3]]: Sign(0) = -1 per the paper
    assert tq.tolist() == [[-1, 1], [1, -1]]


def test_binary_groups():
    w = t([[1.0, 3.0], [-1.0, -3.0]])
    tq, beta, alpha = Q.binary_quantize(w, groups=2)
    assert alpha.tolist() == [2.0, -2.0]
    assert beta.tolist() == [2.0, 2.0]
    assert tq.tolist() == [[-1, 1], [1, -1]]


def test_weight_quantize_dispatch():
    w = torch.randn(4, 4)
    assert torch.equal(Q.weight_quantize(w, "b1.58")[0], Q.ternary_quantize(w)[0])
    assert torch.equal(Q.weight_quantize(w, "b1")[0], Q.binary_quantize(w)[0])
    with pytest.raises(ValueError):
        Q.weight_quantize(w, "b2")


# --- activations -----------------------------------------------------------------------------


def test_activation_absmax_per_token():
    x = t([[0.5, -1.0, 0.25], [2.0, 0.0, -4.0]])
    q, a = Q.activation_quantize(x)
    assert a.flatten().tolist() == pytest.approx([127.0, 31.75])
    # row 0: [63.5, -127, 31.75] -> [64 (tie to even), -127, 32]; row 1: [63.5, 0, -127] -> [64, 0, -127]
    assert q.tolist() == [[64.0, -127.0, 32.0], [64.0, 0.0, -127.0]]


def test_activation_per_tensor_and_bits():
    x = t([[0.5, -1.0], [2.0, 4.0]])
    q, a = Q.activation_quantize(x, granularity="tensor")
    assert a.flatten().tolist() == pytest.approx([127 / 4])
    assert q.tolist() == [[16.0, -32.0], [64.0, 127.0]]  # 15.875->16, -31.75->-32, 63.5->64
    q4, a4 = Q.activation_quantize(x, bits=4)
    assert a4.flatten().tolist() == pytest.approx([7.0, 7 / 4])
    assert q4.tolist() == [[4.0, -7.0], [4.0, 7.0]]  # 3.5->4, -7, 3.5->4, 7


def test_activation_zero_row_and_clamp():
    q, a = Q.activation_quantize(torch.zeros(1, 4))
    assert (q == 0).all() and torch.isfinite(a).all()
    q, _ = Q.activation_quantize(torch.tensor([[1e30, -1e30, 1.0]]))
    assert q.max().item() <= 127 and q.min().item() >= -128


def test_activation_groups_along_features():
    x = t([[1.0, -2.0, 0.5, 0.25]])
    q, a = Q.activation_quantize(x, groups=2)
    assert a.flatten().tolist() == pytest.approx([127 / 2, 127 / 0.5])
    assert q.tolist() == [[64.0, -127.0, 127.0, 64.0]]  # 63.5->64, 31.75*2=63.5->64


def test_activation_nonneg_eta_shift():
    x = t([[-1.0, 0.0, 1.0, 3.0]])
    q, a, eta = Q.activation_quantize_nonneg(x)
    assert eta.flatten().tolist() == [-1.0]
    assert a.flatten().tolist() == pytest.approx([127 / 3])
    # (x - eta) * a = [0, 42.33, 84.67, 169.3 -> clip 127]
    assert q.tolist() == [[0.0, 42.0, 85.0, 127.0]]
    assert q.min() >= 0


# --- norms -----------------------------------------------------------------------------------


def test_group_layer_norm_and_rms_norm():
    x = t([[1.0, 3.0, 10.0, 14.0]])
    y = Q.group_layer_norm(x, groups=2, eps=0.0)
    assert y.flatten().tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    y = Q.group_layer_norm(x, groups=1, eps=0.0)
    mu, var = 7.0, ((36 + 16 + 9 + 49) / 4)
    assert y.flatten().tolist() == pytest.approx([(v - mu) / math.sqrt(var) for v in [1, 3, 10, 14]])
    r = Q.group_rms_norm(t([[3.0, 4.0]]), eps=0.0)
    assert r.flatten().tolist() == pytest.approx([3 / math.sqrt(12.5), 4 / math.sqrt(12.5)])


# --- STE and λ warm-up -----------------------------------------------------------------------


def test_ste_identity_gradient_even_when_clamped():
    w = torch.tensor([[3.0, -0.01, 0.2, -5.0]], requires_grad=True)
    y = Q.fake_quant_weight(w, "b1.58")
    s = w.detach().abs().mean()
    assert torch.allclose(y, torch.tensor([[1.0, 0.0, 0.0, -1.0]]) * s)
    y.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert w.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]  # identity, clamp does not zero it


def test_ste_activation_gradient_and_no_scale_gradient():
    x = torch.tensor([[0.3, -2.0, 1.1]], requires_grad=True)
    y = Q.fake_quant_activation(x)
    (y * torch.tensor([[1.0, -1.0, 2.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, -1.0, 2.0]]  # no extra term from d(scale)/dx


def test_lambda_warmup_interpolates():
    w = torch.tensor([[0.9, -0.3, 0.1, 0.4]], requires_grad=True)
    q = Q.fake_quant_weight(w, "b1.58").detach()
    for lam in (0.0, 0.25, 1.0):
        y = Q.fake_quant_weight(w, "b1.58", lam=lam)
        assert torch.allclose(y, (1 - lam) * w.detach() + lam * q)
    y = Q.fake_quant_weight(w, "b1.58", lam=torch.tensor(0.5))
    y.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_fake_quant_binary_values():
    w = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    y = Q.fake_quant_weight(w, "b1")
    assert y.tolist() == [[-2.0, 2.0], [2.0, -2.0]]  # β · Sign(W - α)


def test_bits_per_weight():
    assert Q.bits_per_weight("b1") == 1.0
    assert Q.bits_per_weight("b1.58") == pytest.approx(math.log2(3))


# --- η variant with γ = range, input-dim weight groups (issue 10 item 15) ---------------------


def test_activation_nonneg_range_hand_computed():
    x = t([[-1.0, 0.0, 1.0, 3.0]])
    q, a, eta = Q.activation_quantize_nonneg(x, gamma="range")
    # η = -1, γ = max - η = 4, a = 127/4 = 31.75; (x - η)·a = [0, 31.75, 63.5, 127] → ties to even
    assert eta.flatten().tolist() == [-1.0] and a.flatten().tolist() == pytest.approx([31.75])
    assert q.tolist() == [[0.0, 32.0, 64.0, 127.0]]
    y = Q.fake_quant_activation_nonneg(x)
    assert torch.allclose(y, t([[-1.0, 32 / 31.75 - 1, 64 / 31.75 - 1, 3.0]]))
    # Eq. 6 as printed (γ = max|x| = 3) saturates; the range variant never does
    big = t([[-4.0, -1.0, 1.0, 4.0]])
    assert Q.fake_quant_activation_nonneg(big, gamma="absmax")[0, 2:].tolist() == pytest.approx([0.0, 0.0])
    assert torch.allclose(Q.fake_quant_activation_nonneg(big), big, atol=8 / 127)


def test_activation_nonneg_groups_and_per_tensor():
    x = t([[0.0, 2.0, -3.0, 1.0], [1.0, 4.0, -1.0, -1.0]])
    _, a, eta = Q.activation_quantize_nonneg(x, groups=2, gamma="range")
    assert eta.tolist() == [[0.0, -3.0], [1.0, -1.0]]  # one η per token and feature group (Eq. 14)
    assert a.flatten().tolist() == pytest.approx([127 / 2, 127 / 4, 127 / 3, 127 / 1e-5])  # constant group: γ clamped
    _, a, eta = Q.activation_quantize_nonneg(x, granularity="tensor", gamma="range")
    assert eta.flatten().tolist() == [-3.0] and a.flatten().tolist() == pytest.approx([127 / 7])


def test_activation_nonneg_ste_identity():
    x = t([[-1.0, 0.5, 2.0, 9.0]]).requires_grad_(True)
    (Q.fake_quant_activation_nonneg(x) * t([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_weight_groups_along_input_dim():
    w = t([[1.0, -1.0, 0.1, 0.3], [2.0, 0.0, -0.2, 0.0]])
    tq, s = Q.ternary_quantize(w, groups=2, dim="in")
    # group 0 = columns 0-1: mean|W| = 1.0; group 1 = columns 2-3: mean|W| = 0.15
    assert s.tolist() == pytest.approx([1.0, 0.15])
    assert tq.tolist() == [[1, -1, 1, 1], [1, 0, -1, 0]]
    deq = Q.dequantize_weight(tq, s, dim="in")
    assert torch.allclose(deq, t([[1.0, -1.0, 0.15, 0.15], [1.0, 0.0, -0.15, 0.0]]))
    tb, beta, alpha = Q.binary_quantize(w, groups=2, dim="in")
    assert alpha.tolist() == pytest.approx([0.5, 0.05]) and beta.tolist() == pytest.approx([1.0, 0.15])
    assert tb.tolist() == [[1, -1, 1, 1], [1, -1, -1, -1]]
    with pytest.raises(ValueError, match="groups"):
        Q.ternary_quantize(w, groups=3, dim="in")
    with pytest.raises(ValueError, match="group dim"):
        Q.ternary_quantize(w, dim="rows")


def test_one_group_is_the_ungrouped_quantiser_exactly():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    for dim in ("out", "in"):
        for fn in (Q.ternary_quantize, Q.binary_quantize):
            for a, b in zip(fn(w), fn(w, 1, dim)):
                assert torch.equal(a, b)
        assert torch.equal(Q.fake_quant_weight(w, "b1.58"), Q.fake_quant_weight(w, "b1.58", 1, 1.0, dim))


def test_ste_short_path_forward_is_q_exactly_and_gradient_unchanged():
    """λ = 1: one autograd node (not sub + add), the forward value q itself (x + (q - x) may
    miss q in the last bit), and the identity gradient the x + (q - x).detach() form gives."""
    torch.manual_seed(3)
    w = (torch.randn(64, 48) * 0.02).requires_grad_()
    q = Q.dequantize_weight(*Q.ternary_quantize(w))
    y = Q.ste(w, q)
    assert type(y.grad_fn).__name__ == "_StraightThroughBackward"
    assert torch.equal(y, q)
    g = torch.randn_like(y)
    y.backward(g)
    w2 = w.detach().clone().requires_grad_()
    (w2 + (q - w2).detach()).backward(g)
    assert torch.equal(w.grad, w2.grad)
    with torch.no_grad():  # eval: q, no autograd node
        assert torch.equal(Q.ste(w, q), q)


def test_bitlinear_takes_the_short_ste_path_and_matches_the_long_one():
    from bitlm.layers import BitLinear, set_quant_lambda

    torch.manual_seed(0)
    lin = BitLinear(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    gw, gx = lin.weight.grad.clone(), x.grad.clone()
    # the long form: λ as a tensor (what BitLinear passed before)
    lam = torch.tensor(1.0)
    x2 = x.detach().clone().requires_grad_()
    w2 = lin.weight.detach().clone().requires_grad_()
    xq = Q.fake_quant_activation(x2, 8, "token", 1, lam)
    y2 = torch.nn.functional.linear(xq, Q.fake_quant_weight(w2, "b1.58", 1, lam))
    y2.sum().backward()
    assert torch.allclose(y, y2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gw, w2.grad, rtol=1e-5, atol=1e-6) and torch.allclose(gx, x2.grad, rtol=1e-5, atol=1e-6)
    # λ changed through the buffer is seen at once (the cached float follows the buffer's version)
    set_quant_lambda(lin, 0.0)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight))
    lin.load_state_dict({**lin.state_dict(), "quant_lambda": torch.tensor(1.0)})
    assert torch.allclose(lin(x), y, rtol=1e-6, atol=1e-7)
