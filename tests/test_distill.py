"""Knowledge distillation (bitlm.distill, ``bitlm train --teacher``): the losses against hand
computations, gradients reach only the student, the vocabulary check, a run that lowers the KL,
bit-identical resume with a teacher, grad accumulation equal to one big batch, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitlm.distill import Distiller, attention_relation_loss, kd_logit_loss, load_teacher, relation_heads
from bitlm.io.checkpoint import CheckpointError, read_meta
from bitlm.model import BitNetModel
from bitlm.train import TrainConfig, train
from helpers import pattern_data
from helpers import tiny_config as cfg


def tcfg(tmp_path, **kw):
    d = dict(max_steps=12, batch_size=8, seq_len=32, eval_every=0, log_every=1, progress=False,
             out_dir=str(tmp_path / "run"), lr=3e-3, save_every_minutes=0)
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """An fp teacher trained for a few steps on the pattern data (so its distribution is not flat)."""
    d = tmp_path_factory.mktemp("teacher")
    res = train(cfg(quant="fp"), tcfg(d, recipe="fp", max_steps=30, lr=3e-3, log_every=10), pattern_data(),
                log=lambda *a: None)
    return str(res.out_dir / "last")


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    T = 2.0
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / T) for v in srow)
        zt = sum(math.exp(v / T) for v in trow)
        ps = [math.exp(v / T) / zs for v in srow]
        pt = [math.exp(v / T) / zt for v in trow]
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    want = total / 2 * T * T
    assert kd_logit_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)
    assert kd_logit_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # the same as torch's KL (batchmean over positions) times τ²
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                     log_target=True, reduction="batchmean") * T * T
    assert kd_logit_loss(s, t, T).item() == pytest.approx(ref.item(), rel=1e-6)
    # (B, T, V) shapes average over every position
    assert kd_logit_loss(s[None], t[None], T).item() == pytest.approx(want, rel=1e-6)


def test_attention_relation_loss_by_hand():
    torch.manual_seed(0)
    s = [torch.randn(1, 3, 4) for _ in range(3)]  # Q, K, V of one layer: B=1, T=3, D=4
    t = [torch.randn(1, 3, 4) for _ in range(3)]
    heads = 2
    total = 0.0
    for a, b in zip(s, t):
        for h in range(heads):
            sa = torch.nn.functional.normalize(a[0, :, 2 * h : 2 * h + 2], dim=-1)
            tb = torch.nn.functional.normalize(b[0, :, 2 * h : 2 * h + 2], dim=-1)
            rs, rt = torch.softmax(sa @ sa.T, -1), torch.softmax(tb @ tb.T, -1)
            for i in range(3):  # rows
                total += float((rt[i] * (rt[i] / rs[i]).log()).sum()) / (heads * 3)
    want = total / (1 * heads)
    assert attention_relation_loss([s], [t], heads).item() == pytest.approx(want, rel=1e-5)
    assert attention_relation_loss([t], [t], heads).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_heads([64, 32]) == 32 and relation_heads([48, 40]) == 8 and relation_heads([6]) == 2


def test_gradients_reach_only_the_student(teacher_dir):
    teacher = load_teacher(teacher_dir)
    torch.manual_seed(1)
    student = BitNetModel(cfg()).train()
    kd = Distiller(teacher, student, weight=1.0, temperature=2.0, attention_layers=[-1], attention_weight=10.0)
    x, y = pattern_data().batch(0, 4, 16)
    loss, parts = kd.loss(student, x, y)
    loss.backward()
    assert parts["kd_loss"] > 0 and parts["ad_loss"] > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    # the KD term alone moves the student: its gradient is not the CE gradient
    student.zero_grad()
    torch.nn.functional.cross_entropy(student(x).reshape(-1, 64), y.reshape(-1)).backward()
    g_ce = student.lm_head.weight.grad.clone()
    student.zero_grad()
    kd.loss(student, x, y)[0].backward()
    assert not torch.allclose(student.lm_head.weight.grad, g_ce)
    kd.close()


def test_vocab_mismatch_is_one_clear_error(teacher_dir):
    teacher = load_teacher(teacher_dir)
    student = BitNetModel(cfg(vocab_size=80))
    with pytest.raises(ValueError, match=r"--teacher .*64 tokens, the student's 80"):
        Distiller(teacher, student, weight=1.0, temperature=1.0, teacher_path=teacher_dir)


def test_bf16_teacher(teacher_dir):
    t32, t16 = load_teacher(teacher_dir), load_teacher(teacher_dir, "bf16")
    assert next(t16.parameters()).dtype == torch.bfloat16
    student = BitNetModel(cfg())
    x, _ = pattern_data().batch(0, 2, 16)
    l32 = Distiller(t32, student, weight=1.0, temperature=1.0).teacher_forward(x)[0]
    l16 = Distiller(t16, student, weight=1.0, temperature=1.0).teacher_forward(x)[0]
    assert l16.dtype == torch.float32 and torch.allclose(l16, l32, atol=0.1)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_with_a_teacher_lowers_the_kl_and_records_it(teacher_dir, tmp_path):
    t = tcfg(tmp_path, teacher=teacher_dir, kd_temperature=2.0, kd_attention_layers=[-1], kd_attention_weight=10.0,
             max_steps=20)
    res = train(cfg(), t, pattern_data(), log=lambda *a: None)
    rows = [r for r in _rows(tmp_path / "run" / "metrics.jsonl") if "kd_loss" in r]
    assert len(rows) == 20
    first, last = sum(r["kd_loss"] for r in rows[:3]) / 3, sum(r["kd_loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert all(r["loss"] == pytest.approx(r["lm_loss"] + r["kd_loss"] + 10.0 * r["ad_loss"], rel=1e-5) for r in rows)
    meta = read_meta(res.out_dir / "last")
    assert meta["train"]["teacher"] == teacher_dir and meta["train"]["kd_temperature"] == 2.0
    assert meta["train"]["kd_attention_layers"] == [-1]
    assert meta["teacher"]["quant"] == "fp" and meta["teacher"]["vocab_size"] == 64


def test_grad_accumulation_logs_the_mean_over_micro_batches(teacher_dir, tmp_path):
    """grad_accum 2: the first step's logged terms are the means over its two micro-batches
    (data streams 0 and 1), each scored on the freshly initialised student."""
    data = pattern_data()
    train(cfg(), tcfg(tmp_path, teacher=teacher_dir, batch_size=4, grad_accum=2, max_steps=2), data,
          log=lambda *a: None)
    row = _rows(tmp_path / "run" / "metrics.jsonl")[0]
    torch.manual_seed(0)
    student = BitNetModel(cfg()).train()
    kd = Distiller(load_teacher(teacher_dir), student, weight=1.0, temperature=5.0)
    parts = [kd.loss(student, *data.batch(0, 4, 32, seed=0, rank=m))[1] for m in range(2)]
    assert row["step"] == 1
    for k in ("lm_loss", "kd_loss"):
        assert row[k] == pytest.approx((parts[0][k] + parts[1][k]) / 2, rel=1e-5)


@pytest.mark.slow
def test_ddp_with_a_teacher_equals_one_process_with_grad_accum(teacher_dir, tmp_path):
    """2 DDP ranks (gloo), each with its own teacher replica = 1 process with grad_accum 2."""
    import test_parallel as TP

    runs = {}
    for name, extra, nproc in (("one", dict(grad_accum=2, checkpoint_format="dcp"), 1),
                               ("ddp", dict(parallel="ddp"), 2)):
        out = tmp_path / name
        TP._run({**TP.BASE, "recipe": "b1.58", "out_dir": str(out), "teacher": teacher_dir,
                 "kd_attention_layers": [-1], "kd_attention_weight": 10.0, **extra}, nproc, {})
        runs[name] = out
    rows = {n: [r for r in _rows(o / "metrics.jsonl") if "kd_loss" in r] for n, o in runs.items()}
    assert len(rows["one"]) == len(rows["ddp"]) == 5
    for a, b in zip(rows["ddp"], rows["one"]):
        for k in ("loss", "kd_loss", "ad_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    ref, got = TP._params(runs["one"] / "last"), TP._params(runs["ddp"] / "last")
    for k in ref:
        assert TP._rel(got[k], ref[k]) < 1e-5, k


def test_resume_with_a_teacher_is_bit_identical(teacher_dir, tmp_path):
    data = pattern_data()
    full = train(cfg(), tcfg(tmp_path / "a", teacher=teacher_dir, kd_attention_layers=[1], max_steps=8), data,
                 log=lambda *a: None)
    t = tcfg(tmp_path / "b", teacher=teacher_dir, kd_attention_layers=[1], max_steps=8)
    import bitlm.distill as D

    orig = D.Distiller.loss
    calls = {"n": 0}

    def crash_after_5(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    D.Distiller.loss = crash_after_5
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg(), t, data, log=lambda *a: None)  # saves the 5 completed steps on the way out
    finally:
        D.Distiller.loss = orig
    resumed = train(cfg(), t, data, resume=True, log=lambda *a: None)
    assert resumed.step == 8
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs after resume"
    # another temperature is another run: refused
    with pytest.raises(CheckpointError, match="kd_temperature"):
        train(cfg(), tcfg(tmp_path / "b", teacher=teacher_dir, kd_attention_layers=[1], kd_temperature=1.0,
                          max_steps=10), data, resume=True, log=lambda *a: None)


def test_a_hugging_face_llama_teacher_is_loaded_in_full_precision(tmp_path):
    """A Llama folder is the fp teacher itself (quant fp: its logits are transformers'), not its
    ternary conversion; the student distils from it like from any teacher."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(str(tmp_path / "llama"))
    teacher = load_teacher(str(tmp_path / "llama"))
    assert teacher.config.quant == "fp"
    x, _ = pattern_data().batch(0, 2, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), hf(x).logits, atol=1e-4)
    student = BitNetModel(cfg())
    loss, parts = Distiller(teacher, student, weight=1.0, temperature=2.0, attention_layers=[0]).loss(student, x, x)
    assert parts["kd_loss"] > 0 and parts["ad_loss"] > 0 and loss.requires_grad


