"""Test-wide settings.

Tiny models are fastest with one torch thread, and on a shared 2-core machine two threads per
test process can be an order of magnitude slower (thread oversubscription); the native kernels
have their own pool, which the kernel tests set explicitly.
"""

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import torch

torch.set_num_threads(1)
