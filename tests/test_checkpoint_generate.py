"""Native checkpoints (atomic, validated) and generation/sampling."""

import json

import pytest
import torch

from bitlm.config import preset
from bitlm.generate import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate,
    generate_tokens,
    sample_next,
)
from bitlm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bitlm.loading import detect_format, load
from bitlm.model import BitNetModel


class CharTok:
    """A byte-level toy tokenizer (ids = bytes + 1, 0 = EOS) for tests."""

    eos_id = 0
    vocab_size = 257

    def encode(self, s):
        return [b + 1 for b in s.encode()]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    m = BitNetModel(preset(name))
    save_checkpoint(m, tmp_path / "ck", step=7, train_config={"recipe": "b1.58"})
    m2, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 7 and m2.config == m.config
    assert m.state_dict().keys() == m2.state_dict().keys()
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    if m.config.tie_embeddings:
        assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert detect_format(tmp_path / "ck") == "native"
    assert isinstance(load(tmp_path / "ck"), BitNetModel)


def test_checkpoint_overwrite_is_atomic(tmp_path):
    m = BitNetModel(preset("tiny"))
    save_checkpoint(m, tmp_path / "ck", step=1)
    save_checkpoint(m, tmp_path / "ck", step=2)
    assert load_checkpoint(tmp_path / "ck")[1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old folders left


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    m = BitNetModel(preset("tiny"))
    ck = save_checkpoint(m, tmp_path / "ck")
    st = ck / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):  # the checksum
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):  # unverified: safetensors itself
        load_checkpoint(ck, verify=False)
    ck = save_checkpoint(m, tmp_path / "ck2")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["d_model"] = 128
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config.json: corrupt"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="shape"):  # unverified: the tensor check still names it
        load_checkpoint(ck, verify=False)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(ck)


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    from bitlm.cli import main

    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope" in err[0]


# --- sampling ----------------------------------------------------------------------------------


def test_greedy_and_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sample_next(logits, SamplingParams()).item() == 1
    # greedy picks argmax's token: the first of tied maxima (an int8 head's logits tie), a NaN wins
    ties = torch.randint(0, 4, (6, 128256)).float()
    ties[2, [77, 9000]] = float("nan")
    assert torch.equal(sample_next(ties, SamplingParams()), ties.argmax(-1))
    assert filter_top_k(logits, 2).isinf().tolist() == [[True, False, False, True]]
    # probs ≈ [0.087, 0.644, 0.237, 0.032]: top_p=0.7 keeps 3.0 and 2.0
    assert filter_top_p(logits, 0.7).isinf().tolist() == [[True, False, False, True]]
    assert filter_top_p(logits, 0.5).isinf().tolist() == [[True, False, True, True]]
    pen = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1]]), 2.0)
    assert pen.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(1, 50)
    draw = lambda seed: [  # noqa: E731
        sample_next(logits, SamplingParams(temperature=1.0, top_k=3, seed=seed), generator=g).item()
        for g in [torch.Generator().manual_seed(seed)] for _ in range(30)
    ]
    assert draw(1) == draw(1)
    top3 = set(torch.topk(logits, 3).indices[0].tolist())
    assert set(draw(2)) <= top3


@pytest.mark.parametrize("params,V,peaked", [
    (SamplingParams(temperature=0.7), 300, False),
    (SamplingParams(temperature=1.0, top_k=20), 300, False),
    (SamplingParams(temperature=1.0, top_p=0.8), 300, True),  # the nucleus lies in the top 256
    (SamplingParams(temperature=1.3, top_p=0.9), 2000, False),  # it does not: the full sort
    (SamplingParams(temperature=0.8, top_k=40, top_p=0.95), 2000, True),
])
def test_sampling_draws_the_filtered_softmax(params, V, peaked):
    """sample_next draws from softmax(filter_top_p(filter_top_k(logits / T))) — the filters'
    reference definitions over the whole vocabulary — though it only looks at the survivors:
    the same support, and frequencies within 5 standard errors of the probabilities."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, V, generator=g) * (4.0 if peaked else 1.0)
    logits[0, :7] = logits[0, 7]  # ties (at the top-k boundary for some draws)
    want = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p).softmax(-1)[0]
    n = 6000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, params, generator=gen) for _ in range(n)]).view(-1)
    freq = torch.bincount(draws, minlength=V).double() / n
    assert set(draws.tolist()) <= set(torch.nonzero(want).view(-1).tolist())
    se = (want.double() * (1 - want.double()) / n).sqrt()
    assert ((freq - want.double()).abs() <= 5 * se + 1e-9).all()


def test_sampling_refuses_nan_logits():
    logits = torch.randn(1, 50)
    logits[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample_next(logits, SamplingParams(temperature=1.0))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0.0)])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_generate_matches_full_forward_greedy():
    torch.manual_seed(0)
    m = BitNetModel(preset("tiny", vocab_size=257)).eval()
    prompt = [5, 9, 33, 100]
    toks = list(generate_tokens(m, prompt, 12))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert toks == seq[len(prompt):]


class Scripted:
    """A model that always predicts the next token of a fixed script (CharTok ids), so the text a
    generation produces is known in advance; counts the decode steps it is asked for."""

    def __init__(self, script: str):
        self.script = CharTok().encode(script)
        self.config = preset("tiny", vocab_size=257)
        self.calls = 0

    def new_cache(self, batch=1, max_len=None):
        from types import SimpleNamespace

        return SimpleNamespace(pos=0, max_len=max_len)

    def __call__(self, ids, cache=None, last_only=False):
        self.calls += 1
        cache.pos += ids.shape[1]
        n = self.calls - 1  # tokens generated so far
        logits = torch.zeros(1, 1, 257)
        logits[0, 0, self.script[n] if n < len(self.script) else 0] = 1.0
        return logits


def test_generate_text_stop_and_stream():
    torch.manual_seed(0)
    m = BitNetModel(preset("tiny", vocab_size=257)).eval()
    tok = CharTok()
    pieces = []
    full = generate(m, tok, "ab", 20, on_text=pieces.append)
    assert full and "".join(pieces) == full  # the stream is the whole text
    # stop strings, on a model whose text is known: the output ends right before the first stop
    script = "hello world. STOP and more text after it"
    assert generate(Scripted(script), tok, "ab", 40) == script
    for stops, want in [(["STOP"], "hello world. "), (["d. S", "STOP"], "hello worl"), (["o w"], "hell"),
                        (["never"], script)]:
        m = Scripted(script)
        pieces = []
        cut = generate(m, tok, "ab", 40, stop=stops, on_text=pieces.append)
        assert cut == want and "".join(pieces) == want, stops
        if want != script:  # generation ends as soon as the stop string is complete
            first = min(script.find(s) + len(s) for s in stops if s in script)
            assert m.calls == first, stops


def test_prompt_longer_than_context():
    m = BitNetModel(preset("tiny"))
    with pytest.raises(ValueError, match="context"):
        list(generate_tokens(m, [1] * 128, 4))
