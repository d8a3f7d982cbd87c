"""Test-wide settings.

Tiny models are fastest with one torch thread, and on a shared 2-core machine two threads per
test process can be an order of magnitude slower (thread oversubscription); the native kernels
have their own pool, which the kernel tests set explicitly.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see bitlm.cli.main

import torch  # noqa: E402

torch.set_num_threads(1)
