"""bitlm.energy: op counts, per-op energies, and the published tables it must reproduce.

References: 2310.11453 Tables 1, 2 and 5 (BitNet), 2402.17764 Fig. 3 (b1.58), 2504.12285 Table 1
(2B4T).  The numbers are transcribed in /work/shared/reference/training-anchors.md (b).
"""

from __future__ import annotations

import json

import pytest

from bitlm import energy as E
from bitlm.cli import main
from bitlm.config import ModelConfig, preset


def _brute_force_attention(T: int, dh: int, causal: bool) -> tuple[int, int]:
    """Count the MULs/ADDs of one head's QKᵀ and A·V by walking the loops of a naive matmul."""
    muls = adds = 0
    allowed = [[(j <= i) or not causal for j in range(T)] for i in range(T)]
    for i in range(T):  # scores S[i, j] = sum_k Q[i, k] K[j, k]
        for j in range(T):
            if allowed[i][j]:
                muls += dh
                adds += dh - 1
    for i in range(T):  # out[i, c] = sum_j A[i, j] V[j, c], skipping masked (zero) weights
        terms = sum(allowed[i])
        muls += terms * dh
        adds += (terms - 1) * dh
    return muls, adds


# ---------------------------------------------------------------------------------------------
# constants and counting
# ---------------------------------------------------------------------------------------------


def test_energy_table_is_paper_table_2():
    assert E.ENERGY_PJ["45nm"] == {"fp32": {"add": 0.9, "mul": 3.7}, "fp16": {"add": 0.4, "mul": 1.1},
                                   "int8": {"add": 0.03, "mul": 0.2}}
    assert E.ENERGY_PJ["7nm"] == {"fp32": {"add": 0.38, "mul": 1.31}, "fp16": {"add": 0.16, "mul": 0.34},
                                  "int8": {"add": 0.007, "mul": 0.07}}


def test_counts_small_config_by_hand():
    # d=8, 2 heads of 4, 1 kv head, gated FFN 16, 3 layers, T=5
    cfg = ModelConfig(arch="bitnet-b1.58", quant="fp", vocab_size=11, d_model=8, n_layers=3, n_heads=2,
                      n_kv_heads=1, d_ff=16)
    T = 5
    g = {x.name: x for x in E.count_ops(cfg, T)}
    shapes = [(8, 8), (8, 4), (8, 4), (8, 8), (8, 16), (8, 16), (16, 8)]  # q k v o gate up down
    assert g["proj"].muls == 3 * sum(T * n * p for n, p in shapes)
    assert g["proj"].adds == 3 * sum(T * (n - 1) * p for n, p in shapes)
    assert g["proj"].precision == "fp16"
    # attention: 2 query heads of width 4 (GQA shares K/V storage, not arithmetic)
    assert g["attn"].muls == 3 * 2 * (T * 4 * T + T * T * 4)
    assert g["attn"].adds == 3 * 2 * (T * 3 * T + T * (T - 1) * 4)
    assert "head" not in g


def test_bitnet_projections_are_int8_adds_plus_rescale_muls():
    cfg = preset("tiny-bitnet")  # arch bitnet: GELU FFN with 2 matrices, quant b1
    T = 7
    g = {x.name: x for x in E.count_ops(cfg, T)}
    d, f, L = cfg.d_model, cfg.ffn_dim, cfg.n_layers
    shapes = [(d, d)] * 4 + [(d, f), (f, d)]
    assert g["proj"].precision == "int8" and g["proj"].muls == 0
    assert g["proj"].adds == L * sum(T * (n - 1) * p for n, p in shapes)  # Eq. 16
    assert g["proj.rescale"].muls == L * sum(T * p + T * n for n, p in shapes)  # Eq. 18
    assert g["proj.rescale"].precision == "fp16" and g["proj.rescale"].adds == 0
    assert g["attn"].precision == "fp16"  # attention stays high precision in BitNet
    # b1.58 is counted like b1 (zeros are not skipped)
    g158 = {x.name: x for x in E.count_ops(cfg.replace(quant="b1.58"), T)}
    assert g158 == g


