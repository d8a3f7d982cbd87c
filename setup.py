"""Build hook: compile csrc/ into the shared library ``bitlm/_bitlm_kernels*.so``.

The library is torch-free C loaded with ctypes (``bitlm.kernels.native``); it is declared as a
setuptools ``Extension`` only so that wheels are tagged as platform wheels and editable installs
place the file next to the package.  A custom ``build_ext`` compiles each source file with its
own flags — per-ISA flags go on one file only (``x86_avx2.c`` gets ``-mavx2 -mfma``,
``x86_avx512.c`` the AVX-512 set, ``x86_amx.c`` that set plus ``-mamx-tile -mamx-int8``), never on the
whole library, so that the dispatcher and the
generic code run on any CPU.

On x86-64 Linux, the platform the kernels are written and tested for, a failed build of the
library FAILS the install, so that a broken compiler set-up cannot pass CI on the slow pure-torch
path.  Set ``BITLM_ALLOW_NO_NATIVE=1`` to install without the kernels anyway (the error becomes a
warning, bitlm runs on its pure-torch reference kernels and ``bitlm.kernels.backend_info()`` says
why; the test suite honours the same variable).  On other platforms a failed build is always
only a warning.  ``BITLM_NO_NATIVE=1`` skips the build altogether.

A tier whose file fails to compile (e.g. an old compiler without AVX-512 VNNI) is dropped and
the library is built without it: the generic and lower tiers still give the same numbers.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
# Where the native library must build (see the module docstring); the same rule as tests/conftest.py.
NATIVE_REQUIRED = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
ALLOW_NO_NATIVE = "BITLM_ALLOW_NO_NATIVE"


def _allow_no_native() -> bool:
    return os.environ.get(ALLOW_NO_NATIVE, "").strip().lower() not in ("", "0", "false", "no")

# -ffp-contract=off: the dequant epilogue and the RMSNorm must round exactly like torch's
# separate multiply and add; GCC would otherwise fuse a*b+c into an FMA in the tier files.
COMMON_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-strict-aliasing",
                "-Werror=implicit-function-declaration"]
TIER_FILES = {
    # file: (flags, macro defined for dispatch.c when the file compiled)
    "x86_avx2.c": (["-mavx2", "-mfma"], "BITLM_HAVE_AVX2"),
    "x86_avx512.c": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma"], "BITLM_HAVE_AVX512"),
    # the AMX int8 GEMM (M >= 2): needs the AVX-512 tier (its unpack and epilogue), so it is
    # tried only when x86_avx512.c compiled; a compiler without -mamx-* leaves it out
    "x86_amx.c": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mamx-tile",
                   "-mamx-int8"], "BITLM_HAVE_AMX"),
}
# a tier file that needs another one to have compiled first
TIER_NEEDS = {"x86_amx.c": "BITLM_HAVE_AVX512"}
BASE_FILES = ["generic.c", "threadpool.c", "decode.c", "hf_layer.c", "hadamard.c", "head_lowbit.c", "kv.c", "qat.c", "pick.c"]
# extra flags of one base file: qat.c's clamps vectorise only without FP-trap semantics (no result changes)
BASE_FLAGS = {"qat.c": ["-fno-trapping-math"]}


class BuildKernels(build_ext):
    """Compile csrc/*.c file by file with per-file flags; a failure is fatal on x86-64 Linux unless
    BITLM_ALLOW_NO_NATIVE is set, a warning elsewhere."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "bitlm._bitlm_kernels":
            return super().build_extension(ext)
        try:
            self._build_kernels(ext)
        except Exception as e:  # noqa: BLE001 - any compiler/linker problem: decided below
            stale = self.get_ext_fullpath(ext.name)
            if os.path.exists(stale):  # an older build must not ship as if it were this one
                os.remove(stale)
            if NATIVE_REQUIRED and not _allow_no_native():
                raise RuntimeError(
                    f"bitlm: building the native kernels failed ({type(e).__name__}: {e}). On x86-64 Linux "
                    f"they are required; install a C compiler (gcc) or set {ALLOW_NO_NATIVE}=1 to install "
                    "without them (bitlm then runs its slow pure-torch reference kernels)"
                ) from e
            msg = (
                f"bitlm: building the native kernels failed ({type(e).__name__}: {e}); "
                "installing without them - bitlm will use its pure-torch reference kernels"
            )
            print(f"WARNING: {msg}", file=sys.stderr)
            self.warn(msg)

    def _compile(self, src: str, extra: list[str], macros: list[tuple[str, str | None]]) -> list[str]:
        return self.compiler.compile(
            [os.path.join(CSRC, src)],
            output_dir=self.build_temp,
            macros=macros,
            include_dirs=[CSRC],
            extra_postargs=COMMON_FLAGS + extra,
            debug=self.debug,
        )

    def _build_kernels(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            raise RuntimeError("the kernels are written for GCC/Clang (pthreads, GNU intrinsics)")
        objects: list[str] = []
        have: list[tuple[str, str | None]] = []
        if IS_X86:
            # Tiers first: each one that compiles adds its macro so that dispatch.c includes it.
            for src, (flags, macro) in TIER_FILES.items():
                if src in TIER_NEEDS and (TIER_NEEDS[src], "1") not in have:
                    print(f"WARNING: bitlm: {src} left out ({TIER_NEEDS[src]} is not built)", file=sys.stderr)
                    continue
                try:
                    objects += self._compile(src, flags, [(macro, "1")])
                    have.append((macro, "1"))
                except Exception as e:  # noqa: BLE001
                    print(f"WARNING: bitlm: {src} did not compile ({e}); that tier is left out", file=sys.stderr)
        for src in BASE_FILES:
            objects += self._compile(src, BASE_FLAGS.get(src, []), have)
        objects += self._compile("dispatch.c", [], have)
        ext_path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(ext_path), exist_ok=True)
        self.compiler.link_shared_object(
            objects,
            ext_path,
            libraries=["pthread", "m"],
            extra_postargs=["-Wl,--as-needed"] if sys.platform.startswith("linux") else [],
            target_lang="c",
        )

    def get_export_symbols(self, ext: Extension) -> list[str]:
        # A ctypes library, not a Python module: there is no PyInit_ symbol to export.
        return []


def _ext_modules() -> list[Extension]:
    if os.environ.get("BITLM_NO_NATIVE"):
        return []
    # sources are listed for sdists / change detection; BuildKernels compiles them itself
    sources = [os.path.join(CSRC, f) for f in ["dispatch.c", *BASE_FILES, *TIER_FILES]]
    headers = [os.path.join(CSRC, h) for h in ("bitlm_kernels.h", "internal.h", "attn_impl.h", "hadamard_impl.h",
                                                  "linears_impl.h", "x86_avx512_ops.h")]
    # optional=True: when a failed build is allowed (see BuildKernels), an in-place/editable build
    # must not then fail copying the library that was never built
    return [Extension("bitlm._bitlm_kernels", sources=sources, depends=headers, optional=True)]


if sysconfig.get_config_var("CC") is None and not os.environ.get("CC"):
    print("WARNING: bitlm: no C compiler configured; the native kernels may not build", file=sys.stderr)

setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildKernels})
