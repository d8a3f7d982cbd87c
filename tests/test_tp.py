"""Tensor parallelism (bitlm.tensor_parallel) on the CPU with gloo, every run a real
``torch.distributed.run`` subprocess (tests/_tp_worker.py):

* ``global`` scales at TP=2 equal one process (logits, every weight gradient, the gradient norm;
  fp32, ≤ 1e-6) on the three architectures, with the scale collectives counted exactly;
* ``group`` mode at TP=2 equals the one-process group config (the emulation) with no scale
  collective at all;
* FSDP2 × TP on a 2 × 2 mesh equals one process;
* ``bitlm train --tp 2 --tp-quant group`` trains like the one-process emulation, records tp / mode
  in its distributed checkpoint, and ``bitlm.load`` of that checkpoint gives the TP model's logits;
* resume of a TP run is bit-identical, and its checkpoint resumes in one process (slow);
  ``--parallel fsdp --tp 2`` training on 4 processes equals one process (slow);
* the config-side pieces (group_config, tp_quant_mode, check_tp), the mesh checks of
  init_distributed and bad input in one process; a group-mode model refused by the HF format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitlm
from bitlm import tensor_parallel as TP
from bitlm.config import preset
from bitlm.io.dcp import read_dcp_meta
from helpers import dist_env

HERE = Path(__file__).parent
WORKER = HERE / "_tp_worker.py"
SRC = HERE.parent / "src"
TRAIN = dict(max_steps=5, batch_size=4, seq_len=16, eval_every=5, log_every=1, progress=False, lr=3e-3,
             save_every_minutes=0)
GROUP2 = dict(weight_groups=2, weight_group_dim="parallel", act_groups=2, norm_groups=2, group_scope="parallel")


def _env() -> dict[str, str]:
    return dist_env(SRC)


def _worker(args: dict, nproc: int = 2, env: dict[str, str] | None = None) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), json.dumps(args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), json.dumps(args)]
    p = subprocess.run(cmd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def _expected_global_calls(name: str) -> dict[str, int]:
    """Scale collectives of one forward + backward in global mode: one per BitLinear weight, one per
    row-parallel γ (o, down), one per sub-norm statistic in forward and again in backward (RMSNorm:
    Σx²; LayerNorm: Σx then Σ(x-μ)²)."""
    cfg = preset(name)
    per_norm = 2 if cfg.arch == "bitnet" else 1
    weights = 7 if cfg.gated_ffn else 6  # q k v o (gate) up down
    n = cfg.n_layers
    return {"weight": n * weights, "act": n * 2, "norm": n * 2 * per_norm, "norm_backward": n * 2 * per_norm}


@pytest.mark.parametrize("name", ["tiny", "tiny-bitnet", "tiny-2b4t"])
def test_tp2_equals_one_process_global_and_group(name):
    rep = _worker({"preset": name})
    for mode in ("global", "group"):
        r = rep[mode]
        assert r["logit_diff"] <= 1e-6, (mode, r)
        assert r["grad_diff"] <= 1e-6, (mode, r)
        assert abs(r["norm_tp"] - r["norm_ref"]) <= 1e-5 * r["norm_ref"], (mode, r)
    # global: exactly the scale collectives the mode needs; group: none at all
    want = _expected_global_calls(name)
    assert {k: rep["global"]["counts"].get(k, 0) for k in want} == want
    assert rep["global"]["counts"]["calls"] == sum(want.values())
    assert rep["global"]["forward_counts"]["calls"] == sum(want.values()) - want["norm_backward"]
    assert rep["group"]["counts"] == {"calls": 0, "bytes": 0}


def test_fsdp2_times_tp_on_four_processes_equals_one_process():
    """A 2 (dp, FSDP2) × 2 (tp) mesh, GQA + tied embeddings (tiny-2b4t), global scales."""
    r = _worker({"preset": "tiny-2b4t", "dp": 2, "tp": 2, "modes": ["global"]}, nproc=4)["global"]
    assert r["logit_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6, r
    assert abs(r["norm_tp"] - r["norm_ref"]) <= 1e-5 * r["norm_ref"], r


def test_train_tp2_group_checkpoint_loads_as_the_emulation(tmp_path):
    """5 AdamW steps at TP=2 in group mode against one process running the same group config:
    same losses and parameters; the checkpoint records tp / tp_quant; bitlm.load gives a
    one-process model whose logits are the TP model's."""
    one, tp2 = tmp_path / "one", tmp_path / "tp2"
    _worker({"train": {**TRAIN, "out_dir": str(one), "checkpoint_format": "dcp"}, "overrides": GROUP2}, nproc=1)
    rep = _worker({"train": {**TRAIN, "out_dir": str(tp2), "tp": 2, "tp_quant": "group"}})
    meta = read_dcp_meta(tp2 / "last")
    assert (meta["tp"], meta["tp_quant"], meta["dp"], meta["world_size"]) == (2, "group", 1, 2)
    assert meta["model"]["weight_groups"] == 2 and meta["model"]["group_scope"] == "parallel"
    losses = [[r.get("loss", r.get("val_loss")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (one, tp2)]
    assert len(losses[0]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    ref, got = bitlm.load(one / "last"), bitlm.load(tp2 / "last")
    assert got.config == ref.config
    for k, v in ref.state_dict().items():
        assert torch.allclose(got.state_dict()[k], v, atol=1e-5), k
    x = torch.arange(16)[None] % got.config.vocab_size
    with torch.no_grad():
        logits = got.eval()(x)
    assert torch.allclose(logits, torch.tensor(rep["logits"]), atol=1e-5)
    # the TP-trained group model packs with its groups (K-slices) and runs on the packed engine:
    # the same logits to float order, the same greedy tokens
    from bitlm.engine import load_packed, save_packed
    from bitlm.generate import generate_tokens

    pm = load_packed(save_packed(bitlm.pack(got), tmp_path / "tp2.bitlm"))
    assert pm.config.weight_groups == 2 and pm.config.group_scope == "parallel"
    pm.kv = "f32"  # the torch model's float32 keys / values
    err = (pm(x) - logits).abs() / logits.abs().max()
    assert err.max() < 0.02 and (err < 1e-5).float().mean() > 0.9, err.max()
    prompt = [3, 14, 15, 9, 26]
    assert list(generate_tokens(pm, prompt, 24)) == list(generate_tokens(got, prompt, 24))


def test_group_config_mode_and_checks():
    cfg = preset("tiny-2b4t")
    g = TP.group_config(cfg, 2)
    assert (g.weight_groups, g.weight_group_dim, g.act_groups, g.norm_groups, g.group_scope) == (
        2, "parallel", 2, 2, "parallel")
    assert TP.tp_quant_mode(g, 2) == "group" and TP.tp_quant_mode(cfg, 2) == "global"
    assert TP.tp_quant_mode(cfg.replace(weight_groups=2), 2) == "mixed"  # groups on "out" for o/down too
    assert TP.group_config(cfg.replace(**{**GROUP2, "weight_groups": 2}), 1).weight_groups == 2
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        TP.check_tp(cfg, 4)
    with pytest.raises(ValueError, match="n_heads=4"):
        TP.check_tp(cfg, 3)
    with pytest.raises(ValueError, match=r"vocab_size=511"):
        TP.check_tp(cfg.replace(vocab_size=511), 2)
    with pytest.raises(ValueError, match=r"d_ff\)=161"):
        TP.check_tp(cfg.replace(d_ff=161), 2)


@pytest.mark.parametrize("world,tp,parallel,needle", [
    (3, 2, "fsdp", "--tp 2 does not divide the world size 3"),
    (2, 2, "ddp", "DDP does not compose with tensor parallelism"),
    (4, 2, "none", "WORLD_SIZE=4 and --tp 2"),
])
def test_init_distributed_refuses_bad_tp_layouts(monkeypatch, world, tp, parallel, needle):
    from bitlm.parallel import init_distributed

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=needle):
        init_distributed("cpu", parallel, tp=tp)


def test_group_mode_model_is_refused_by_one_scale_formats(tmp_path):
    """A group-mode model cannot be written to the HF BitNet format (one scale per tensor, whole-
    feature norms): a one-line ValueError naming a group option, no file."""
    model = bitlm.BitNetModel(TP.group_config(preset("tiny"), 2))
    with pytest.raises(ValueError, match=r"groups=2"):
        bitlm.save(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow  # three torchrun runs
def test_train_tp2_resume_is_bit_identical_and_reshards_to_one_process(tmp_path):
    """TP=2 global: stopped after step 3 and resumed to 5 equals 5 straight (same split); the TP=2
    checkpoint of step 3 resumes in one process (DCP reshards) and matches to float rounding."""
    base = {**TRAIN, "tp": 2, "eval_every": 0}
    straight, split = tmp_path / "straight", tmp_path / "split"
    _worker({"train": {**base, "out_dir": str(straight)}})
    _worker({"train": {**base, "out_dir": str(split)}, "stop_after": 3})
    assert read_dcp_meta(split / "last")["step"] == 3
    _worker({"train": {**base, "out_dir": str(split)}, "resume": True})
    a, b = bitlm.load(straight / "last").state_dict(), bitlm.load(split / "last").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = tmp_path / "one"
    _worker({"train": {**base, "out_dir": str(split)}, "stop_after": 3})
    import shutil

    shutil.copytree(split, one)
    _worker({"train": {**TRAIN, "eval_every": 0, "out_dir": str(one), "checkpoint_format": "dcp"}, "resume": True},
            nproc=1)
    c = bitlm.load(one / "last").state_dict()
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.slow  # four processes training
def test_train_fsdp_times_tp_equals_one_process(tmp_path):
    """``--parallel fsdp --tp 2`` on 4 processes (2 data-parallel replicas × 2 tp ranks), global
    scales, gradient clipping on: 5 steps equal one process with grad_accum 2 (same global batch).
    The one process runs the fake-quant float path (``BITLM_QAT_FAST=0``), the arithmetic of the tp
    shards' forward: the integer projection's rounding differs from it in the last bits, and five
    steps at lr 3e-3 grow that (through flipped rounding decisions) past 1e-4."""
    one, ft = tmp_path / "one", tmp_path / "ft"
    extra = {"grad_clip": 1.0}
    _worker({"train": {**TRAIN, **extra, "out_dir": str(one), "checkpoint_format": "dcp", "grad_accum": 2}}, nproc=1,
            env={"BITLM_QAT_FAST": "0"})
    _worker({"train": {**TRAIN, **extra, "out_dir": str(ft), "tp": 2, "parallel": "fsdp"}}, nproc=4)
    meta = read_dcp_meta(ft / "last")
    assert (meta["tp"], meta["dp"], meta["world_size"], meta["tp_quant"]) == (2, 2, 4, "global")
    a, b = bitlm.load(one / "last").state_dict(), bitlm.load(ft / "last").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
