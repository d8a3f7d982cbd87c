"""The request scheduler: continuous batching over a fixed pool of KV-cache slots.

One worker thread owns the model and the :class:`~bitlm.engine.KVPool`.  Each turn of its loop

1. drops cancelled requests (their slots are free again before the next step: a client that
   disconnects costs at most the step in flight);
2. admits waiting requests into free slots (one per turn while others are decoding, so a long
   prompt delays running streams by one prefill, not by a queue of them); while others decode,
   a prompt of 2+ tokens that needs only its last logits is folded into the decode step below
   (``decode_batch``'s ``prompts``: its rows share the step's weight reads, and its logits are
   the same bits as its own prefill's); any other is prefilled on its own first;
3. runs one decode step of every active sequence together (``PackedModel.decode_batch``: the
   weights are read once per step for all of them; models without it decode one by one), then
   samples each sequence's next token with its own parameters and generator.

Sampling is ``bitlm.generate.sample_next`` and stop strings / UTF-8 hold-back are
``bitlm.generate.TextStream``, so a request with a seed produces what ``bitlm generate`` does.
Results go back through each request's ``emit`` callback (called on the worker thread; the app
hands them to its event loop).  Nothing here knows about HTTP.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..engine import KVPool
from ..generate import SamplingParams, TextStream, sample_next

__all__ = ["Request", "Event", "TokenLogprob", "Scheduler", "SchedulerClosed"]


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the ``n`` most likely tokens at this position, best first


@dataclass
class Event:
    """What one request produced in one step: new text (never a partial character or part of a
    stop string), the tokens sampled, their log-probabilities (when asked for), and at the end
    ``finish_reason`` ("stop", "length", "cancelled" or "error" with ``error`` set)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count()


class Request:
    """One sequence to generate.  ``logprobs``: report that many top alternatives per sampled
    token (0: just the token's own), None: no log-probabilities; ``prompt_logprobs``: also score
    the prompt (``echo`` with logprobs), which needs the full prompt logits."""

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams | None = None,
                 stop: Sequence[str] | None = None, logprobs: int | None = None, prompt_logprobs: bool = False,
                 emit: Callable[[Event], None] | None = None) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        params = params or SamplingParams()
        params.validate()
        self.id = next(_ids)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_tokens, self.params, self.stop = max_tokens, params, list(stop or ())
        self.logprobs, self.want_prompt_logprobs = logprobs, prompt_logprobs
        self.emit = emit or (lambda e: None)
        self.cancelled = False
        self.finished: str | None = None
        # worker-side state
        self.slot: int | None = None
        self.next_token: int | None = None
        self.n_generated = 0
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.history: torch.Tensor | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        """Stop generating (thread-safe); the slot is released before the next decode step."""
        self.cancelled = True


class Metrics:
    """Counters for ``/metrics`` (written by the worker thread, read by the app)."""

    def __init__(self) -> None:
        self.requests_total: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prompt_seconds = 0.0
        self.decode_seconds = 0.0
        self.decode_steps = 0
        self.decode_rows = 0  # sum over steps of the sequences in the step (mean batch = rows / steps)
        self.prompts_folded = 0  # prefills run inside a decode step (decode_batch's prompts)

    def finished(self, reason: str) -> None:
        self.requests_total[reason] = self.requests_total.get(reason, 0) + 1