def test_cli_train_with_a_teacher(teacher_dir, tmp_path):
    from bitlm.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    # a teacher with a tokenizer: the teacher checkpoint written by the CLI itself
    common = ["--preset", "tiny", "--set", "max_seq_len=32", "--data", str(text), "--seq-len", "16",
              "--batch-size", "2", "--eval-every", "0", "--no-progress", "--max-steps", "2"]
    assert main(["train", *common, "--set", "quant=fp", "--out", str(tmp_path / "t")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "s"), "--teacher", str(tmp_path / "t" / "last"),
                 "--kd-weight", "0.5", "--kd-temperature", "3", "--kd-attention-layer", "-1",
                 "--teacher-dtype", "bf16"]) == 0
    meta = read_meta(tmp_path / "s" / "last")
    assert meta["train"]["kd_weight"] == 0.5 and meta["train"]["teacher_dtype"] == "bf16"
    assert meta["teacher"]["dtype"] == "bfloat16"


@pytest.mark.network  # the experiments train on the default corpus (downloaded on first use)
def test_experiment_distill_end_to_end(tmp_path):
    from bitlm.data import prepare_data
    from bitlm.experiments import run_experiment
    from test_experiments import tiny

    res = run_experiment("distill", tiny("distill"), tmp_path, progress=False, data=prepare_data("default", vocab_size=2048))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["tag"] for r in rows] == ["teacher", "b1.58", "b1.58+ld", "b1.58+ld+ad"]
    assert all({"val_ppl", "zero_shot"} <= set(r) for r in rows)
    assert all(r["kl_to_teacher"] >= 0 for r in rows[1:])
    assert "kd_weight" not in rows[1] and rows[2]["kd_temperature"] == 5.0 and rows[3]["kd_attention_layers"] == [0]
    assert (tmp_path / "distill_loss.png").stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert "logit KD" in md and "chance" in md and res["teacher"].endswith("last")
    # the students distilled: their checkpoints name the teacher
    assert read_meta(tmp_path / "ckpt" / "b1.58+ld" / "last")["train"]["teacher"] == res["teacher"]


def test_captured_q_k_v_are_what_attention_uses():
    """The relation tensors are the layer's own: Q and K after RoPE, V raw (GQA width) — attending
    with them reproduces the attention output the block feeds to its sub-norm."""
    from bitlm.distill import _QKVCapture
    from bitlm.model import attend

    torch.manual_seed(0)
    model = BitNetModel(cfg(n_heads=4, n_kv_heads=2)).eval()
    cap = _QKVCapture(model, [1])
    seen = {}
    model.model.layers[1].self_attn.attn_sub_norm.register_forward_pre_hook(lambda m, a: seen.update(a=a[0]))
    x, _ = pattern_data().batch(0, 2, 16)
    cap.active = True
    with torch.no_grad():
        model(x)
    ((q, k, v),) = cap.take()
    c = model.config
    assert k.shape[-1] == v.shape[-1] == 2 * c.head_dim  # K/V at their own width, not repeated

    def heads(t, h):
        return t.view(2, 16, h, c.head_dim).transpose(1, 2)

    a = attend(heads(q, 4), heads(k, 2), heads(v, 2), 0).transpose(1, 2).reshape(2, 16, -1)
    assert torch.allclose(a, seen["a"], atol=1e-5)
    cap.remove()
