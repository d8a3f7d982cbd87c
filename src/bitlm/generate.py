"""Text generation: prefill + KV-cache decode, sampling as pure functions, streaming, stop strings.

Works with any model object that has ``config`` (max_seq_len, vocab_size), ``new_cache(batch)``
and ``__call__(ids, cache=cache) -> logits`` — the torch reference ``BitNetModel`` and the packed
engine alike.

Sampling order (as in transformers / llama.cpp): repetition penalty → temperature → top-k →
top-p → draw.  ``temperature == 0`` is greedy (argmax, no randomness).

BOS: a prompt gets one leading BOS when the tokenizer's configuration adds one (Llama-3 / BitNet
2B4T ``<|begin_of_text|>``; ``Tokenizer.add_bos``), as transformers and llama.cpp encode it; a
prompt that starts with the BOS text already keeps just that one.  bitlm's own tokenizers add none.
Chat templates' special tokens (2B4T's ``<|eot_id|>``) are inserted by id where the vocabulary
has them; user text is always encoded as text.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels

__all__ = ["SamplingParams", "SAMPLE_DEFAULTS", "sample_next", "generate_tokens", "generate", "TextStream", "chat_prompt",
           "chat_prompt_ids",
           "add_arguments", "run"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


#: What ``--sample`` samples with (llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95);
#: ``bitlm demo`` shows samples drawn with these.
SAMPLE_DEFAULTS = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.0, seed=0)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: seen tokens' positive logits are divided by ``penalty``, negative multiplied."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits.gather(-1, history)
    logits.scatter_(-1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of sorted tokens whose probability reaches ``p``."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop[..., 0] = False  # always keep the most likely token
    mask = torch.zeros_like(drop).scatter(-1, idx, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample_next(
    logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from ``logits`` (B, V); ``history`` (B, L) are the tokens seen so far."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0.0:  # argmax's indices (first maximum, NaN wins), native where it can be
        return kernels.argmax(logits)
    return torch.stack([_sample_row(row, params, generator) for row in logits])


#: Nucleus search: the top this many are tried before sorting every candidate.
_NUCLEUS_TOP = 256


def _sample_row(x: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token from float32 logits (V,): the distribution of softmax(filter_top_p(filter_top_k(
    x / T))) drawn by inverse CDF (one uniform, float64 cumulative sum) over the surviving
    candidates only.  On a 2B4T vocabulary (128k) with llama.cpp's defaults this takes ~1 ms where
    filtering and ``torch.multinomial`` over the whole vocabulary took ~18 (a full sort for top-p,
    an exponential draw per token for multinomial)."""
    x = x / params.temperature
    cand = None  # the candidates' token ids (None: every token); x keeps their logits
    if params.top_k is not None and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        cand = (x >= kth).nonzero().squeeze(1)  # ties with the k-th kept, as filter_top_k
        x = x[cand]
    if params.top_p is not None and params.top_p < 1.0:
        keep = _nucleus(x, params.top_p)
        cand, x = (keep if cand is None else cand[keep]), x[keep]
    cdf = torch.softmax(x, -1).double().cumsum(0)
    total = float(cdf[-1])
    if not 0.0 < total < float("inf"):
        raise ValueError("sampling: the logits hold NaN or infinite values")
    u = torch.rand((), dtype=torch.float64, generator=generator) * total
    i = min(int(torch.searchsorted(cdf, u.view(1), right=True)), x.numel() - 1)  # zero-probability tokens never
    return cand[i] if cand is not None else torch.tensor(i)


def _nucleus(x: torch.Tensor, p: float) -> torch.Tensor:
    """Indices into x of filter_top_p's survivors: the smallest prefix of tokens sorted by
    probability whose mass reaches p (the most likely always kept), found among the top
    ``_NUCLEUS_TOP`` when it lies there, else by sorting every probability (numpy's argsort: a
    128k sort takes ~2 ms there, ~9 in torch)."""
    probs = torch.softmax(x, -1)
    top = torch.topk(probs, _NUCLEUS_TOP) if _NUCLEUS_TOP < x.numel() else None
    if top is not None and bool(top.values.cumsum(0)[-1] - top.values[-1] >= p):  # its last is dropped below
        pk, idx = top
    else:
        idx = torch.from_numpy(np.argsort(-probs.numpy()))
        pk = probs[idx]
    drop = pk.cumsum(0) - pk >= p  # mass before this token already reaches p
    drop[0] = False
    return idx[~drop]


