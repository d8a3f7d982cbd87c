"""Run by tests/test_parallel.py under torchrun (and alone): train the tiny preset on the pattern
data with the TrainConfig fields given as JSON in argv[1]; model overrides as JSON in argv[2].

Extra keys: ``resume``; ``stop_after: N`` — rank 0 alone gets SIGINT during step N (the run stops
after step N, agreed by all ranks); ``kill_rank1_at: N`` — rank 1 SIGKILLs itself in step N."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bitlm.train as T  # noqa: E402
from helpers import pattern_data, tiny_config  # noqa: E402


def main() -> None:
    tkw = json.loads(sys.argv[1])
    mkw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    resume = bool(tkw.pop("resume", False))
    stop_after = tkw.pop("stop_after", None)
    kill_at = tkw.pop("kill_rank1_at", None)
    rank = int(os.environ.get("RANK", "0"))
    tcfg = T.TrainConfig(**tkw)
    ga = tcfg.grad_accum
    orig, calls = T.lm_loss, {"n": 0}

    def hooked(*a, **k):
        calls["n"] += 1
        step = (calls["n"] - 1) // ga + 1  # 1-based step of this call
        if stop_after is not None and rank == 0 and calls["n"] == (stop_after - 1) * ga + 1:
            os.kill(os.getpid(), signal.SIGINT)
        if kill_at is not None and rank == 1 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*a, **k)

    T.lm_loss = hooked
    try:
        T.train(tiny_config(**mkw), tcfg, pattern_data(), resume=resume, log=lambda *a: None)
    except T.TrainingInterrupted:
        pass


if __name__ == "__main__":
    main()
