"""``bitlm demo`` at a tiny scale (issue 16): the packed b1.58 files and the fp model side by side
(quality, bytes on disk, decode/prefill speed, resident memory, energy per token) in one table and
in results.json, greedy and sampled samples (``bitlm generate --sample``'s), the next commands,
and a log without carriage-return redraws."""

import json
import os
from pathlib import Path

import pytest
import torch

from bitlm.cli import main
from bitlm.energy import estimate
from bitlm.generate import SAMPLE_DEFAULTS

STEPS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    words = "the cat sat on a mat and dog ran far away from big red house with small green door".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (120,), generator=g)) for _ in range(40)]
    (d / "t.txt").write_text("\n\n".join(paras) + "\n")
    return d


@pytest.fixture(scope="module")
def demo_run(demo):
    """One demo run in this process; its stdout and stderr captured as a file would get them."""
    import contextlib
    import io

    out = demo / "out"
    old = os.environ.get("BITLM_CACHE")
    os.environ["BITLM_CACHE"] = str(demo / "cache")
    buf = io.StringIO()  # not a terminal: progress must be plain lines
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(["demo", "--preset", "tiny", "--data", str(demo / "t.txt"), "--max-steps", str(STEPS),
                       "--batch-size", "4", "--seq-len", "32", "--out", str(out)])
    finally:
        os.environ.pop("BITLM_CACHE") if old is None else os.environ.__setitem__("BITLM_CACHE", old)
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue(), json.loads((out / "results.json").read_text())


def test_demo_table_measures_packed_and_fp_side_by_side(demo_run):
    out, log, res = demo_run
    rows = {r["key"]: r for r in res["rows"]}
    assert list(rows) == ["b1.58-i2", "b1.58-t1", "fp"]
    for key, r in rows.items():
        for field in ("parameters", "val_ppl", "val_bpb", "bytes_on_disk", "decode_tok_s", "prefill_tok_s",
                      "memory_bytes", "energy_j_per_token"):
            assert isinstance(r[field], (int, float)) and r[field] > 0, (key, field, r[field])
    # bytes on disk are the real files: the packed ones, and the fp model's safetensors weights
    for fmt in ("i2", "t1"):
        f = out / "b1.58" / f"model-{fmt}.bitlm"
        assert rows[f"b1.58-{fmt}"]["bytes_on_disk"] == f.stat().st_size
    assert rows["fp"]["bytes_on_disk"] == sum(f.stat().st_size for f in (out / "fp" / "last").glob("*.safetensors"))
    assert rows["b1.58-i2"]["bytes_on_disk"] < rows["fp"]["bytes_on_disk"]
    # energy is bitlm.energy's 7 nm figure per token; ternary costs less than fp
    from bitlm.config import build_config

    cfg = build_config("tiny")
    n = res["bench"]["prompt_tokens"] + res["bench"]["decode_tokens"]
    assert rows["fp"]["energy_j_per_token"] == pytest.approx(estimate(cfg.replace(quant="fp"), n, "7nm").total_j_per_token)
    assert rows["b1.58-i2"]["energy_j_per_token"] < rows["fp"]["energy_j_per_token"]
    # the packed files are scored themselves: same ternary layers as the trained model, so close
    assert rows["b1.58-i2"]["val_ppl"] == pytest.approx(rows["b1.58-t1"]["val_ppl"], rel=1e-3)
    assert res["machine"]["cpu"] and res["bench"]["threads"] >= 1
    table = log[log.index("model "):]
    for r in rows.values():
        assert r["model"] in table
    assert "decode" in table and "prefill" in table and "energy/tok" in table


def test_demo_samples_greedy_and_sampled_like_generate(demo_run, capsys):
    out, log, res = demo_run
    for key in ("b1.58-i2", "fp"):
        s = res["samples"][key]
        assert len(s["greedy"]) == len(s["sampled"]) == 2
        assert s["greedy"] != s["sampled"]
    assert res["sampling"]["temperature"] == SAMPLE_DEFAULTS.temperature > 0
    # the sampled text is what `bitlm generate --sample --seed i` prints for prompt i and the packed file:
    # one seed per prompt, so the two samples are not the same draws after different prompts (with
    # one shared seed a barely trained model continued both prompts with nearly the same text)
    i2 = out / "b1.58" / "model-i2.bitlm"
    texts = res["samples"]["b1.58-i2"]["sampled"]
    for i, (prompt, text) in enumerate(zip(("It is a truth universally acknowledged", "And God said"), texts)):
        capsys.readouterr()
        assert main(["generate", "--model", str(i2), "--prompt", prompt, "--sample", "--seed", str(i),
                     "--max-new-tokens", "40", "--no-stream"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == text, i
    assert texts[0][len("It is a truth universally acknowledged"):] != texts[1][len("And God said"):]
    assert res["sampling"]["seeds"] == [0, 1]
    assert "sampled: temperature 0.8, top-k 40, top-p 0.95, seeds 0, 1 (one per prompt)" in log


def test_demo_ends_with_next_commands_and_a_plain_log(demo_run):
    out, log, res = demo_run
    tail = log[log.index("next:"):]
    i2 = out / "b1.58" / "model-i2.bitlm"
    for cmd in (f"bitlm generate --model {i2}", f"bitlm chat --model {i2}", f"bitlm eval --model {i2} --tasks",
                f"bitlm serve --model {i2}"):
        assert cmd in tail
    assert Path(out / "results.json").is_file()
    assert "\r" not in log  # output to a file: no bar redraws
    assert len(log.splitlines()) < 120


def test_memory_ratio_reads_right_either_way():
    from bitlm.demo import _memory_ratio

    assert _memory_ratio(48.66, 27.13) == "1.8x less memory"
    assert _memory_ratio(16.50, 16.00) == "about the same memory"  # was "1.0x less memory"
    assert _memory_ratio(16.0, 20.0) == "1.2x more memory"  # was "0.8x less memory"
