"""``bitlm chat``: multi-turn generation on the packed engine (or any loadable model)."""

from .generate import add_chat_arguments as add_arguments
from .generate import run_chat as run

__all__ = ["add_arguments", "run"]
