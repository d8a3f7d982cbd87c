"""Shared test helpers: one tiny-model builder and one stand-in for ``bitlm.data.TokenData``.

Imported as ``from helpers import ...`` (pytest puts tests/ on sys.path, as for _data_writers).
"""

from __future__ import annotations

import numpy as np
import torch

from bitlm.config import ModelConfig, preset
from bitlm.model import BitNetModel

VOCAB = 64  # vocabulary of the pattern data and of tiny_config()'s models


def tiny_config(name: str = "tiny", **overrides) -> ModelConfig:
    """The ``name`` preset at the pattern data's scale: vocab 64, 32-token context."""
    return preset(name, **{"vocab_size": VOCAB, "max_seq_len": 32, **overrides})


def tiny_model(name: str = "tiny", seed: int = 0, sharpen: float | None = None, sharpen_head: bool = True,
               **overrides) -> BitNetModel:
    """A random ``BitNetModel(preset(name, **overrides))`` in eval mode, seeded with ``seed``.

    ``sharpen`` multiplies the embedding (and an untied output head, with ``sharpen_head``) so that
    logits are well separated: greedy decoding then has no near-ties that rounding could flip."""
    torch.manual_seed(seed)
    m = BitNetModel(preset(name, **overrides)).eval()
    if sharpen is not None:
        with torch.no_grad():
            m.model.embed_tokens.weight.mul_(sharpen)
            if sharpen_head and not m.config.tie_embeddings:
                m.lm_head.weight.mul_(sharpen)
    return m


class ArrayData:
    """A minimal stand-in for ``bitlm.data.TokenData`` over a fixed token array."""

    def __init__(self, tokens, vocab_size: int) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.tokenizer = VocabOnly(vocab_size)

    def batch(self, step, batch_size, seq_len, seed=0, rank=0):
        g = np.random.default_rng([seed, step, rank])
        starts = g.integers(0, self.tokens.size - seq_len - 1, batch_size)
        x = np.stack([self.tokens[s : s + seq_len] for s in starts])
        y = np.stack([self.tokens[s + 1 : s + seq_len + 1] for s in starts])
        return torch.from_numpy(x), torch.from_numpy(y)

    def val_batches(self, batch_size, seq_len, max_batches=None):
        for i in range(max_batches or 4):
            yield self.batch(i, batch_size, seq_len, seed=12345)


class VocabOnly:
    """A tokenizer stand-in: a vocabulary size, and a ``save`` that writes nothing."""

    def __init__(self, n: int) -> None:
        self.vocab_size = n

    def save(self, path) -> None:
        pass


def pattern_data(vocab: int = VOCAB, n: int = 20000, stride: int = 1) -> ArrayData:
    """Token i is (i·stride) mod vocab, 10 % noise: a learnable sequence; stride ≠ 1 is a new task."""
    rng = np.random.default_rng(0)
    base = (np.arange(n) * stride) % vocab
    noise = rng.random(n) < 0.1
    base[noise] = rng.integers(0, vocab, noise.sum())
    return ArrayData(base, vocab)


def random_data(vocab: int = VOCAB, n: int = 20000, seed: int = 0) -> ArrayData:
    """Uniformly random tokens: for tests of the training loop's mechanics, not of learning."""
    return ArrayData(np.random.default_rng(seed).integers(0, vocab, n), vocab)


def bitlm_greedy(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens and the smallest top-1 / top-2 logit margin along the way (a runtime parity
    test is meaningful only when no step is a near-tie)."""
    out, margin = list(prompt), float("inf")
    with torch.no_grad():
        for _ in range(n):
            lg = model(torch.tensor([out]))[0, -1]
            top = lg.topk(2).values
            margin = min(margin, float(top[0] - top[1]))
            out.append(int(lg.argmax()))
    return out[len(prompt):], margin


def decode_greedy(pm, prompt: torch.Tensor, steps: int, fused: bool, kv: str | None = None, max_len: int = 64):
    """Greedy decode of a packed model one token at a time (the fused native step, or the per-op
    path) → (tokens, logits of every step (steps, V), the cache)."""
    pm.fused_decode = fused
    cache = pm.new_cache(1, max_len, kv=kv)
    logits = pm(prompt, cache=cache, last_only=True)
    toks, outs = [], []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt.item())
        logits = pm(nxt, cache=cache)
        outs.append(logits[0, -1])
    return toks, torch.stack(outs), cache


def dist_env(src) -> dict[str, str]:
    """The environment of a torchrun / worker subprocess: ``src`` on PYTHONPATH, one OpenMP thread,
    and no RANK / WORLD_SIZE inherited from an enclosing launcher."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def rand_weight(fmt: str, n: int, k: int, seed: int, groups: int = 1):
    """A packed weight of ``fmt`` with uniformly random codes of its alphabet and ``groups``
    random scales (the kernel tests' operand)."""
    from bitlm import packing as P

    gen = torch.Generator().manual_seed(seed)
    alpha = torch.tensor(P.get_format(fmt).alphabet, dtype=torch.int8)
    t = alpha[torch.randint(len(alpha), (n, k), generator=gen)]
    scale = torch.rand(groups, generator=gen) + 0.05
    return P.pack_weight(t, scale, fmt, groups)


def rand_x(m: int, k: int, seed: int) -> torch.Tensor:
    """Random int8 activation codes (M, K) over the whole int8 range."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