def generate_tokens(
    model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one (streaming); stops at ``eos_id`` or the context limit."""
    params.validate()
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token")
    limit = model.config.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {limit} tokens")
    if max(prompt_ids) >= model.config.vocab_size or min(prompt_ids) < 0:
        raise ValueError(f"prompt token id out of range for vocabulary of {model.config.vocab_size}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    gen = torch.Generator().manual_seed(params.seed)
    cache = model.new_cache(1, max_len=len(prompt_ids) + max_new_tokens)
    history = list(prompt_ids)
    penalty = params.repetition_penalty != 1.0  # the only reader of the history
    # temperature 0 on a packed model: one native call per token gives the next one (the same
    # pick; no logits tensor, no torch op in between: each costs ~0.1 ms with cold caches)
    greedy = getattr(model, "decode_greedy", None) if params.temperature == 0.0 and not penalty else None
    dev = model_device(model)
    with torch.inference_mode():
        # sampling runs on the CPU (its generator, its history) whatever device the model is on:
        # the same seed gives the same tokens everywhere the logits agree
        logits = model(torch.tensor([prompt_ids], device=dev), cache=cache, last_only=True)[:, -1].float().cpu()
        nxt: int | None = None
        for i in range(max_new_tokens):
            if nxt is None:
                hist = torch.tensor([history], dtype=torch.long) if penalty else None
                nxt = int(sample_next(logits, params, hist, gen).item())
            tok, nxt = nxt, None
            yield tok
            if eos_id is not None and tok == eos_id:
                return
            history.append(tok)
            if i + 1 == max_new_tokens or cache.pos >= cache.max_len:  # no step for a token never asked for
                return
            if greedy is not None:
                nxt = greedy(tok, cache)
            if nxt is None:
                logits = model(torch.tensor([[tok]], device=dev), cache=cache, last_only=True)[:, -1].float().cpu()


class TextStream:
    """Incremental detokenisation with stop strings, shared by ``generate`` and the server.

    ``push(token)`` returns the new text that can no longer change: never a partial UTF-8
    sequence (it decodes to U+FFFD), never text that may start a stop string (held back until the
    next tokens resolve it), and never anything from a stop string on.  After a stop string
    appears, :attr:`stopped` names it and :attr:`text` ends just before it; ``finish()`` flushes
    what was held back when generation ends otherwise."""

    def __init__(self, tokenizer, stop: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop or () if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped: str | None = None
        self._text = ""

    @property
    def text(self) -> str:
        """The text so far (up to the stop string, if one was found)."""
        return self._text

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.emitted):] if len(upto) > len(self.emitted) else ""
        if piece:
            self.emitted = upto
        return piece

    def push(self, token: int) -> str:
        if self.stopped is not None:
            raise ValueError("TextStream: push after a stop string")
        self.ids.append(int(token))
        text = self._text = self.tokenizer.decode(self.ids)
        if self.stop:
            hits = [(text.find(s), s) for s in self.stop if s in text]
            if hits:
                at, self.stopped = min(hits)
                self._text = text[:at]
                return self._emit(self._text)
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        safe = text[: len(text) - hold]
        return "" if safe.endswith("\ufffd") else self._emit(safe)

    def finish(self) -> str:
        """What is left to emit at the end of generation (held-back text included)."""
        return self._emit(self._text)


def generate(
    model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 64,
    params: SamplingParams = SamplingParams(), stop: list[str] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate a completion of ``prompt`` (text, or token ids used as they are; text out).
    ``on_text`` receives each new piece of text as it is produced; generation ends at EOS, a stop
    string, or the token limit.  A text prompt gets the tokenizer's BOS (see the module doc)."""
    from .tasks import encode_text

    ids = encode_text(tokenizer, prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    stream = TextStream(tokenizer, stop)
    eos = getattr(tokenizer, "eos_id", None)
    for tok in generate_tokens(model, ids, max_new_tokens, params, eos):
        if tok == eos:
            break
        piece = stream.push(tok)
        if on_text and piece:
            on_text(piece)
        if stream.stopped is not None:
            return stream.text
    piece = stream.finish()
    if on_text and piece:
        on_text(piece)
    return stream.text


# ---------------------------------------------------------------------------------------------
# CLI: bitlm generate
# ---------------------------------------------------------------------------------------------


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default without --sample)")
    p.add_argument("--sample", action="store_true",
                   help=f"sample instead of greedy: temperature {SAMPLE_DEFAULTS.temperature:g}, top-k {SAMPLE_DEFAULTS.top_k}, "
                        f"top-p {SAMPLE_DEFAULTS.top_p:g} unless --temperature/--top-k/--top-p say otherwise")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_head_act_argument(p)


def add_head_act_argument(p) -> None:
    p.add_argument("--head-act", choices=["f32", "int8"], default="f32",
                   help="packed models with an int8 head: int8 quantises the head's input per token (W8A8, "
                        "like llama.cpp's q8_0 head) and reads the head at memory speed (int6 / int4 heads "
                        "always do)")
    add_kv_argument(p)


def add_kv_argument(p) -> None:
    p.add_argument("--kv", default=None, metavar="{f16,f32,int8}",
                   help="packed models: KV cache storage (default f16; int8 = one scale per token and head, "
                        "a quarter of f32). A runtime choice, not stored in the model file")


def apply_kv(model, args) -> None:
    """``--kv`` onto a loaded model (packed models only; None leaves the model's default)."""
    kv = getattr(args, "kv", None)
    if kv is None:
        return
    if kv not in ("f16", "f32", "int8"):
        raise ValueError(f"--kv {kv}: the KV cache type must be f16, f32 or int8")
    if not hasattr(model, "KV_TYPES"):
        raise ValueError(f"{args.model}: --kv {kv} needs a packed model file (bitlm pack); the torch path keeps "
                         "a float KV cache")
    model.kv = kv


def model_device(model) -> torch.device:
    """Where a model's parameters are (the CPU for packed models, which hold no torch parameters)."""
    params = getattr(model, "parameters", None)
    p = next(params(), None) if callable(params) else None
    return p.device if p is not None else torch.device("cpu")


def add_device_argument(p) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available; the default) | cpu | cuda | mps — the torch path; "
                        "packed models run on the CPU engine")
    add_engine_argument(p)


