"""Few-shot evaluation (bitlm.tasks.fewshot_items, ``bitlm eval --num-fewshot``): the shot format and
sampler by hand, and per-item parity with lm-evaluation-harness's own task and sampler machinery
on local copies of the same items (every context string, every log-likelihood through the tiny
model, the metrics)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from bitlm import tasks as T
from test_tasks import (
    HAS_DATA,
    LM_EVAL_YAMLS,
    _raw_docs,
    _write_yaml,
    needs_data,
    needs_lm_eval,
)

# ---------------------------------------------------------------------------------------------
# by hand
# ---------------------------------------------------------------------------------------------


def _mc_pool(n: int) -> list[T.Item]:
    return [T._mc(f"Question: q{i}\nAnswer:", [f"a{i}", f"b{i}"], i % 2) for i in range(n)]


def test_multiple_choice_shot_format_and_seeded_sampler():
    pool = _mc_pool(10)
    items = pool[:3]
    out = T.fewshot_items("arc_easy", items, pool, 2, seed=7)  # arc: a test split, no exclusion
    rnd = random.Random(7)
    for item, got in zip(items, out):
        idx = rnd.sample(range(10), 2)  # one generator, drawn from in item order
        shots = "".join(f"{pool[j].contexts[0]} {pool[j].choices[pool[j].gold]}\n\n" for j in idx)
        assert got.contexts == tuple(shots + c for c in item.contexts)
        assert (got.continuations, got.choices, got.gold) == (item.continuations, item.choices, item.gold)
    assert T.fewshot_items("arc_easy", items, pool, 0) == items


def test_limit_gives_the_first_items_of_a_full_run():
    pool = _mc_pool(12)
    full = T.fewshot_items("piqa", pool, pool, 3)
    assert T.fewshot_items("piqa", pool[:4], pool, 3) == full[:4]
    assert T.fewshot_items("piqa", pool, pool, 3, seed=1) != full  # the seed matters


def test_tasks_without_a_test_split_drop_the_item_itself():
    pool = _mc_pool(3)
    # piqa (validation split): 2 shots from 3 items never include the item being evaluated
    for _ in range(5):
        for item, got in zip(pool, T.fewshot_items("piqa", pool, pool, 2, seed=random.randrange(1000))):
            assert item.contexts[0] + " " not in got.contexts[0][: -len(item.contexts[0])]
    # by hand: draw k + 1, drop the item, keep k
    rnd = random.Random(3)
    got = T.fewshot_items("piqa", pool[:1], pool, 1, seed=3)[0]
    idx = [j for j in rnd.sample(range(3), 2) if j != 0][:1]
    assert got.contexts[0] == f"{pool[idx[0]].contexts[0]} {pool[idx[0]].choices[pool[idx[0]].gold]}\n\n" \
        + pool[0].contexts[0]
    # arc (test split): lm-eval does not remove it, so with 1 item the shot is the item itself
    assert T.fewshot_items("arc_easy", pool[:1], pool[:1], 1)[0].contexts[0].startswith(pool[0].contexts[0] + " ")
    with pytest.raises(ValueError, match="--num-fewshot 3: task piqa has only 3 items"):
        T.fewshot_items("piqa", pool, pool, 3)
    with pytest.raises(ValueError, match="--num-fewshot must be >= 0"):
        T.fewshot_items("piqa", pool, pool, -1)


def test_winogrande_and_lambada_shots():
    w = T._winogrande({"sentence": "The cup fell because _ was heavy.", "option1": "it", "option2": "he",
                       "answer": "1"})
    pool = [w, w]
    shot = "The cup fell because it was heavy.\n\n"  # the gold option's context + " " + the rest
    got = T.fewshot_items("arc_easy", [w], pool, 1)[0]  # arc's rule: no exclusion
    assert T._shot_text("winogrande", w) == shot
    assert got.contexts[0].endswith(w.contexts[0])
    lam = T.Item(("the cat sat on the",), (" mat",), ("mat",), 0)
    assert T._shot_text("lambada", lam) == "the cat sat on the  mat\n\n"  # lm-eval's " " + " mat"
    assert T.fewshot_items("lambada", [lam], [lam], 1)[0].contexts == ("the cat sat on the  mat\n\nthe cat sat on the",)


# ---------------------------------------------------------------------------------------------
# parity with lm-evaluation-harness
# ---------------------------------------------------------------------------------------------

POOL = 40  # items in the local split both sides draw from (the whole split in the slow test)


def _lm_eval_fewshot(lm, yaml_dir: Path, task: str, k: int, limit: int) -> tuple[dict, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(yaml_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, bootstrap_iters=0, log_samples=True,
                                  num_fewshot=k, limit=limit)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _parity(task, tiny, tmp_path, monkeypatch, *, k: int, n: int, pool: int | None):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval.tasks

    from bitlm.lm_eval_adapter import BitLMEval

    model, tok = tiny
    docs, split = _raw_docs(task, pool if pool is not None else 10**9)
    if pool is not None:  # bitlm draws from the same first `pool` items
        full = T.load_task(task)[:pool]
        orig = T.load_task
        monkeypatch.setattr(T, "load_task", lambda name, limit=None: full if limit is None else orig(name, limit))
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    name = f"bitlm_fewshot_{task}"
    yaml_src = Path(os.path.dirname(lm_eval.tasks.__file__)) / LM_EVAL_YAMLS[task]
    _write_yaml(tmp_path / f"{name}.yaml", f"include: {yaml_src}\ntask: {name}\ntag: []\n", data, split,
                tmp_path / "hf-cache")
    res, samples = _lm_eval_fewshot(BitLMEval(model=model, tokenizer=tok, batch_size=16), tmp_path, name, k, n)
    mine = T.evaluate_tasks(model, tok, [task], limit=n, batch_size=16, progress=False, log_samples=True,
                            num_fewshot=k)["tasks"][task]
    assert len(samples) == len(mine["samples"]) == n
    for s, m in zip(samples, mine["samples"]):
        theirs = [a[0] for a in s["arguments"]]  # (context, continuation) per request
        assert theirs == m["contexts"], (s["doc_id"], theirs, m["contexts"])
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(m["logprobs"], abs=1e-6)
    assert res["acc,none"] == pytest.approx(mine["acc"])
    if "acc_norm" in mine:
        assert res["acc_norm,none"] == pytest.approx(mine["acc_norm"])
    return mine


@pytest.fixture(scope="module")
def tiny():
    import torch

    from bitlm.config import preset
    from bitlm.model import BitNetModel
    from test_tasks import _train_tokenizer

    texts = [c + k for n in T.TASKS for it in T.load_task(n, 40) for c, k in it.requests()] if HAS_DATA else ["x"]
    tok = _train_tokenizer(texts)
    torch.manual_seed(0)
    return BitNetModel(preset("tiny")).eval(), tok


@needs_lm_eval
@needs_data
@pytest.mark.parametrize("task", list(LM_EVAL_YAMLS))
def test_fewshot_contexts_and_scores_match_lm_eval(task, tiny, tmp_path, monkeypatch):
    """K = 2 shots, the first 6 items, a 40-item split: lm-eval's own YAML, task and sampler."""
    mine = _parity(task, tiny, tmp_path, monkeypatch, k=2, n=6, pool=POOL)
    assert all(c.count("\n\n") >= 2 for s in mine["samples"] for c in s["contexts"])


@pytest.mark.slow
@needs_lm_eval
@needs_data
@pytest.mark.parametrize("task", ["arc_challenge", "winogrande", "lambada"])
def test_fewshot_on_the_whole_split_matches_lm_eval(task, tiny, tmp_path, monkeypatch):
    """The CLI's pool (the whole evaluation split), K = 5 as the papers' few-shot columns use."""
    _parity(task, tiny, tmp_path, monkeypatch, k=5, n=8, pool=None)