def _logprob_entries(logits: torch.Tensor, chosen: Sequence[int], n: int) -> list[TokenLogprob]:
    """Log-probabilities of the model's distribution (rows of ``logits``) at ``chosen`` tokens."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    out = []
    top_v, top_i = (lsm.topk(n, dim=-1) if n > 0 else (None, None))
    for r, t in enumerate(chosen):
        top = [] if n == 0 else list(zip(top_i[r].tolist(), top_v[r].tolist()))
        out.append(TokenLogprob(int(t), float(lsm[r, t]), top))
    return out


class Scheduler:
    """Continuous batching of :class:`Request` s over ``parallel`` slots of ``ctx`` tokens."""

    def __init__(self, model, tokenizer, parallel: int = 4, ctx: int | None = None,
                 prefills_per_step: int = 1) -> None:
        limit = model.config.max_seq_len
        self.model, self.tokenizer = model, tokenizer
        self.ctx = min(ctx or limit, limit)
        self.pool = KVPool(model, parallel, self.ctx)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.prefills_per_step = prefills_per_step
        self.metrics = Metrics()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._cv = threading.Condition()
        self._closing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="bitlm-scheduler", daemon=True)

    # -- public API (any thread) -------------------------------------------------------------------
    @property
    def parallel(self) -> int:
        return len(self.pool)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, req: Request) -> Request:
        if len(req.prompt_ids) + max(req.max_tokens, 0) > self.ctx:
            raise ValueError(f"prompt of {len(req.prompt_ids)} tokens + max_tokens {req.max_tokens} exceeds "
                             f"the context of {self.ctx} tokens")
        if max(req.prompt_ids) >= self.model.config.vocab_size or min(req.prompt_ids) < 0:
            raise ValueError(f"prompt token id out of range for the vocabulary of {self.model.config.vocab_size}")
        with self._cv:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def running(self) -> int:
        return len(self._active)

    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, cancel the queued and running ones, stop the worker."""
        with self._cv:
            self._closing = True
            for r in list(self._waiting) + list(self._active):
                r.cancel()
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._waiting and not self._active and not self._closing:
                    self._cv.wait()
                if self._closing and not self._active:
                    while self._waiting:
                        self._finish(self._waiting.popleft(), "cancelled")
                    self._stopped = True
                    return
                admit = []
                budget = self.prefills_per_step if self._active else self.pool.free
                while self._waiting and len(admit) < min(budget, self.pool.free):
                    r = self._waiting.popleft()
                    if r.cancelled:
                        self._finish(r, "cancelled")
                    else:
                        admit.append(r)
            for r in [r for r in self._active if r.cancelled]:
                self._active.remove(r)
                self._finish(r, "cancelled")
            folded = []
            for r in admit:
                if self._active and self._foldable(r):
                    folded.append(r)  # prefilled inside the decode step below
                else:
                    self._prefill(r)
            if self._active or folded:
                self._decode_step(folded)

    def _finish(self, r: Request, reason: str, error: str | None = None, text: str = "") -> None:
        if r.finished is not None:
            return
        r.finished = reason
        if r.slot is not None:
            self.pool.release(r.slot)
            r.slot = None
        self.metrics.finished(reason)
        r.emit(Event(text=text, finish_reason=reason, error=error, prompt_tokens=len(r.prompt_ids),
                     completion_tokens=r.n_generated))

    def _fail(self, r: Request, e: BaseException) -> None:
        traceback.print_exc()
        if r in self._active:
            self._active.remove(r)
        self._finish(r, "error", error=f"{type(e).__name__}: {e}")

    def _foldable(self, r: Request) -> bool:
        """Whether ``r``'s prefill can run inside the next decode step (``decode_batch``'s
        ``prompts``: the same bits as its own prefill): prompts of 2+ tokens whose only logits
        needed are the last position's, on an engine with batched decode."""
        return (hasattr(self.model, "decode_batch") and len(r.prompt_ids) >= 2 and not r.want_prompt_logprobs
                and r.max_tokens > 0)

    def _start(self, r: Request) -> None:
        """Per-request state once its prompt is in its cache."""
        r.stream = TextStream(self.tokenizer, r.stop)
        r.generator = torch.Generator().manual_seed(r.params.seed)
        r.history = torch.tensor([r.prompt_ids], dtype=torch.long)
        self.metrics.prompt_tokens += len(r.prompt_ids)

    def _prefill(self, r: Request) -> None:
        try:
            r.slot = self.pool.acquire()
            assert r.slot is not None
            cache = self.pool.caches[r.slot]
            t0 = time.perf_counter()
            ids = torch.tensor([r.prompt_ids], dtype=torch.long)
            with torch.inference_mode():
                logits = self.model(ids, cache=cache, last_only=not r.want_prompt_logprobs)[0]  # (T or 1, V)
            self.metrics.prompt_seconds += time.perf_counter() - t0
            self._start(r)
            prompt_lp = None
            if r.want_prompt_logprobs:
                n = max(r.logprobs or 0, 1)
                prompt_lp = [None] + _logprob_entries(logits[:-1], r.prompt_ids[1:], n)
            if r.max_tokens == 0:
                r.emit(Event(prompt_logprobs=prompt_lp))
                self._finish(r, "length")
                return
            self._active.append(r)
            self._accept(r, logits[-1], prompt_lp)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            self._fail(r, e)

    def _decode_step(self, joining: list[Request] = ()) -> None:
        """One decode step of every active sequence, with the prefills of ``joining`` (foldable
        requests) in the same pass; the joiners then sample their first token from its rows."""
        batch = list(self._active)
        caches = [self.pool.caches[r.slot] for r in batch]
        for r in joining:
            r.slot = self.pool.acquire()
            assert r.slot is not None
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                if hasattr(self.model, "decode_batch"):
                    logits = self.model.decode_batch([r.next_token for r in batch], caches,
                                                     [r.prompt_ids for r in joining],
                                                     [self.pool.caches[r.slot] for r in joining])
                else:  # the torch reference model: one sequence at a time (nothing is ever folded)
                    logits = torch.cat([self.model(torch.tensor([[r.next_token]]), cache=c)[:, -1]
                                        for r, c in zip(batch, caches)])
        except Exception as e:  # noqa: BLE001
            for r in batch + list(joining):
                self._fail(r, e)
            return
        self.metrics.decode_seconds += time.perf_counter() - t0
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(batch)
        self.metrics.prompts_folded += len(joining)
        for r in joining:
            self._start(r)
            self._active.append(r)
        for r, row in zip(batch + list(joining), logits):
            try:
                self._accept(r, row)
            except Exception as e:  # noqa: BLE001
                self._fail(r, e)

    def _accept(self, r: Request, logits: torch.Tensor, prompt_lp=None) -> None:
        """Sample the next token of ``r`` from its logits (V,), emit it, finish or queue it."""
        nxt = sample_next(logits[None], r.params, r.history, r.generator)
        tok = int(nxt.item())
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.n_generated += 1
        self.metrics.generation_tokens += 1
        lps = _logprob_entries(logits[None], [tok], r.logprobs) if r.logprobs is not None else []
        finish = None
        if self.eos_id is not None and tok == self.eos_id:
            text, finish = r.stream.finish(), "stop"
        else:
            text = r.stream.push(tok)
            if r.stream.stopped is not None:
                finish = "stop"
            elif r.n_generated >= r.max_tokens or self.pool.caches[r.slot].pos >= self.ctx:
                text, finish = text + r.stream.finish(), "length"
        r.emit(Event(text=text, tokens=[tok], logprobs=lps, prompt_logprobs=prompt_lp))
        if finish is not None:
            self._active.remove(r)
            self._finish(r, finish)
        else:
            r.next_token = tok
            r.history = torch.cat([r.history, nxt.view(1, 1)], dim=1)