def add_engine_argument(p) -> None:
    p.add_argument("--engine", choices=["auto", "packed", "torch"], default="auto",
                   help="GGUF models: packed = pack the ternary weights in memory and run bitlm's CPU engine "
                        "(a 2B4T file: ~3 GB instead of the torch model's ~12 GB); torch = the float torch model; "
                        "auto (the default) = packed on the CPU when the file's projections are one-scale "
                        "ternary tensors, else torch (bitlm eval: auto = torch, whose numbers are the checkpoint's; "
                        "the engine's f16 KV cache moves a loss by ~1e-4)")


def _load(args, device, auto_packed: bool):
    """``bitlm.load(args.model)``, except that a GGUF runs on the packed engine where it can
    (``--engine``; ``auto_packed``: what ``auto`` means): ``engine.convert_gguf`` packs it tensor
    by tensor, never building the float model (the engine's forward is the torch model's integer
    twin, with its f16 KV cache)."""
    from .loading import detect_format, load

    engine = getattr(args, "engine", "auto") or "auto"
    if engine == "auto" and not auto_packed:
        engine = "torch"
    if engine not in ("auto", "packed", "torch"):
        raise ValueError(f"--engine {engine}: choose auto, packed or torch")
    is_gguf = detect_format(args.model) == "gguf"
    if engine == "packed" and not is_gguf:
        raise ValueError(f"--engine packed: {args.model} is not a GGUF file (packed .bitlm files always run on "
                         "the engine; `bitlm pack` makes one from a checkpoint)")
    if not is_gguf or engine == "torch" or (engine == "auto" and device.type != "cpu"):
        return load(args.model)
    if device.type != "cpu":
        raise ValueError(f"--engine packed runs on the CPU, not --device {device.type}")
    from .engine import convert_gguf
    from .io.gguf import GGUFFormatError

    head = "int8" if getattr(args, "head_act", "f32") == "int8" else "f32"
    try:
        return convert_gguf(args.model, head=head, progress=True)
    except (GGUFFormatError, ValueError) as e:  # weight groups, non-ternary or unpackable projections
        if engine == "packed":
            raise ValueError(f"--engine packed: {e}") from None
        reason = str(e)
    model = load(args.model)  # a damaged file fails here with its own error
    print(f"note: {args.model}: not packable in memory ({reason}); running the float torch model", file=sys.stderr)
    return model


def load_for_generation(args, auto_packed: bool = True):
    """The model named by --model, eval mode, on --device, with --head-act applied (packed models
    only); a GGUF on the packed engine per --engine (``auto_packed``: where ``auto`` picks it)."""
    from .parallel import resolve_device

    requested = getattr(args, "device", "auto") or "auto"
    device = resolve_device(requested)  # an unavailable device is an error before the model loads
    model = _load(args, device, auto_packed)
    model.eval()
    if hasattr(model, "HEAD_ACTS"):  # packed: the native CPU engine
        if requested not in ("auto", "cpu"):
            raise ValueError(f"--device {requested}: {args.model} is a packed model, which runs on the CPU engine "
                             "only; give a checkpoint for the torch path")
    else:
        model.to(device)
    if args.head_act != "f32":
        if not hasattr(model, "HEAD_ACTS"):
            raise ValueError(f"{args.model}: --head-act {args.head_act} needs a packed model file (bitlm pack)")
        try:
            model.head_act = args.head_act
        except ValueError as e:
            raise ValueError(f"{args.model}: {e}") from None
    apply_kv(model, args)
    return model


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, HF folder, GGUF or packed model file")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or HF folder (default: the model's own)")
    p.add_argument("--prompt", required=True)
    add_device_argument(p)
    add_sampling_arguments(p)
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end only")


