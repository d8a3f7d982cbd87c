"""BOS handling: tokenizers configured to start a text with BOS (Llama-3 / BitNet 2B4T
``<|begin_of_text|>``) get exactly one in eval, zero-shot tasks, generate and chat; bitlm's own
tokenizers (no BOS configured) give the same ids as ever.

The Llama-3-style tokenizer is built offline: a small byte-level BPE whose tokenizer.json
post-processor is ``TemplateProcessing("<|begin_of_text|> $A")`` plus a tokenizer_config.json
naming the special tokens, as the 2B4T repository ships them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bitlm import tasks as T
from bitlm.config import preset
from bitlm.data import Tokenizer, load_tokenizer
from bitlm.generate import CHAT_TEMPLATES, chat_prompt, chat_prompt_ids, generate
from bitlm.model import BitNetModel

TEXTS = ["Question: what is the sun?\nAnswer: a star. the cat sat on the mat. " * 3,
         "User: hello there<|eot_id|>Assistant: hi, how are you?"]


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tk


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    from tokenizers import processors

    tk = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    d = tmp_path_factory.mktemp("llama3-tok")
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.fixture(scope="module")
def l3(llama3_dir) -> Tokenizer:
    return load_tokenizer(llama3_dir)


@pytest.fixture(scope="module")
def plain() -> Tokenizer:
    """A bitlm-style tokenizer: no post-processor, BOS = EOS by name only."""
    return Tokenizer(_bpe(["<|endoftext|>", "<|pad|>"]))


def _bos(tok) -> int:
    return tok.backend.token_to_id("<|begin_of_text|>")


class Spy:
    """Wraps a model and records every input row it is given."""

    def __init__(self, model):
        self.model, self.config, self.rows = model, model.config, []

    def __call__(self, ids, cache=None, last_only=False):
        self.rows += [r.tolist() for r in ids] if cache is None or cache.pos == 0 else []
        return self.model(ids, cache=cache, last_only=last_only) if cache is not None else self.model(ids)

    def new_cache(self, *a, **k):
        return self.model.new_cache(*a, **k)

    def parameters(self):
        return self.model.parameters()

    def modules(self):
        return self.model.modules()

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def _model(vocab: int = 320):
    torch.manual_seed(0)
    return BitNetModel(preset("tiny", vocab_size=vocab, max_seq_len=64)).eval()


# --- the tokenizer ------------------------------------------------------------------------------


def test_llama3_tokenizer_adds_bos_exactly_as_transformers(l3, llama3_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(llama3_dir))
    assert l3.add_bos and l3.bos_id == _bos(l3) and l3.bos_token == "<|begin_of_text|>"
    for s in ["Question: what is the sun?", "the cat", " a", ""]:
        assert l3.encode(s, add_special_tokens=True) == hf.encode(s)  # transformers' default encoding
        assert l3.encode(s) == hf.encode(s, add_special_tokens=False)  # data path: never a BOS
    # a text that already starts with the BOS (a chat template's) keeps that one: never two
    s = "<|begin_of_text|>the cat"
    assert l3.encode(s, add_special_tokens=True) == hf.encode(s, add_special_tokens=False) == [l3.bos_id, *l3.encode("the cat")]
    # the tokenizer.json alone (packed files and GGUF sidecars carry no config) names the BOS too
    bare = load_tokenizer(llama3_dir / "tokenizer.json")
    assert bare.add_bos and bare.bos_id == l3.bos_id


def test_bitlm_tokenizer_is_unchanged(plain, tmp_path):
    from transformers import AutoTokenizer

    assert not plain.add_bos
    for s in TEXTS + [""]:
        assert plain.encode(s, add_special_tokens=True) == plain.encode(s) == plain.backend.encode(
            s, add_special_tokens=False).ids
    plain.save(tmp_path / "tok")  # what transformers reads from a bitlm folder: no BOS either
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok")).encode(TEXTS[0]) == plain.encode(TEXTS[0])
    assert load_tokenizer(tmp_path / "tok").add_bos is False


def test_a_post_processor_that_only_appends_adds_no_bos():
    from tokenizers import processors

    tk = _bpe(["<|endoftext|>"])
    tk.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    tok = Tokenizer(tk)
    assert not tok.add_bos and tok.encode("the cat", add_special_tokens=True) == tok.encode("the cat")


def test_saved_llama3_tokenizer_keeps_its_bos(l3, tmp_path):
    l3.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    again = load_tokenizer(tmp_path / "tok")
    assert again.add_bos and again.encode("the cat", add_special_tokens=True) == l3.encode("the cat", True)


# --- zero-shot tasks ----------------------------------------------------------------------------


def test_task_requests_start_with_one_bos(l3, plain):
    bos = l3.bos_id
    ctx, cont = T.encode_pair(l3, "Question: what is the sun?\nAnswer:", " a star.")
    assert ctx[0] == bos and ctx.count(bos) == 1 and bos not in cont
    assert ctx[1:] + cont == l3.encode("Question: what is the sun?\nAnswer: a star.")
    assert T.encode_pair(l3, "", "the cat") == ([bos], l3.encode("the cat"))  # HFLM's prefix token
    # bitlm tokenizer: the ids of before (plain encode, EOS for an empty context)
    ctx, cont = T.encode_pair(plain, "Question: what is the sun?\nAnswer:", " a star.")
    whole = plain.encode("Question: what is the sun?\nAnswer: a star.")
    assert ctx == plain.encode("Question: what is the sun?\nAnswer:") and ctx + cont == whole
    assert T.encode_pair(plain, "", "the cat") == ([plain.eos_id], plain.encode("the cat"))


@pytest.mark.parametrize("which", ["l3", "plain"])
def test_evaluate_tasks_feeds_the_model_one_bos(which, l3, plain, monkeypatch):
    tok = {"l3": l3, "plain": plain}[which]
    items = (T.Item(("Question: what is the sun?\nAnswer:",) * 2, (" a star.", " the cat"), ("a star.", "the cat"), 0),)
    monkeypatch.setattr(T, "_load_all", lambda name: (items, "hand-built"))
    monkeypatch.setattr(T, "data_root", lambda: Path("."))
    spy = Spy(_model())
    T.evaluate_tasks(spy, tok, ["arc_easy"], batch_size=1, progress=False)  # no padding in the rows
    assert len(spy.rows) == 2
    for row in spy.rows:
        if which == "l3":
            assert row[0] == l3.bos_id and row.count(l3.bos_id) == 1
        else:
            assert row[: len(plain.encode("Question"))] == plain.encode("Question")


# --- perplexity -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["l3", "plain"])
def test_eval_perplexity_scores_the_document_after_one_bos(which, l3, plain, tmp_path):
    import torch.nn.functional as F

    from bitlm.cli import main
    from bitlm.io.checkpoint import save_checkpoint

    tok = {"l3": l3, "plain": plain}[which]
    m = _model()
    ck = save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    text = TEXTS[0]
    assert main(["eval", "--model", str(ck), "--text", text, "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())["lm"]
    ids = tok.encode(text)
    seq = [tok.bos_id, *ids] if which == "l3" else ids  # bitlm: the first token is context only
    assert len(seq) <= m.config.max_seq_len
    with torch.no_grad():
        ref = F.cross_entropy(m(torch.tensor([seq[:-1]]))[0], torch.tensor(seq[1:])).item()
    assert r["tokens"] == len(seq) - 1 == (len(ids) if which == "l3" else len(ids) - 1)
    assert r["loss"] == pytest.approx(ref, rel=1e-5)


# --- generate and chat --------------------------------------------------------------------------


def test_generate_prompt_gets_one_bos(l3, plain):
    spy = Spy(_model())
    generate(spy, l3, "the cat", 3)
    assert spy.rows[-1] == [l3.bos_id, *l3.encode("the cat")]
    generate(spy, l3, "<|begin_of_text|>the cat", 3)  # the prompt's own BOS: still one
    assert spy.rows[-1] == [l3.bos_id, *l3.encode("the cat")]
    generate(spy, plain, "the cat", 3)
    assert spy.rows[-1] == plain.encode("the cat")  # bitlm tokenizer: unchanged


def test_chat_prompt_ids(l3, plain):
    msgs = [("System", "be brief"), ("User", "hello <|eot_id|> there")]
    ids = chat_prompt_ids(l3, msgs, "2b4t")
    eot = l3.backend.token_to_id("<|eot_id|>")
    assert ids[0] == l3.bos_id and ids.count(l3.bos_id) == 1
    # the template's <|eot_id|> by id (two turns); the user's literal one stays text
    assert ids.count(eot) == 2
    assert ids == [l3.bos_id, *l3.encode("System: be brief"), eot, *l3.encode("User: hello <|eot_id|> there"), eot,
                   *l3.encode("Assistant: ")]
    for template in CHAT_TEMPLATES:  # bitlm tokenizer: exactly the text prompt's ids, as before
        assert chat_prompt_ids(plain, msgs, template) == plain.encode(chat_prompt(msgs, template))


@pytest.mark.parametrize("which", ["l3", "plain"])
def test_chat_replies_equal_generate(which, l3, plain, monkeypatch, capsys):
    """``bitlm chat`` over two turns: each reply is what ``generate`` gives for the same prompt,
    template and greedy settings, and every prompt starts with one BOS (l3) or none (bitlm)."""
    import io
    import sys

    from bitlm import generate as G

    tok = {"l3": l3, "plain": plain}[which]
    m = _model()
    spy = Spy(m)
    monkeypatch.setattr(G, "load_for_generation", lambda args: spy)
    monkeypatch.setattr("bitlm.loading.load_tokenizer_for", lambda *a: tok)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nthe cat\n"))
    args = SimpleNamespace(model="x", tokenizer=None, system="be brief", template="plain", max_new_tokens=6,
                           temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, seed=0, stop=None,
                           head_act="f32")
    assert G.run_chat(args) == 0
    out = capsys.readouterr().out.splitlines()
    msgs = [("System", "be brief"), ("User", "hello there")]
    want1 = generate(m, tok, chat_prompt_ids(tok, msgs, "plain"), 6, stop=CHAT_TEMPLATES["plain"]["stop"])
    msgs += [("Assistant", want1.strip()), ("User", "the cat")]
    want2 = generate(m, tok, chat_prompt_ids(tok, msgs, "plain"), 6, stop=CHAT_TEMPLATES["plain"]["stop"])
    assert out == [want1, want2]
    if which == "plain":  # the text prompt and its ids agree for bitlm tokenizers
        assert want2 == generate(m, tok, chat_prompt(msgs, "plain"), 6, stop=CHAT_TEMPLATES["plain"]["stop"])
    prompts = spy.rows
    assert len(prompts) == 2
    for p in prompts:
        assert (p[0] == l3.bos_id and p.count(l3.bos_id) == 1) if which == "l3" else p == plain.encode(
            chat_prompt(msgs if p is prompts[1] else msgs[:2], "plain"))


# --- lm-eval adapter and GGUF ---------------------------------------------------------------------


def test_lm_eval_adapter_encodes_like_hflm(l3, plain):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from bitlm.lm_eval_adapter import BitLMEval

    m = _model()
    lm = BitLMEval(model=m, tokenizer=l3)
    assert lm.tok_encode("the cat") == [l3.bos_id, *l3.encode("the cat")]
    assert lm.tok_encode("the cat", add_special_tokens=False) == l3.encode("the cat")
    assert lm.prefix_token_id == l3.bos_id
    ((ctx_req,),) = [[r] for r in [Instance("loglikelihood", {}, ("", "the cat"), 0)]]
    (ll,) = lm.loglikelihood([ctx_req], disable_tqdm=True)
    (ref,) = T.loglikelihood(m, [([l3.bos_id], l3.encode("the cat"))])
    assert ll[0] == pytest.approx(ref[0], abs=1e-6)
    # rolling: one BOS, then exactly the document's tokens
    text = "the cat sat on the mat."
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ((want, _),) = T.loglikelihood(m, [([l3.bos_id], l3.encode(text))])
    assert total == pytest.approx(want, abs=1e-5)
    lp = BitLMEval(model=m, tokenizer=plain)
    assert lp.tok_encode("the cat") == plain.encode("the cat") and lp.prefix_token_id == plain.eos_id


def test_gguf_add_bos_token_round_trip(l3, plain, tmp_path):
    from bitlm.io.gguf import gguf_tokenizer, read_gguf, save_gguf

    m = _model()
    for name, tok, want in [("l3", l3, True), ("plain", plain, False)]:
        path = save_gguf(m, tmp_path / f"{name}.gguf", tokenizer=tok)
        with read_gguf(path) as f:
            assert f.metadata["tokenizer.ggml.add_bos_token"] is want
        back = gguf_tokenizer(path)
        assert back.add_bos is want and back.bos_id == tok.bos_id
        assert back.encode("the cat", add_special_tokens=True) == tok.encode("the cat", add_special_tokens=True)