def test_gated_ffn_has_three_matrices():
    gelu = E.ModelShape.from_config(preset("tiny-bitnet", quant="fp", d_ff=96))
    gated = E.ModelShape.from_config(preset("tiny", quant="fp", d_ff=96))
    assert [n for n, _, _ in gelu.projections()][-2:] == ["up_proj", "down_proj"]
    assert [n for n, _, _ in gated.projections()][-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert gated.linear_weights() - gelu.linear_weights() == gated.n_layers * 64 * 96


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,dh", [(1, 2), (5, 3), (9, 4)])
def test_attention_counts_match_brute_force(T, dh, causal):
    shape = E.ModelShape(d_model=dh, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=dh, d_ff=4, gated_ffn=True,
                         vocab_size=3)
    attn = {x.name: x for x in E.count_ops(shape, T, causal=causal)}["attn"]
    assert (attn.muls, attn.adds) == _brute_force_attention(T, dh, causal)


def test_causal_counts_about_half_of_the_scores():
    cfg = preset("bitnet-6.7b", quant="fp")
    full = {g.name: g for g in E.count_ops(cfg, 512)}["attn"]
    causal = {g.name: g for g in E.count_ops(cfg, 512, causal=True)}["attn"]
    assert causal.muls / full.muls == pytest.approx(513 / 1024)


def test_op_counts_match_the_anchor_table():
    # training-anchors (b): summed over layers, T = 512
    expected = {"6.7b": (3.2985e12, 3.2979e12, 6.8719e10, 6.8644e10),
                "13b": (6.4425e12, 6.4415e12, 1.0737e11, 1.0726e11),
                "30b": (1.5153e13, 1.5151e13, 1.8039e11, 1.8020e11)}
    for name, (pm, pa, am, aa) in expected.items():
        cfg = preset(f"bitnet-{name}", quant="fp")
        g = {x.name: x for x in E.count_ops(cfg, 512)}
        assert g["proj"].muls == pytest.approx(pm, rel=2e-4)
        assert g["proj"].adds == pytest.approx(pa, rel=2e-4)
        assert g["attn"].muls == pytest.approx(am, rel=2e-4)
        # the anchors count QKᵀ as one (T×d)·(d×T) product; per head it has (H−1)·T² fewer adds
        per_head_fewer = cfg.n_layers * (cfg.n_heads - 1) * 512 * 512
        assert g["attn"].adds + per_head_fewer == pytest.approx(aa, rel=2e-4)


def test_include_head_and_per_token():
    cfg = preset("tiny", quant="fp")
    a = E.estimate(cfg, 64, "45nm")
    b = E.estimate(cfg, 64, "45nm", include_head=True)
    assert b.mul_j - a.mul_j == pytest.approx(64 * cfg.d_model * cfg.vocab_size * 1.1e-12)
    assert a.total_j_per_token == pytest.approx(a.total_j / 64)
    assert a.mul_j_per_token + a.add_j_per_token == pytest.approx(a.total_j_per_token)


def test_fp_bits_applies_to_fp_models_only():
    cfg = preset("bitnet-6.7b")
    fp16 = E.estimate(cfg.replace(quant="fp"), 512, "7nm", fp_bits=16)
    fp32 = E.estimate(cfg.replace(quant="fp"), 512, "7nm", fp_bits=32)
    assert fp32.mul_j / fp16.mul_j == pytest.approx(1.31 / 0.34)
    b16 = E.estimate(cfg, 512, "7nm", fp_bits=16)
    b32 = E.estimate(cfg, 512, "7nm", fp_bits=32)
    assert (b16.mul_j, b16.add_j) == (b32.mul_j, b32.add_j)


def test_bad_arguments():
    with pytest.raises(ValueError, match="process node"):
        E.estimate(preset("tiny"), 8, "5nm")
    with pytest.raises(ValueError, match="fp_bits"):
        E.estimate(preset("tiny", quant="fp"), 8, fp_bits=8)
    with pytest.raises(ValueError, match="seq_len"):
        E.count_ops(preset("tiny"), 0)


# ---------------------------------------------------------------------------------------------
# published numbers
# ---------------------------------------------------------------------------------------------


def test_reproduces_bitnet_table_1():
    rows = E.table1()
    assert len(rows) == 36
    for r in rows:
        key = (r["model"], r["wbits"], r["node"], r["op"].lower())
        if key in E.TABLE1_KNOWN_MISSES:
            # docs/energy.md: with Table 2's printed 0.007 pJ INT8 add these two cells come out
            # 0.0340 and 0.1348 J where the paper prints 0.04 and 0.14: within one unit of the
            # printed last digit, not within its rounding
            assert r["published"] - 0.01 < r["computed"] < r["published"], r
        else:
            assert round(r["computed"], 2) == r["published"], r


@pytest.mark.parametrize("int8_add_pj", [0.00731, 0.00737, 0.00743])
def test_table_1_is_reproduced_whole_with_the_unrounded_int8_add(monkeypatch, int8_add_pj):
    """docs/energy.md's explanation of the two misses: an effective 7 nm INT8 add energy between
    0.00730 and 0.00744 pJ (printed 0.007 in Table 2) reproduces all 36 cells at 2 decimals."""
    monkeypatch.setitem(E.ENERGY_PJ["7nm"]["int8"], "add", int8_add_pj)
    rows = E.table1()
    assert len(rows) == 36
    assert [r for r in rows if round(r["computed"], 2) != r["published"]] == []


@pytest.mark.parametrize("int8_add_pj", [0.0072, 0.0075])
def test_table_1_int8_add_window_is_narrow(monkeypatch, int8_add_pj):
    # just outside the window some W1 7 nm ADD cell misses again: the explanation is specific
    monkeypatch.setitem(E.ENERGY_PJ["7nm"]["int8"], "add", int8_add_pj)
    assert [r for r in E.table1() if round(r["computed"], 2) != r["published"]]


def test_b158_per_op_ratio():
    assert round(E.per_op_ratio("7nm"), 1) == 71.4


def test_b158_end_to_end_ratio_trend():
    # 2402.17764 Fig. 3: LLaMA / BitNet b1.58 energy, 7 nm, 512 tokens.  The figure's shapes are not
    # stated; these are the LLaMA shapes (3B: a StableLM-3B-like shape, 70B with 8 KV heads).
    def llama(d, f, L, H, kv=None):
        return ModelConfig(arch="bitnet-b1.58", quant="b1.58", vocab_size=32000, d_model=d, d_ff=f, n_layers=L,
                           n_heads=H, n_kv_heads=kv)

    paper = [(llama(2048, 5460, 24, 32), 18.6), (llama(2560, 6912, 32, 32), 21.7), (llama(4096, 11008, 32, 32), 29.1),
             (llama(5120, 13824, 40, 40), 32.9), (llama(8192, 28672, 80, 64, 8), 41.2)]
    ratios = []
    for cfg, published in paper:
        r = E.estimate(cfg.replace(quant="fp"), 512, "7nm").total_j / E.estimate(cfg, 512, "7nm").total_j
        assert r == pytest.approx(published, rel=0.03)
        ratios.append(r)
    assert ratios == sorted(ratios)  # the saving grows with size
    assert round(ratios[0], 1) in (18.5, 18.6)  # anchors: 18.5 with this recipe; paper 18.6


def _fp(d, L, H, kv, f, vocab):
    return ModelConfig(arch="bitnet-b1.58", quant="fp", vocab_size=vocab, d_model=d, n_layers=L, n_heads=H,
                       n_kv_heads=kv, d_ff=f)


@pytest.mark.parametrize(
    "name,shape,reported",
    [
        ("LLaMA 3.2 1B", E.ModelShape.from_config(_fp(2048, 16, 32, 8, 8192, 128256)), 0.258),
        # Gemma-3 1B: 4 query heads of width 256 on d = 1152, which d_model // n_heads cannot express
        ("Gemma-3 1B", E.ModelShape.from_config(_fp(1152, 26, 4, 1, 6912, 262144), head_dim=256), 0.186),
        ("Qwen2.5 1.5B", E.ModelShape.from_config(_fp(1536, 28, 12, 2, 8960, 151936)), 0.347),
        ("SmolLM2 1.7B", E.ModelShape.from_config(_fp(2048, 24, 32, None, 8192, 49152)), 0.425),
        ("MiniCPM 2B", E.ModelShape.from_config(_fp(2304, 40, 36, None, 5760, 122753)), 0.649),
        ("BitNet b1.58 2B", E.ModelShape.from_config(preset("2b4t")), 0.028),
    ],
)
def test_reproduces_2b4t_energy_row(name, shape, reported):
    # 2504.12285 Table 1 "Energy (estimated)": 7 nm, 512 tokens, MUL + ADD
    assert round(E.estimate(shape, 512, "7nm").total_j, 3) == reported, name


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_table1(capsys, tmp_path):
    out_json = tmp_path / "t1.json"
    assert main(["energy", "--table1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "34/36 cells equal the published value" in out
    assert "0.0340 (0.04) *" in out and "4.4111 (4.41)" in out
    assert len(json.loads(out_json.read_text())["table1"]) == 36


def test_cli_presets_overrides_and_json(capsys, tmp_path):
    out_json = tmp_path / "e.json"
    rc = main(["energy", "--preset", "bitnet-6.7b", "--preset", "2b4t", "--set", "quant=fp", "--node", "7nm",
               "--fp-bits", "32", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "bitnet-6.7b" in out and "2b4t" in out and "fp32" in out
    reports = json.loads(out_json.read_text())["reports"]
    assert [r["node"] for r in reports] == ["7nm", "7nm"]
    assert round(reports[0]["mul_j"], 2) == 4.41  # Table 1, 6.7B W32 7nm MUL


def test_cli_config_file_and_compare(capsys, tmp_path):
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"model": preset("b1.58-1.3b").to_dict()}))
    assert main(["energy", "--config", str(cfg), "--compare-fp", "--node", "7nm"]) == 0
    out = capsys.readouterr().out
    assert "fp16 / b1.58 = 18.6x" in out


def test_cli_errors(capsys):
    assert main(["energy", "--preset", "no-such-model"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["energy"]) == 2
    assert "--preset" in capsys.readouterr().err
