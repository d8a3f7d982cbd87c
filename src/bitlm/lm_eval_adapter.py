"""lm-evaluation-harness adapter: a ``bitlm`` model type for ``lm_eval`` (lm-eval >= 0.4).

The adapter scores with the same ``bitlm.tasks.loglikelihood`` and ``encode_pair`` as
``bitlm.tasks.evaluate_tasks``, so bitlm's own numbers and lm-eval's differ only where the harness
itself differs (prompt templates, dataset versions), and the tests check that they agree item for
item.

lm-eval finds model types through its registry, and its CLI does not load third-party plugins, so
the registration has to run before the harness looks the model up.  Either of these works:

    # from Python: importing this module registers "bitlm"
    import lm_eval, bitlm.lm_eval_adapter
    lm_eval.simple_evaluate(model="bitlm", model_args="path=runs/ckpt", tasks=["hellaswag"])
    lm_eval.simple_evaluate(model=bitlm.lm_eval_adapter.BitLMEval(model=m, tokenizer=tok), tasks=[...])

    # from the shell: this module's main() registers, then runs lm-eval's own CLI
    python -m bitlm.lm_eval_adapter run --model bitlm --model_args path=runs/ckpt --tasks hellaswag \
        --batch_size 16

``model_args``:

* ``path``: anything ``bitlm.load`` reads: a checkpoint folder, HF folder, GGUF file or packed
  ``.bitlm`` file (the packed engine runs on the CPU).
* ``tokenizer``: a tokenizer.json; by default the one stored with the model.
* ``device``: lm-eval's CLI asks for "cuda" by default; without CUDA the CPU is used.
* ``batch_size``: give it as lm-eval's own ``--batch_size``, which defaults to 1.  Putting it in
  ``model_args`` as well is an error in lm-eval.
* ``max_length``: defaults to the model's ``max_seq_len``.

Passing an in-memory ``model=`` / ``tokenizer=`` is for tests and notebooks.

BOS as HFLM with its default ``add_bos_token=None``: ``tok_encode`` follows the tokenizer (one
leading BOS for Llama-3 / 2B4T tokenizers, none for bitlm's), and ``prefix_token_id`` (the
context of an empty-context request and of the first rolling window) is the BOS for tokenizers
that add one, else EOS.  One difference: HFLM's rolling log-likelihood encodes the document *with*
its BOS and then prefixes another, so it scores the BOS token itself; here the document is
encoded without it, so the prefix BOS is the only one and exactly the document's tokens are scored.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from .tasks import adds_bos, loglikelihood, model_device

__all__ = ["BitLMEval", "main"]


class BitLMEval(TemplateLM):
    """lm-eval ``LM`` over a bitlm model: loglikelihood, rolling loglikelihood, greedy generation."""

    def __init__(
        self,
        path: str | None = None,
        tokenizer: Any = None,
        model: torch.nn.Module | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        **_: Any,  # lm-eval also passes max_batch_size etc.
    ) -> None:
        super().__init__()
        if model is None:
            if path is None:
                raise ValueError("bitlm: give model_args path=<checkpoint> (or pass model= in Python)")
            from .loading import load, load_tokenizer_for

            model = load(path)
            tokenizer = load_tokenizer_for(path, tokenizer)
        elif tokenizer is None or isinstance(tokenizer, str):
            if isinstance(tokenizer, str):
                from .data import load_tokenizer

                tokenizer = load_tokenizer(tokenizer)
            else:
                raise ValueError("bitlm: an in-memory model needs tokenizer= as well")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                             f"({model.config.vocab_size})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for "cuda" by default; like its HFLM, stay on the CPU when there is none
            warnings.warn(f"bitlm: device {device!r} requested but CUDA is not available; using the CPU",
                          stacklevel=2)
            device = None
        if device is not None:
            if hasattr(self.model, "to"):
                self.model.to(device)
            elif torch.device(device).type != "cpu":
                warnings.warn(f"bitlm: the packed engine runs on the CPU; device {device!r} is ignored",
                              stacklevel=2)
        self._device = model_device(self.model)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" → default
        self._max_length = int(max_length) if max_length else int(model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM needs -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tokenizer.bos_id) if adds_bos(self.tokenizer) else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # None (lm-eval's default) = the tokenizer's own configuration, as HFLM does
        if add_special_tokens is False or not adds_bos(self.tokenizer):
            return list(self.tokenizer.encode(string))
        return list(self.tokenizer.encode(string, add_special_tokens=True))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # requests: [((context, continuation), context_ids, continuation_ids)], already encoded by
        # TemplateLM.loglikelihood with the same rules as bitlm.tasks.encode_pair.
        return loglikelihood(self.model, [(c, k) for _, c, k in requests], batch_size=self.batch_size,
                             max_length=self.max_length, device=self._device, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of ``max_length`` (lm-eval's scheme)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = loglikelihood(self.model, windows, batch_size=self.batch_size, max_length=self.max_length,
                                   device=self._device)
            out.append(sum(ll for ll, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (lm-eval's default ``do_sample=False``) until a stop string or EOS."""
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :] or [self.eot_token_id]
            cache = self.model.new_cache(1, min(self.max_length, len(ids) + max_new))
            logits = self.model(torch.tensor([ids], device=self._device), cache=cache)
            gen: list[int] = []
            text = ""
            while len(gen) < max_new:
                nxt = int(logits[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                gen.append(nxt)
                text = self.tok_decode(gen)
                if any(s in text for s in until) or len(gen) == max_new or cache.pos >= cache.max_len:
                    break
                logits = self.model(torch.tensor([[nxt]], device=self._device), cache=cache)
            for s in until:  # lm-eval cuts the generation at the first stop string
                text = text.split(s)[0]
            out.append(text)
        return out


# Registered by hand rather than with @register_model so that running this file as __main__ and
# importing it as bitlm.lm_eval_adapter do not collide in lm-eval's registry.
if "bitlm" not in model_registry:
    model_registry.register("bitlm")(BitLMEval)


def main(argv: list[str] | None = None) -> None:
    """``python -m bitlm.lm_eval_adapter ...``: lm-eval's CLI with the ``bitlm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
