"""bitlm experiment: each experiment end to end on a tiny model, the L(N) fit, the CLI errors."""

import json

import numpy as np
import pytest

from bitlm.experiments import EXPERIMENTS, NAMES, Setup, fit_power_law, power_law, run_experiment

# the experiments train on the default corpus: downloaded from Debian on first use
needs_corpus = pytest.mark.network


@pytest.fixture(scope="module")
def data():
    from bitlm.data import prepare_data

    return prepare_data("default", vocab_size=2048)


def tiny(name, **kw):
    # smaller than --quick (which the CLI test below runs): the four runs must fit the test budget
    s = Setup.build(name, quick=True)
    s.steps, s.val_tokens, s.limit, s.tasks = 3, 400, 2, ("piqa",)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def _read(out):
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    for p in res["plots"]:
        assert (out / p).stat().st_size > 1000, p
    return res, md


@needs_corpus
def test_compare(tmp_path, data):
    res, md = _read_after(run_experiment("compare", tiny("compare"), tmp_path, progress=False, data=data), tmp_path)
    assert [r["quant"] for r in res["rows"]] == ["fp", "b1", "b1.58"]
    assert [r["model"] for r in res["rows"]] == ["fp (same shape)", "BitNet b1", "BitNet b1.58"]
    for r in res["rows"]:
        assert {"val_ppl", "val_bpb", "zero_shot", "linear_bytes", "energy_j_per_token"} <= set(r)
        assert 0 <= r["zero_shot"]["avg"] <= 1
    fp, b1, b158 = res["rows"]
    # packed sizes: fp16 = 2 bytes, b1 = 1 bit, b1.58 (i2) = 2 bits per linear weight
    assert fp["linear_bytes"] == 16 * b1["linear_bytes"] == 8 * b158["linear_bytes"]
    assert b158["energy_j_per_token"] < fp["energy_j_per_token"]
    assert res["chance"]["tasks"]["piqa"] == pytest.approx(0.5)
    assert "BitNet b1.58" in md and "chance" in md


def _read_after(_res, out):
    return _read(out)


@needs_corpus
def test_ptq(tmp_path, data):
    from bitlm.ptq import METHODS

    res, md = _read_after(run_experiment("ptq", tiny("ptq"), tmp_path, progress=False, data=data), tmp_path)
    names = [r["name"] for r in res["rows"]]
    assert names == ["fp", *METHODS, "b1.58", "b1"]
    assert all("val_ppl" in r and "zero_shot" in r for r in res["rows"])
    assert [r["ptq"] for r in res["rows"]].count(False) == 3
    assert "Random" in md and "gptq" in md


@needs_corpus
def test_scaling(tmp_path, data):
    res, md = _read_after(run_experiment("scaling", tiny("scaling"), tmp_path, progress=False, data=data), tmp_path)
    assert len(res["rows"]) == 2 * 4
    assert set(res["fits"]) == {"fp", "b1.58"}
    assert "L(N) = a·N^b + c" in md
    for q, f in res["fits"].items():
        pts = [r for r in res["rows"] if r["quant"] == q]
        assert len(pts) == 4 and all(np.isfinite(r["val_loss"]) for r in pts), pts
        # the recorded fit is the fit of the recorded points (whether those 4 tiny runs give a
        # power law or not is up to 3 training steps; what is reported must follow from them)
        refit = fit_power_law([r["linear_weights"] for r in pts], [r["val_loss"] for r in pts])
        assert f == json.loads(json.dumps(refit)), q
        # and the markdown shows it: the fitted numbers, or the reason there is no fit
        row = [line for line in md.splitlines() if line.startswith(f"| {NAMES[q]} ") and "|" in line[2:]][-1]
        if f["ok"]:
            assert f"{f['a']:.4g}" in row and f"{f['b']:.4f}" in row and f["method"] in row, row
        else:
            assert f["reason"] in row and "| - |" in row, row


@needs_corpus
def test_lr(tmp_path, data):
    res, md = _read_after(run_experiment("lr", tiny("lr", lrs=(1e-3, 1e3)), tmp_path, progress=False, data=data),
                          tmp_path)
    rows = {(r["quant"], r["lr"]): r for r in res["rows"]}
    assert set(rows) == {("fp", 1e-3), ("fp", 1e3), ("b1.58", 1e-3), ("b1.58", 1e3)}
    assert not rows[("fp", 1e-3)]["diverged"]
    assert rows[("fp", 1e3)]["diverged"]  # lr 1000 without clipping: non-finite or worse than the start
    assert "diverged" in md


@needs_corpus
def test_groups(tmp_path, data):
    res, md = _read_after(run_experiment("groups", tiny("groups", groups=(1, 2)), tmp_path, progress=False, data=data),
                          tmp_path)
    rows = {(r["groups"], r["seed"]): r for r in res["rows"]}
    assert set(rows) == {(1, 0), (2, 0), (1, 1)} and all(r["val_ppl"] > 1 for r in rows.values())
    rows = {g: rows[(g, 0)] for g in (1, 2)}
    # the same initial weights and batches: grouping alone changes the result, and only a little
    assert rows[1]["val_loss"] != rows[2]["val_loss"]
    assert abs(rows[1]["val_loss"] - rows[2]["val_loss"]) < 0.5
    assert "| G = 2 |" in md and "| G = 1, seed 1 |" in md and "groups.png" in md


def test_power_law_fit_recovers_known_parameters():
    n = np.array([3e4, 1e5, 3e5, 1e6, 3e6])
    for a, b, c in [(50.0, -0.3, 2.5), (8.0, -0.12, 1.0), (1e3, -0.6, 3.2)]:
        f = fit_power_law(n, power_law(n, a, b, c))
        assert f["ok"]
        assert f["b"] == pytest.approx(b, rel=1e-3)
        assert f["c"] == pytest.approx(c, rel=1e-3)
        assert f["a"] == pytest.approx(a, rel=1e-2)
    # with a little noise the fit still lands close
    y = power_law(n, 50.0, -0.3, 2.5) + np.random.default_rng(0).normal(0, 1e-3, n.size)
    f = fit_power_law(n, y)
    assert f["b"] == pytest.approx(-0.3, abs=0.03)


def test_power_law_fit_degenerate_inputs():
    assert not fit_power_law([1e4, 1e5, 1e6], [4.0, 3.5, 3.2])["ok"]  # 3 params, 3 points: no residual
    bad = fit_power_law([1e4, 1e5, 1e6, 1e7], [3.0, 3.5, 4.0, 4.5])  # loss rises with size
    assert not bad["ok"] and bad["reason"]
    assert not fit_power_law([1e4, 1e5, 1e6, 1e7], [3.0, float("nan"), 2.5, 2.4])["ok"]


def test_unknown_experiment_is_a_one_line_error(capsys):
    from bitlm.cli import main

    assert main(["experiment", "nope", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown experiment 'nope'" in err and all(e in err for e in EXPERIMENTS)
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope")
