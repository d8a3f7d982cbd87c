"""Chat templates for the server: OpenAI ``messages`` → prompt token ids (+ stop strings).

In order of preference:

1. the tokenizer configuration's Jinja ``chat_template`` (a ``tokenizer_config.json`` in the
   model's folder or beside the model file), rendered as transformers renders it: a sandboxed
   Jinja environment with ``trim_blocks`` / ``lstrip_blocks``, ``messages``, ``bos_token``,
   ``eos_token``, ``add_generation_prompt=True``, ``raise_exception`` and ``strftime_now``;
2. ``--chat-template 2b4t`` / ``plain`` (``bitlm.generate.CHAT_TEMPLATES``); by default ``2b4t``
   when the vocabulary has ``<|eot_id|>`` (BitNet b1.58 2B4T: ``"Role: content<|eot_id|>"``), else
   ``plain`` (``"Role: content\\n"`` turns, then ``"Assistant:"``).

Special-token texts in a rendered template (``<|eot_id|>``, ``<|begin_of_text|>``) become their
ids where the vocabulary has them.  In the built-in templates message contents are always encoded
as text, so a user cannot forge a turn boundary; a Jinja template's output is one text, so there
(as in transformers) special-token text inside a message is read as the special token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..generate import _SPECIAL, CHAT_TEMPLATES, chat_prompt_ids

__all__ = ["ChatTemplate", "find_jinja_template"]


def find_jinja_template(model_path: str | Path) -> dict[str, str] | None:
    """The ``chat_template`` of a ``tokenizer_config.json`` stored with the model, with the
    ``bos_token`` / ``eos_token`` texts it names (what transformers passes the template), if any."""
    p = Path(model_path)
    for c in ([p / "tokenizer_config.json"] if p.is_dir() else [p.with_suffix(".tokenizer_config.json"),
                                                                 p.parent / "tokenizer_config.json"]):
        if c.is_file():
            try:
                cfg = json.loads(c.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"{c}: cannot read the chat template: {e}") from None
            t = cfg.get("chat_template")
            if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
                t = next((x.get("template") for x in t if x.get("name") == "default"), None)
            if not (isinstance(t, str) and t.strip()):
                return None
            out = {"template": t}
            for k in ("bos_token", "eos_token"):
                v = cfg.get(k)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    out[k] = v
            return out
    return None


class ChatTemplate:
    def __init__(self, tokenizer, template: str = "auto", jinja: dict[str, str] | None = None) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend", None)
        self._special = (lambda s: backend.token_to_id(s)) if backend is not None else (lambda s: None)
        if template == "auto":
            template = "jinja" if jinja else ("2b4t" if self._special("<|eot_id|>") is not None else "plain")
        if template == "jinja":
            if not jinja:
                raise ValueError("--chat-template jinja: the model has no tokenizer_config.json chat_template")
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg: str) -> None:
                raise ValueError(f"chat template: {msg}")

            def strftime_now(fmt: str) -> str:
                import datetime

                return datetime.datetime.now().strftime(fmt)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
            self._jinja = env.from_string(jinja["template"])
            self._bos = jinja.get("bos_token", getattr(tokenizer, "bos_token", ""))
            self._eos = jinja.get("eos_token", getattr(tokenizer, "eos_token", ""))
            eot = self._special("<|eot_id|>")
            self.stop: list[str] = ["<|eot_id|>"] if eot is not None else []
        elif template in CHAT_TEMPLATES:
            self._jinja = None
            self.stop = list(CHAT_TEMPLATES[template]["stop"])
        else:
            raise ValueError(f"--chat-template must be auto, jinja or one of {sorted(CHAT_TEMPLATES)}, got {template!r}")
        self.name = template

    def render_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if self._jinja is None:
            turns = [(str(m["role"]).capitalize(), m["content"]) for m in messages]
            return chat_prompt_ids(self.tokenizer, turns, self.name)
        tok = self.tokenizer
        text = self._jinja.render(messages=messages, add_generation_prompt=True, bos_token=self._bos,
                                  eos_token=self._eos)
        ids: list[int] = []
        for piece in _SPECIAL.split(text):
            sid = self._special(piece) if _SPECIAL.fullmatch(piece) else None
            if sid is not None:
                ids.append(sid)
            elif piece:
                ids += list(tok.encode(piece))
        return ids
