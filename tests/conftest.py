"""Test-wide settings, and the rule that makes CI go red without the native kernels.

Tiny models are fastest with one torch thread, and on a shared 2-core machine two threads per
test process can be an order of magnitude slower (thread oversubscription); the native kernels
have their own pool, which the kernel tests set explicitly.

On x86-64 Linux the native kernel library must build and load (setup.py fails the install
otherwise): if it is missing, stale or fails to load, the whole session stops with the reason
instead of skipping every native test and passing on the pure-torch path.  On a platform
without a C compiler, ``BITLM_ALLOW_NO_NATIVE=1`` lets the suite run without the library (the
native-only tests are then skipped, each saying why).  ``BITLM_BACKEND=native`` requires the
library on every platform, whatever ``BITLM_ALLOW_NO_NATIVE`` says.
"""

import os
import platform
import sys

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import pytest
import torch

torch.set_num_threads(1)

ALLOW_NO_NATIVE = "BITLM_ALLOW_NO_NATIVE"


def native_required(environ=os.environ, sys_platform: str = sys.platform, machine: str | None = None) -> bool:
    """Must the native library load for this test run?  (Same platform rule as setup.py.)"""
    if environ.get("BITLM_BACKEND", "").strip().lower() == "native":
        return True
    machine = (platform.machine() if machine is None else machine).lower()
    if not (sys_platform.startswith("linux") and machine in ("x86_64", "amd64")):
        return False
    return environ.get(ALLOW_NO_NATIVE, "").strip().lower() in ("", "0", "false", "no")


def native_problem() -> str | None:
    """None when the native library is required and loads (or is not required), else the message
    the session stops with."""
    if not native_required():
        return None
    from bitlm.kernels import native

    if native.load() is not None:
        return None
    return (f"bitlm: the native kernel library is required on this platform but unavailable: {native.reason()}. "
            f"Rebuild it (pip install -e . with a C compiler, or `make install`), or set {ALLOW_NO_NATIVE}=1 "
            "to run the suite on the pure-torch reference kernels (native-only tests are then skipped).")


def pytest_sessionstart(session):
    problem = native_problem()
    if problem is not None:
        pytest.exit(problem, returncode=pytest.ExitCode.TESTS_FAILED)


def _native_tiers() -> list[str]:
    from bitlm.kernels import native

    return native.supported_tiers() if native.load() is not None else ["unavailable"]


@pytest.fixture(params=_native_tiers())
def tier(request):
    """Each native kernel tier this CPU supports, made the active one for the test (and restored
    after).  Without the library (only where it is allowed to be missing) the test is skipped —
    or fails under BITLM_BACKEND=native."""
    from bitlm.kernels import native

    if request.param == "unavailable":
        if os.environ.get("BITLM_BACKEND", "").lower() == "native":
            pytest.fail(f"BITLM_BACKEND=native but the library is unavailable: {native.reason()}")
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    prev = native.tier()
    native.set_tier(request.param)
    yield request.param
    native.set_tier(prev)
