"""Post-training quantisation baselines (bitlm.ptq): absmax RTN, SmoothQuant, GPTQ."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from bitlm import ptq
from bitlm import quant as Q
from bitlm.config import preset
from bitlm.model import BitNetModel
from helpers import tiny_model


class Toy(nn.Module):
    """ids → embedding → one projection → head: the smallest model quantize_model accepts."""

    def __init__(self, vocab: int = 64, d: int = 32, out: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, out, bias=False)
        self.lm_head = nn.Linear(out, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.proj(self.embed(ids)))


def toy_with_weight(w: torch.Tensor) -> Toy:
    t = Toy(d=w.shape[1], out=w.shape[0])
    with torch.no_grad():
        t.proj.weight.copy_(w)
    return t


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(quant="fp")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# Registry and bad input
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_bits():
    expected = {
        "absmax-w8a8": (8, 8),
        "absmax-w4a4": (4, 4),
        "absmax-w2a16": (2, None),
        "absmax-w1.58a8": (1.584962500721156, 8),
        "absmax-w1a8": (1, 8),
        "smoothquant-w8a8": (8, 8),
        "smoothquant-w4a4": (4, 4),
        "smoothquant-w1a8": (1, 8),
        "gptq-w4a16": (4, None),
        "gptq-w2a16": (2, None),
        "gptq-w1.58a16": (1.584962500721156, None),
    }
    assert {n: (m.w_bits, m.a_bits) for n, m in ptq.METHODS.items()} == expected
    assert ptq.METHODS["absmax-w1.58a8"].label == "W1.58A8"
    assert ptq.METHODS["gptq-w2a16"].label == "W2A16"
    assert not ptq.METHODS["absmax-w8a8"].needs_calib and ptq.METHODS["gptq-w4a16"].needs_calib


def test_unknown_method_lists_valid_ones(tiny):
    with pytest.raises(ValueError) as e:
        ptq.quantize_model(tiny, "awq-w4a16")
    msg = str(e.value)
    assert "\n" not in msg and "awq-w4a16" in msg
    assert all(name in msg for name in ptq.METHODS)


@pytest.mark.parametrize("method", ["smoothquant-w8a8", "gptq-w4a16"])
def test_calibration_required(tiny, method):
    with pytest.raises(ValueError, match="needs calibration data"):
        ptq.quantize_model(tiny, method)


def test_bad_calibration_and_options(tiny, calib):
    with pytest.raises(ValueError, match="shape"):
        ptq.quantize_model(tiny, "gptq-w4a16", torch.randn(4, 8))
    with pytest.raises(ValueError, match="shape"):
        ptq.quantize_model(tiny, "gptq-w4a16", calib[0])
    with pytest.raises(TypeError, match="alpha"):
        ptq.quantize_model(tiny, "absmax-w8a8", alpha=0.5)  # alpha is a SmoothQuant option


def test_quantised_model_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        ptq.quantize_model(BitNetModel(preset("tiny")), "absmax-w8a8")  # tiny defaults to b1.58


# ---------------------------------------------------------------------------------------------
# Absmax round-to-nearest: hand-computed codes and scales (ties go to even)
# ---------------------------------------------------------------------------------------------


def test_absmax_w4_per_channel_hand_computed():
    w = torch.tensor([[7.0, 2.5, -0.5, 3.5], [-14.0, 5.0, 3.0, 1.0]])
    qw = ptq.absmax_weight(w, 4)  # qmax = 7: s = max|row| / 7 = (1, 2)
    assert torch.equal(qw.scale, torch.tensor([[1.0], [2.0]]))
    # 2.5 → 2, -0.5 → 0, 3.5 → 4;  row 2 / 2 = (-7, 2.5, 1.5, 0.5) → (-7, 2, 2, 0)
    assert torch.equal(qw.codes, torch.tensor([[7, 2, 0, 4], [-7, 2, 2, 0]], dtype=torch.int8))
    assert torch.equal(qw.weight, torch.tensor([[7.0, 2.0, 0.0, 4.0], [-14.0, 4.0, 4.0, 0.0]]))
    assert torch.equal(qw.zero, torch.zeros(2, 1))


def test_absmax_per_tensor_8_and_2_bits():
    w = torch.tensor([[7.0, 2.5, -0.5, 3.5], [-14.0, 5.0, 3.0, 1.0]])
    qw = ptq.absmax_weight(w, 4, granularity="tensor")  # s = 14 / 7 = 2
    assert qw.scale.shape == (1, 1) and qw.scale.item() == 2.0
    # /2 = (3.5, 1.25, -0.25, 1.75 | -7, 2.5, 1.5, 0.5)
    assert qw.codes.tolist() == [[4, 1, 0, 2], [-7, 2, 2, 0]]

    w8 = torch.tensor([[127.0, 2.5, -1.5, -127.0]])
    q8 = ptq.absmax_weight(w8, 8)
    assert q8.scale.item() == 1.0 and q8.codes.tolist() == [[127, 2, -2, -127]]

    w2 = torch.tensor([[4.0, 2.0, -2.0, 1.0]])  # 2 bits: qmax = 1, s = max|w|, i.e. ternary
    q2 = ptq.absmax_weight(w2, 2)
    assert q2.scale.item() == 4.0 and q2.codes.tolist() == [[1, 0, 0, 0]]


def test_absmax_codes_match_project_rounding_rule():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    qw = ptq.absmax_weight(w, 4)
    expected = Q.round_half_even(w / qw.scale).clamp(-8, 7)
    assert torch.equal(qw.codes.float(), expected)
    assert qw.codes.abs().max() <= 7 and torch.equal(qw.weight, qw.scale * qw.codes.float())


def test_bitnet_quantisers_post_hoc_through_quantize_model():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    t = toy_with_weight(w)
    # ternary absmean, per tensor: s = mean|W| = 1; 0.5 → 0 (tie to even), -2 → -1 (clip)
    lin = ptq.quantize_model(t, "absmax-w1.58a8").proj
    assert isinstance(lin, ptq.PTQLinear) and lin.act_bits == 8
    assert lin.codes.tolist() == [[1, -1], [0, 0]] and lin.scale.item() == 1.0
    assert torch.equal(lin.weight, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    # binary: α = mean W = 0, sign(W − α) with β = mean|W| = 1
    lin = ptq.quantize_model(t, "absmax-w1a8").proj
    assert lin.codes.tolist() == [[1, -1], [1, 1]] and lin.scale.item() == 1.0
    # per-row ternary on request (quant.py groups over the output dim)
    lin = ptq.quantize_model(t, "absmax-w1.58a8", weight_granularity="channel").proj
    assert lin.scale.flatten().tolist() == [1.5, 0.5] and lin.codes.tolist() == [[1, -1], [1, 1]]


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_quant_bounds(bits):
    """With an identity weight the layer returns its quantised input: per-token grid, bounded error."""
    qmax = 2 ** (bits - 1) - 1
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)) * 3
    lin = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(16))
    layer = ptq.PTQLinear(lin.weight, None, None, act_bits=bits)
    y = layer(x)
    gamma = x.abs().amax(dim=-1, keepdim=True)
    codes = y * (qmax / gamma)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() <= qmax + 1e-4
    assert ((y - x).abs() <= gamma / (2 * qmax) + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------------


def test_smoothing_factors_formula():
    xmax = torch.tensor([16.0, 1.0, 0.0, 4.0])
    w1 = torch.tensor([[1.0, -4.0, 1.0, 1.0]])
    w2 = torch.tensor([[-4.0, 1.0, 2.0, 0.0]])
    s = ptq.smoothing_factors(xmax, [w1, w2], alpha=0.5)
    # sqrt(16)/sqrt(4) = 2, sqrt(1)/sqrt(4) = 0.5, dead channel → 1, sqrt(4)/sqrt(1) = 2
    assert s.tolist() == [2.0, 0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="alpha"):
        ptq.smoothing_factors(xmax, [w1], alpha=1.5)


def test_smoothing_is_equivalent_before_quantisation(tiny, calib):
    smoothed = ptq.smooth_model(tiny, calib)
    layers = [m for m in smoothed.modules() if isinstance(m, ptq.PTQLinear)]
    assert len(layers) == 14 and all(m.input_scale is not None for m in layers)
    assert any((m.input_scale - 1).abs().max() > 0.1 for m in layers)  # it really rescaled
    # layers reading one tensor share s, so it could be folded into the norm that produced it
    attn = smoothed.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.input_scale, attn.k_proj.input_scale)
    assert torch.equal(attn.q_proj.input_scale, attn.v_proj.input_scale)
    with torch.no_grad():
        ref, out = tiny(calib), smoothed(calib)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_smoothquant_reduces_activation_error_with_outlier_channel():
    torch.manual_seed(0)
    t = Toy()
    with torch.no_grad():  # LLM-like activations: a few channels ~50× larger than the rest
        t.embed.weight[:, 3] *= 50
        t.embed.weight[:, 17] *= 20
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = t.embed(ids)
        ref = t.proj(x)
        for bits in ("w8a8", "w4a4"):
            e_abs = rel(ptq.quantize_model(t, f"absmax-{bits}").proj(x), ref)
            e_sq = rel(ptq.quantize_model(t, f"smoothquant-{bits}", ids).proj(x), ref)
            assert e_sq < 0.6 * e_abs, (bits, e_sq, e_abs)  # measured: 0.0036 vs 0.012, 0.069 vs 0.13


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------


def correlated_problem(n_in=128, n_out=64, n=1024, seed=0):
    """Inputs with strong cross-channel correlation (low-rank plus noise), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, n_in // 4, generator=g)
    x = z @ torch.randn(n_in // 4, n_in, generator=g) + 0.1 * torch.randn(n, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    return x, w


def naive_gptq(w, h, grid, damp=0.01):
    """The OBQ-style update of the GPTQ paper (Eq. 2-3) with explicit H⁻¹ downdates, in float64:
    an independent oracle for the Cholesky + lazy-batch implementation."""
    w = w.double().clone()
    h = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    scale, zero = grid.params(w.float())
    scale, zero = scale.double().squeeze(1), zero.double().squeeze(1)
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q = grid.encode(w[:, i], scale, zero)
        codes[:, i] = q
        err = (w[:, i] - scale * (q - zero)) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    x, w = correlated_problem()
    h = ptq.hessian(x)
    ref = x @ w.T
    for sym in (False, True):
        grid = ptq.Grid("int", bits, sym=sym)
        e_rtn = rel(x @ ptq.rtn_quantize(w, grid).weight.T, ref)
        e_gptq = rel(x @ ptq.gptq_quantize(w, h, grid).weight.T, ref)
        # measured (asym / sym): 4 bits 0.099 → 0.037 / 0.117 → 0.042; 2 bits 0.489 → 0.200 / 0.744 → 0.305
        assert e_gptq < 0.6 * e_rtn, (bits, sym, e_gptq, e_rtn)


@pytest.mark.parametrize("bits,sym", [(4, False), (2, False), (2, True)])
def test_gptq_codes_on_grid_and_dequantise_exactly(bits, sym):
    x, w = correlated_problem(n_in=96, n_out=24, n=512, seed=1)
    grid = ptq.Grid("int", bits, sym=sym)
    qw = ptq.gptq_quantize(w, ptq.hessian(x), grid, group_size=32)
    assert qw.codes.dtype == torch.int8 and qw.scale.shape == (24, 3)
    assert grid.qmin <= qw.codes.min() and qw.codes.max() <= grid.qmax
    assert torch.equal(qw.zero, qw.zero.round())
    expanded = (qw.scale.repeat_interleave(32, 1), qw.zero.repeat_interleave(32, 1))
    assert torch.equal(qw.weight, expanded[0] * (qw.codes.float() - expanded[1]))


def test_gptq_ternary_grid():
    x, w = correlated_problem()
    h, ref = ptq.hessian(x), x @ w.T
    for how in ("absmean", "search"):
        grid = ptq.Grid("ternary", ternary_scale=how)
        qw = ptq.gptq_quantize(w, h, grid)
        assert set(qw.codes.unique().tolist()) <= {-1, 0, 1}
        assert torch.equal(qw.weight, qw.scale * qw.codes.float())
        assert rel(x @ qw.weight.T, ref) < 0.8 * rel(x @ ptq.rtn_quantize(w, grid).weight.T, ref)
    # the searched scale is never worse for plain RTN (absmean is one of its candidates)
    e = {
        how: (w - ptq.rtn_quantize(w, ptq.Grid("ternary", ternary_scale=how)).weight).norm()
        for how in ("absmean", "search")
    }
    assert e["search"] <= e["absmean"]


def test_gptq_matches_naive_obq_formulation():
    x, w = correlated_problem(n_in=48, n_out=16, n=256, seed=2)
    h = ptq.hessian(x)
    for grid in (ptq.Grid("int", 4), ptq.Grid("int", 2, sym=True), ptq.Grid("ternary")):
        fast = ptq.gptq_quantize(w, h, grid, block_size=16)
        slow = naive_gptq(w, h, grid)
        assert (fast.codes.double() != slow).float().mean() < 0.01  # float32 vs float64: rare ties only


def test_gptq_identity_hessian_is_rtn_and_lazy_batching_is_exact():
    x, w = correlated_problem(n_in=96, n_out=16, n=512, seed=3)
    for grid in (ptq.Grid("int", 4), ptq.Grid("int", 2, sym=True), ptq.Grid("ternary")):
        # uncorrelated inputs: nothing to compensate, GPTQ must be round-to-nearest
        assert torch.equal(ptq.gptq_quantize(w, torch.eye(96), grid).codes, ptq.rtn_quantize(w, grid).codes)
        h = ptq.hessian(x)
        a = ptq.gptq_quantize(w, h, grid, block_size=128)
        b = ptq.gptq_quantize(w, h, grid, block_size=7)  # blocks that do not divide 96
        assert (a.codes != b.codes).float().mean() < 0.01


def test_gptq_act_order_and_dead_inputs():
    x, w = correlated_problem(n_in=64, n_out=16, n=512, seed=4)
    x[:, 5] = 0  # an input channel that never fires
    h = ptq.hessian(x)
    grid = ptq.Grid("int", 4)
    qw = ptq.gptq_quantize(w, h, grid, act_order=True, group_size=16)
    assert torch.isfinite(qw.weight).all()
    assert rel(x @ qw.weight.T, x @ w.T) < rel(x @ ptq.rtn_quantize(w, grid, 16).weight.T, x @ w.T)


# ---------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(ptq.METHODS))
def test_every_method_on_tiny_model(tiny, calib, method):
    before = copy.deepcopy(tiny.state_dict())
    q = ptq.quantize_model(tiny, method, calib, progress=False)
    # the original is untouched: same tensors, same plain nn.Linear modules
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert all(type(m) is nn.Linear for _, m in ptq.quantizable_linears(tiny))
    layers = [m for m in q.modules() if isinstance(m, ptq.PTQLinear)]
    assert len(layers) == 14 and all(m.method == method for m in layers)
    assert type(q.lm_head) is nn.Linear and torch.equal(q.lm_head.weight, tiny.lm_head.weight)
    assert torch.equal(q.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    assert all(torch.equal(m.weight, m.dequantized_weight().to(m.weight.dtype)) for m in layers)
    assert q.ptq_method == method and q.training == tiny.training
    with torch.no_grad():
        out = q(calib)
    assert out.shape == (4, 32, 512) and torch.isfinite(out).all()


def test_w8a8_is_close_and_w2_rtn_is_not(tiny, calib):
    with torch.no_grad():
        ref = tiny(calib)
        e8 = rel(ptq.quantize_model(tiny, "absmax-w8a8")(calib), ref)
        e2 = rel(ptq.quantize_model(tiny, "absmax-w2a16")(calib), ref)
    assert e8 < 0.05, e8  # measured 0.026
    assert e2 > 0.5, e2  # measured 1.29


def test_sequential_gptq_reduces_model_error_on_its_calibration_data(tiny, calib):
    """Same symmetric 2-bit grid as absmax-w2a16.  Measured on seeds 0-4: RTN 1.26-1.32, one-pass
    GPTQ 1.21-1.31, sequential GPTQ 0.97-0.99 (relative logit error on the calibration tokens).
    On held-out tokens a *random-init* model shows no gain: its activations are nearly isotropic
    (H ≈ c·I, where GPTQ reduces to RTN), so the gain over RTN is tested at layer level above with
    correlated inputs, and here only that the sequential pipeline fits what it was calibrated on."""
    with torch.no_grad():
        ref = tiny(calib)
        e_rtn = rel(ptq.quantize_model(tiny, "absmax-w2a16")(calib), ref)
        seq = ptq.quantize_model(tiny, "gptq-w2a16", calib, sym=True, progress=False)
        one = ptq.quantize_model(tiny, "gptq-w2a16", calib, sym=True, sequential=False, progress=False)
        e_seq, e_one = rel(seq(calib), ref), rel(one(calib), ref)
    assert e_seq < 0.9 * e_rtn and e_seq < 0.9 * e_one, (e_seq, e_one, e_rtn)


def test_gptq_sequential_and_one_pass(tiny, calib, capsys, monkeypatch):
    # stderr is not a terminal here: progress is plain lines, one per layer with a 0 s interval
    monkeypatch.setenv("BITLM_PROGRESS_INTERVAL", "0")
    with torch.no_grad():
        ref = tiny(calib)
        seq = ptq.quantize_model(tiny, "gptq-w4a16", calib)  # progress on (stderr)
        one = ptq.quantize_model(tiny, "gptq-w4a16", calib, sequential=False, progress=False)
        assert rel(seq(calib), ref) < 0.5 and rel(one(calib), ref) < 0.5
        # the first stage sees identical inputs either way, so its codes agree
        assert torch.equal(
            seq.model.layers[0].self_attn.q_proj.codes, one.model.layers[0].self_attn.q_proj.codes
        )
        assert not torch.equal(
            seq.model.layers[1].mlp.down_proj.codes, one.model.layers[1].mlp.down_proj.codes
        )
    err = capsys.readouterr().err
    assert "gptq-w4a16: layer " in err and "\r" not in err


def test_other_architectures_and_bias():
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    for name in ("tiny-2b4t", "tiny-bitnet"):  # tied head (2b4t) and LayerNorm/GELU (bitnet)
        m = BitNetModel(preset(name, quant="fp")).eval()
        for method in ("smoothquant-w8a8", "gptq-w4a16"):
            q = ptq.quantize_model(m, method, ids, progress=False)
            with torch.no_grad():
                assert rel(q(ids), m(ids)) < 0.5
    t = Toy()
    t.proj = nn.Linear(32, 48, bias=True)
    q = ptq.quantize_model(t, "gptq-w4a16", torch.randint(0, 64, (4, 8)), progress=False)
    assert torch.equal(q.proj.bias, t.proj.bias)


@pytest.fixture(scope="module")
def trained():
    """A tiny fp model trained ~3 s on a sparse Markov chain (4 successors per token), so that its
    activations have the cross-channel structure GPTQ exploits; plus calibration/held-out data."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    vocab = 512
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)

    def sample(n: int, t: int) -> torch.Tensor:
        x = torch.empty(n, t, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
        for i in range(1, t):
            x[:, i] = succ[x[:, i - 1], torch.randint(0, 4, (n,), generator=g)]
        return x

    m = BitNetModel(preset("tiny", quant="fp"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(120):
        x = sample(16, 64)
        loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), sample(16, 64), sample(8, 64)


def test_ptq_on_a_trained_model_held_out(trained):
    """Held-out relative logit error (measured: W8A8 0.010, RTN W2 0.54, GPTQ W2 sym 0.32 / asym 0.20,
    GPTQ W4 0.04 — the ordering of the BitNet paper's Table 3: GPTQ ≪ RTN at 2 bits)."""
    model, calib, held = trained

    def err(method: str, **opts) -> float:
        q = ptq.quantize_model(model, method, calib, progress=False, **opts)
        return rel(q(held), ref)

    with torch.no_grad():
        ref = model(held)
        e8, e2_rtn, e4_gptq = err("absmax-w8a8"), err("absmax-w2a16"), err("gptq-w4a16")
        e2_gptq_sym, e2_gptq = err("gptq-w2a16", sym=True), err("gptq-w2a16")
    assert e8 < 0.03 and e4_gptq < 0.1, (e8, e4_gptq)
    assert e2_gptq_sym < 0.75 * e2_rtn, (e2_gptq_sym, e2_rtn)  # same grid, calibrated vs not
    assert e2_gptq < e2_gptq_sym  # the asymmetric min-max grid uses all 4 levels


@pytest.mark.slow
def test_gptq_small_preset_grouped_act_order():
    """The 'small' preset (d=256, FFN 704: several 128-column blocks) with groups and act-order."""
    torch.manual_seed(0)
    m = BitNetModel(preset("small", quant="fp")).eval()
    ids = torch.randint(0, 4096, (8, 128))
    with torch.no_grad():
        ref = m(ids)
        for method, opts in [("gptq-w4a16", {"group_size": 64, "act_order": True}), ("gptq-w1.58a16", {})]:
            q = ptq.quantize_model(m, method, ids, progress=False, **opts)
            layers = [x for x in q.modules() if isinstance(x, ptq.PTQLinear)]
            assert len(layers) == 28
            assert rel(q(ids), ref) < 1.0
    down = q.model.layers[0].mlp.down_proj
    assert down.codes.shape == (256, 704) and set(down.codes.unique().tolist()) <= {-1, 0, 1}