def sampling_from_args(args) -> SamplingParams:
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    if getattr(args, "sample", False):
        d = SAMPLE_DEFAULTS
        params = SamplingParams(args.temperature or d.temperature, d.top_k if args.top_k is None else args.top_k,
                                d.top_p if args.top_p is None else args.top_p, args.repetition_penalty, args.seed)
    params.validate()
    if args.max_new_tokens < 1:  # generate and chat alike (chat's room for history is max_seq_len - this)
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return params


def run(args) -> int:
    import sys

    from .loading import load_tokenizer_for

    params = sampling_from_args(args)
    model = load_for_generation(args)
    tok = load_tokenizer_for(args.model, args.tokenizer)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def emit(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    text = generate(model, tok, args.prompt, args.max_new_tokens, params, args.stop, None if args.no_stream else emit)
    if args.no_stream:
        sys.stdout.write(text)
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI: bitlm chat — a multi-turn loop on stdin/stdout
# ---------------------------------------------------------------------------------------------

#: Prompt templates.  ``2b4t`` is the BitNet b1.58 2B4T chat format ("Role: content<|eot_id|>").
CHAT_TEMPLATES = {
    "plain": {"turn": "{role}: {content}\n", "assistant": "Assistant:", "stop": ["\nUser:", "\nSystem:"]},
    "2b4t": {"turn": "{role}: {content}<|eot_id|>", "assistant": "Assistant: ", "stop": ["<|eot_id|>"]},
}


def chat_prompt(messages: list[tuple[str, str]], template: str = "plain") -> str:
    t = CHAT_TEMPLATES[template]
    return "".join(t["turn"].format(role=r, content=c) for r, c in messages) + t["assistant"]


_SPECIAL = re.compile(r"(<\|[^|<>\s]+\|>)")


def chat_prompt_ids(tokenizer, messages: list[tuple[str, str]], template: str = "plain") -> list[int]:
    """``chat_prompt`` as model input: the template's own special tokens (``<|eot_id|>``) by id
    where the vocabulary has them, the text between them encoded as text, one BOS in front when
    the tokenizer adds one.  Without such tokens this is exactly the encoding of ``chat_prompt``."""
    from .tasks import adds_bos

    t = CHAT_TEMPLATES[template]
    backend = getattr(tokenizer, "backend", None)
    special = (lambda s: backend.token_to_id(s)) if backend is not None else (lambda s: None)
    runs: list[str | int] = [""]  # text runs and special ids, alternating
    for fmt, fields in [(t["turn"], {"role": r, "content": c}) for r, c in messages] + [(t["assistant"], {})]:
        for piece in _SPECIAL.split(fmt):
            sid = special(piece) if _SPECIAL.fullmatch(piece) else None
            if sid is None:
                runs[-1] += piece.format(**fields)  # user content only ever lands in a text run
            else:
                runs += [sid, ""]
    ids: list[int] = []
    for run in runs:
        ids += [run] if isinstance(run, int) else (list(tokenizer.encode(run)) if run else [])
    if adds_bos(tokenizer) and ids[:1] != [int(tokenizer.bos_id)]:  # a template's own BOS is the one
        ids.insert(0, int(tokenizer.bos_id))
    return ids


def add_chat_arguments(p) -> None:
    p.add_argument("--model", required=True, help="packed model file (fast engine), checkpoint, HF folder or GGUF")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--template", choices=sorted(CHAT_TEMPLATES), default="plain")
    add_engine_argument(p)
    add_sampling_arguments(p)


def run_chat(args) -> int:
    import sys

    from .loading import load_tokenizer_for

    params = sampling_from_args(args)
    model = load_for_generation(args)
    tok = load_tokenizer_for(args.model, args.tokenizer)
    t = CHAT_TEMPLATES[args.template]
    messages: list[tuple[str, str]] = [("System", args.system)] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        messages.append(("User", line))
        ids = chat_prompt_ids(tok, messages, args.template)
        room = model.config.max_seq_len - args.max_new_tokens
        while len(ids) > room and len(messages) > 1:  # drop the oldest turns that no longer fit
            messages.pop(0)
            ids = chat_prompt_ids(tok, messages, args.template)
        sys.stdout.write("bot> " if interactive else "")
        reply = generate(model, tok, ids, args.max_new_tokens, params, t["stop"] + (args.stop or []),
                         lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append(("Assistant", reply.strip()))
    return 0
