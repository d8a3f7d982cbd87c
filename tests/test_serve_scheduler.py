"""bitlm.serve.scheduler without HTTP: finish reasons, stop strings across token boundaries,
UTF-8 hold-back, and continuous batching of more requests than slots equal to ``bitlm generate``."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from bitlm.engine import convert
from bitlm.generate import SamplingParams, generate
from bitlm.serve.scheduler import Request, Scheduler, SchedulerClosed
from helpers import tiny_model

EOS = 256


class ByteTok:
    """Token i < 256 is byte i; 256 is EOS.  Multi-byte characters take several tokens."""

    eos_id = EOS

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _Cache:
    def __init__(self, max_len: int) -> None:
        self.pos, self.max_len = 0, max_len

    def nbytes(self) -> int:
        return 0


class Scripted:
    """A model whose greedy continuation of any one-token prompt is ``script`` then EOS: the
    logits at absolute position p put all their mass on ``script[p]``."""

    def __init__(self, script: bytes) -> None:
        self.script = list(script)
        self.config = SimpleNamespace(max_seq_len=64, vocab_size=257)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> _Cache:
        return _Cache(max_len or 64)

    def __call__(self, ids, cache=None, last_only=False):
        T = ids.shape[1]
        out = torch.full((1, T, 257), -10.0)
        for t in range(T):
            p = cache.pos + t
            out[0, t, self.script[p] if p < len(self.script) else EOS] = 10.0
        cache.pos += T
        return out[:, -1:] if last_only else out


def _run(sched: Scheduler, req: Request):
    events, done = [], threading.Event()

    def emit(e):
        events.append(e)
        if e.finish_reason is not None:
            done.set()

    req.emit = emit
    sched.submit(req)
    assert done.wait(30)
    return events


@pytest.fixture
def sched():
    s = Scheduler(Scripted("héllo wörld STOP more日本".encode()), ByteTok(), parallel=2, ctx=48).start()
    yield s
    s.close(5)


def test_text_never_splits_a_character_and_eos_stops(sched):
    ev = _run(sched, Request([ord("x")], 40))
    assert all("\ufffd" not in e.text for e in ev)
    assert "".join(e.text for e in ev) == "héllo wörld STOP more日本"
    assert ev[-1].finish_reason == "stop" and ev[-1].text == ""
    n = len("héllo wörld STOP more日本".encode()) + 1  # + EOS
    assert (ev[-1].prompt_tokens, ev[-1].completion_tokens) == (1, n)
    assert sum(len(e.tokens) for e in ev) == n


def test_stop_string_across_tokens_is_held_back_and_never_leaks(sched):
    ev = _run(sched, Request([ord("x")], 40, stop=["ld S", "zzz"]))
    assert "".join(e.text for e in ev) == "héllo wör"  # the held-back "l" of "ld S" never went out
    assert ev[-1].finish_reason == "stop"
    ev = _run(sched, Request([ord("x")], 40, stop=["日本X"]))  # a prefix held until EOS, then flushed
    assert "".join(e.text for e in ev) == "héllo wörld STOP more日本" and ev[-1].finish_reason == "stop"


def test_length_finish_flushes_held_text(sched):
    ev = _run(sched, Request([ord("x")], 3, stop=["é!"]))  # 'h', 0xC3, 0xA9 = "hé" (a stop prefix)
    assert "".join(e.text for e in ev) == "hé" and ev[-1].finish_reason == "length"
    assert ev[-1].completion_tokens == 3


def test_logprobs_and_cancel_of_a_queued_request(sched):
    ev = _run(sched, Request([ord("x")], 2, logprobs=2))
    lps = [x for e in ev for x in e.logprobs]
    assert [x.token for x in lps] == list("hé".encode()[:2])
    assert all(len(x.top) == 2 and x.top[0][0] == x.token and x.top[0][1] == x.logprob for x in lps)
    r = Request([ord("x")], 40)
    r.cancel()
    ev = _run(sched, r)
    assert ev[-1].finish_reason == "cancelled" and sched.pool.free == 2


def test_requests_after_close_are_refused():
    s = Scheduler(Scripted(b"abc"), ByteTok(), parallel=1, ctx=16).start()
    s.close(5)
    with pytest.raises(SchedulerClosed):
        s.submit(Request([1], 2))


def test_too_long_is_refused_at_submit(sched):
    with pytest.raises(ValueError, match="exceeds the context of 48"):
        sched.submit(Request([1] * 40, 9))


class CountingTok:
    eos_id = None

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("parallel", [1, 3])
def test_more_requests_than_slots_equal_generate(parallel):
    """7 greedy and sampled requests of mixed lengths on fewer slots: each equals bitlm generate
    alone (the same tokens; sampled ones with the same seed), whatever it was batched with."""
    pm = convert(tiny_model("tiny", sharpen=50, sharpen_head=False, max_seq_len=96), "i2")
    tok = CountingTok()
    s = Scheduler(pm, tok, parallel=parallel, ctx=64).start()
    try:
        specs = [([1, 2, 3], 9, SamplingParams()), ([5], 3, SamplingParams()),
                 ([7, 8, 9, 10, 11, 12], 12, SamplingParams(temperature=0.9, top_k=20, seed=5)),
                 ([2, 2], 1, SamplingParams()), ([4, 6, 8], 15, SamplingParams(temperature=1.2, top_p=0.9, seed=1)),
                 ([9] * 20, 6, SamplingParams()), ([3, 1], 10, SamplingParams(repetition_penalty=1.3))]
        outs: dict[int, list] = {i: [] for i in range(len(specs))}
        done = threading.Semaphore(0)
        for i, (ids, n, sp) in enumerate(specs):
            def emit(e, i=i):
                outs[i].append(e)
                if e.finish_reason is not None:
                    done.release()
            s.submit(Request(ids, n, sp, emit=emit))
        for _ in specs:
            assert done.acquire(timeout=60)
        for i, (ids, n, sp) in enumerate(specs):
            want = generate(pm, tok, ids, n, sp)
            assert "".join(e.text for e in outs[i]) == want, i
            assert outs[i][-1].finish_reason == "length"
        if parallel > 1:
            assert s.metrics.decode_rows > s.metrics.decode_steps  # sequences really shared steps
        assert s.pool.free == parallel and s.running() == 0
    finally:
        s.close(5)
