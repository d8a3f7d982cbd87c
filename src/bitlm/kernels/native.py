"""ctypes binding of the native kernel library ``bitlm/_bitlm_kernels*.so`` (built from csrc/).

Nothing is loaded at import: :func:`load` runs on the first kernel call, remembers the library
or the reason it could not be used (missing file, wrong ABI, load error), and never retries.
Function pointers and their argtypes are set once, so a call costs a few microseconds of
Python; tensors are passed zero-copy as ``data_ptr()`` of contiguous CPU tensors, outputs are
allocated here with torch.  The library releases the GIL (ctypes ``CDLL``).

``BITLM_KERNELS_LIB=/path/to/lib.so`` loads another build (tests use a missing path to check
the fallback).  Backend choice (``BITLM_BACKEND``) lives in ``bitlm.kernels``.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import threading
from pathlib import Path

import torch

from ..packing import PackedWeight

__all__ = ["load", "reason", "library_path", "reset", "gemm", "matmul", "quantize_rows",
           "ABI_VERSION", "TIERS", "tier", "set_tier", "num_threads", "set_num_threads", "info",
           "mem_read", "mem_copy", "decode_profile", "dense_int8_matmul", "dense_bf16_matmul", "dense_int8a8_matmul",
           "dense_lowbit_matmul", "linear_bf16", "rms_norm",
           "Decoder", "ACTIVATIONS", "KV_TYPES", "kv_quantize", "glu_relu2", "rope_rows_", "argmax", "HfLayer", "HfStack",
           "BatchAttention", "set_attn_split", "attn_split"]

#: The ABI this binding was written for (BITLM_ABI_VERSION in csrc/bitlm_kernels.h).
ABI_VERSION = 14
TIERS = ("generic", "avx2", "avx512")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason: str | None = "not loaded yet"
_path: str | None = None

_c_int, _c_i64, _c_p, _c_d = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_SIGNATURES = {
    "bitlm_abi_version": (_c_int, []),
    "bitlm_tier": (_c_int, []),
    "bitlm_best_tier": (_c_int, []),
    "bitlm_tier_supported": (_c_int, [_c_int]),
    "bitlm_set_tier": (_c_int, [_c_int]),
    "bitlm_tier_name": (ctypes.c_char_p, [_c_int]),
    "bitlm_tier_note": (ctypes.c_char_p, []),
    "bitlm_cpu_flags": (ctypes.c_char_p, []),
    "bitlm_build_info": (ctypes.c_char_p, []),
    "bitlm_num_threads": (_c_int, []),
    "bitlm_set_num_threads": (_c_int, [_c_int]),
    "bitlm_format_block_k": (_c_int, [_c_int]),
    "bitlm_packed_bytes": (_c_i64, [_c_int, _c_i64, _c_i64]),
    "bitlm_gemm": (_c_int, [_c_int, _c_p, _c_i64, _c_i64, _c_p, _c_i64, _c_p]),
    "bitlm_matmul_f32": (_c_int, [_c_int, _c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_quantize_rows": (_c_int, [_c_p, _c_i64, _c_i64, _c_p, _c_d, _c_int, _c_p, _c_p]),
    "bitlm_dense_i8": (_c_int, [_c_p, _c_i64, _c_i64, _c_p, _c_p, _c_i64, _c_p]),
    "bitlm_dense_bf16": (_c_int, [_c_p, _c_i64, _c_i64, _c_p, _c_i64, _c_p]),
    "bitlm_dense_i8a8": (_c_int, [_c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p, _c_i64, _c_p]),
    "bitlm_decode_step": (_c_int, [_c_p, _c_p, _c_i64, _c_p, _c_p]),
    "bitlm_decode_token": (_c_int, [_c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_argmax_f32": (_c_i64, [_c_p, _c_i64]),
    "bitlm_decode_token_greedy": (_c_i64, [_c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_decode_rows": (_c_int, [_c_p, _c_i64, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p]),
    "bitlm_hadamard_f32": (_c_int, [_c_p, _c_i64, _c_i64, _c_p]),
    "bitlm_head_bytes": (_c_i64, [_c_int, _c_i64, _c_i64]),
    "bitlm_kv_quantize": (_c_int, [_c_int, _c_p, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_set_attn_split": (_c_i64, [_c_i64]),
    "bitlm_attn_batch": (_c_int, [_c_i64] * 5 + [_c_p] * 12),
    "bitlm_glu_relu2": (_c_int, [_c_p, _c_i64, _c_i64, _c_p]),
    "bitlm_rope_rows": (_c_int, [_c_p, _c_i64, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_dense_lowbit": (_c_int, [_c_int, _c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p, _c_i64, _c_p]),
    "bitlm_decode_profile": (_c_int, [_c_int, _c_p, _c_int]),
    "bitlm_decode_profile_names": (ctypes.c_char_p, []),
    "bitlm_kernel_config": (ctypes.c_char_p, []),
    "bitlm_mem_read": (ctypes.c_uint64, [_c_p, ctypes.c_size_t]),
    "bitlm_mem_copy": (None, [_c_p, _c_p, ctypes.c_size_t]),
    "bitlm_linear_bf16": (_c_int, [_c_int, _c_p, _c_i64, _c_i64, _c_p, _c_p, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_rms_norm_rows": (_c_int, [_c_int, _c_p, _c_i64, _c_i64, _c_p, _c_d, _c_p]),
    "bitlm_qat_rows_to_f32": (_c_int, [_c_p, _c_p, _c_i64, _c_i64, _c_i64, _c_int, _c_p]),
    "bitlm_qat_ternary": (_c_int, [_c_p, _c_i64, _c_p, _c_p]),
    "bitlm_qat_binary": (_c_int, [_c_p, _c_i64, _c_p, _c_p]),
    "bitlm_qat_quantize_tensor": (_c_int, [_c_p, _c_i64, _c_i64, _c_p, _c_p]),
    "bitlm_hf_layer_qkv": (_c_int, [_c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p]),
    "bitlm_hf_layer_out": (_c_int, [_c_p, _c_p, _c_p, _c_p]),
    "bitlm_hf_decode_layers": (_c_int, [_c_p, _c_i64, _c_p, _c_p, _c_p, _c_p, _c_p, _c_p, _c_i64, ctypes.c_float, _c_p]),
}
_ERRORS = {-1: "invalid argument", -2: "out of memory", -3: "tier not supported"}


def _default_path() -> Path | None:
    pkg = Path(__file__).resolve().parent.parent  # .../bitlm
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = pkg / f"_bitlm_kernels{suffix}"
        if p.exists():
            return p
    found = sorted(pkg.glob("_bitlm_kernels*.so")) + sorted(pkg.glob("_bitlm_kernels*.pyd"))
    return found[0] if found else None


def library_path() -> str | None:
    """Path of the loaded (or to-be-loaded) library, if any."""
    if _path is not None:
        return _path
    env = os.environ.get("BITLM_KERNELS_LIB")
    if env:
        return env
    p = _default_path()
    return str(p) if p else None


def load() -> ctypes.CDLL | None:
    """The library, or None (then :func:`reason` says why).  Tried once per process."""
    global _lib, _tried, _reason, _path
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        path = library_path()
        try:
            if path is None:
                raise FileNotFoundError("the native library was not built (no bitlm/_bitlm_kernels*.so; "
                                        "reinstall with a C compiler: pip install -e .)")
            if not os.path.exists(path):
                raise FileNotFoundError(f"native library not found at {path}")
            lib = ctypes.CDLL(path)
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype = res
                fn.argtypes = args
            abi = lib.bitlm_abi_version()
            if abi != ABI_VERSION:
                raise RuntimeError(f"native library ABI {abi} != {ABI_VERSION} expected (stale build; reinstall)")
            _lib, _reason, _path = lib, None, path
        except Exception as e:  # noqa: BLE001 - every failure becomes a recorded reason
            _lib, _reason = None, f"{type(e).__name__}: {e}"
        _tried = True
        return _lib


def reason() -> str | None:
    """Why the library is not in use (None when it is)."""
    return _reason


def reset() -> None:
    """Forget the load attempt (tests); the next call tries again (an already dlopen'ed library
    stays mapped — ctypes cannot safely unload it)."""
    global _lib, _tried, _reason, _path
    with _lock:
        _lib, _tried, _reason, _path = None, False, "not loaded yet", None


def _need() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"bitlm native kernels unavailable: {_reason}")
    return lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise RuntimeError(f"{what} failed: {_ERRORS.get(rc, rc)}")


# ---- dispatch / threads -----------------------------------------------------------------------


def tier() -> str:
    return TIERS[_need().bitlm_tier()]


def set_tier(name: str) -> None:
    """Force a kernel tier ("generic", "avx2", "avx512"); raises if this CPU/build lacks it."""
    if name not in TIERS:
        raise ValueError(f"unknown tier {name!r}; choose from {TIERS}")
    if _need().bitlm_set_tier(TIERS.index(name)) != 0:
        raise RuntimeError(f"kernel tier {name!r} is not supported on this CPU / build")


def supported_tiers() -> list[str]:
    lib = _need()
    return [t for i, t in enumerate(TIERS) if lib.bitlm_tier_supported(i)]


def num_threads() -> int:
    return _need().bitlm_num_threads()


def set_num_threads(n: int) -> int:
    """Set the kernel thread pool size; returns the previous value."""
    rc = _need().bitlm_set_num_threads(int(n))
    if rc < 0:
        raise ValueError(f"thread count must be in 1..256, got {n}")
    return rc


def set_attn_split(positions: int) -> int:
    """From how many cached positions the fused decode step splits an f16 / int8 cache's attention
    by kv head and position range across the threads (the same bits; 0: never); returns the
    previous value.  The first value comes from ``BITLM_ATTN_SPLIT``, else 256."""
    if int(positions) < 0:
        raise ValueError(f"attention split point must be >= 0 positions, got {positions}")
    return int(_need().bitlm_set_attn_split(int(positions)))


def attn_split() -> int:
    """The fused decode step's current attention split point (see set_attn_split)."""
    return int(_need().bitlm_set_attn_split(-1))


def info() -> dict:
    lib = _need()
    return {
        "tier": TIERS[lib.bitlm_tier()],
        "tier_note": lib.bitlm_tier_note().decode(),
        "best_tier": TIERS[lib.bitlm_best_tier()],
        "supported_tiers": supported_tiers(),
        "threads": lib.bitlm_num_threads(),
        "cpu_flags": lib.bitlm_cpu_flags().decode(),
        "build": lib.bitlm_build_info().decode(),
        "kernel_config": lib.bitlm_kernel_config().decode(),
        "attn_split": attn_split(),
        "abi": lib.bitlm_abi_version(),
        "library": _path,
    }


# ---- ops --------------------------------------------------------------------------------------


# Each op checks what C will read — a wrong size would read out of bounds — but a decode step
# makes hundreds of calls of ~20-100 us, so the checks are kept to attribute tests (~0.1 us)
# and a packed weight is fully validated once per (data, scale) tensor pair.


def _fmt_id(w: PackedWeight) -> int:
    """The C format id of w, after checking its bytes match (N, K, format) exactly."""
    d, s = w.data, w.scale
    if w.__dict__.get("_native_checked") == (id(d), id(s)):
        return w.fmt.native_id
    fmt = w.fmt
    if fmt.native_id is None:
        raise ValueError(f"format {w.format!r} has no native kernel; convert it with w.to_format('i2')")
    if d.dtype != torch.uint8 or not d.is_contiguous() or not d.is_cpu or tuple(d.shape) != fmt.packed_shape(w.N, w.K):
        raise ValueError(f"{w.format}: packed data must be a contiguous CPU uint8 tensor of shape "
                         f"{fmt.packed_shape(w.N, w.K)}, got {d.dtype} {tuple(d.shape)}")
    if s.dtype != torch.float32 or s.numel() != w.groups or not s.is_contiguous() or w.N % w.groups:
        raise ValueError("scale must be a contiguous float32 tensor with `groups` values dividing N")
    w.__dict__["_native_checked"] = (id(d), id(s))  # (the tensors stay alive: w holds them)
    return fmt.native_id


def _xq(xq: torch.Tensor, k: int) -> torch.Tensor:
    if xq.dtype != torch.int8 or xq.dim() != 2 or not xq.is_cpu:
        raise TypeError(f"xq must be an int8 (M, K) CPU tensor, got {xq.dtype} of shape {tuple(xq.shape)}")
    if xq.shape[1] != k:
        raise ValueError(f"xq has K={xq.shape[1]} but the weight has K={k}")
    return xq if xq.is_contiguous() else xq.contiguous()


def _f32_vec(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """t as a contiguous float32 CPU vector of n values (no copy when it already is one)."""
    if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous() or not t.is_cpu:
        t = t.to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    if t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} values, expected {n}")
    return t


def gemm(xq: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """int8 (M, K) × packed (N, K)ᵀ → int32 (M, N)."""
    lib = _lib or _need()
    fid = _fmt_id(w)
    xq = _xq(xq, w.K)
    m = xq.shape[0]
    y = torch.empty((m, w.N), dtype=torch.int32)
    _check(lib.bitlm_gemm(fid, xq.data_ptr(), m, w.K, w.data.data_ptr(), w.N, y.data_ptr()), "bitlm_gemm")
    return y


def matmul(xq: torch.Tensor, a: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (M, N) = float32(xq · Tᵀ) · (s_g / a_m) (+ bias), the documented epilogue."""
    lib = _lib or _need()
    fid = _fmt_id(w)
    xq = _xq(xq, w.K)
    m = xq.shape[0]
    a = _f32_vec(a if a.dim() == 1 else a.reshape(-1), m, "a")
    bp = None if bias is None else _f32_vec(bias, w.N, "bias").data_ptr()
    y = torch.empty((m, w.N), dtype=torch.float32)
    rc = lib.bitlm_matmul_f32(fid, xq.data_ptr(), a.data_ptr(), m, w.K, w.data.data_ptr(), w.scale.data_ptr(),
                              w.groups, w.N, bp, y.data_ptr())
    _check(rc, "bitlm_matmul_f32")
    return y


def quantize_rows(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    rmsnorm: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of :func:`bitlm.kernels.reference.quantize_rows` (bit-identical)."""
    lib = _lib or _need()
    if rmsnorm is None:
        rmsnorm = norm_weight is not None
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"quantize_rows expects a float32 CPU tensor, got {x.dtype} on {x.device}")
    k = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    wp = None if norm_weight is None else _f32_vec(norm_weight, k, "norm_weight").data_ptr()
    q = torch.empty((m, k), dtype=torch.int8)
    a = torch.empty((m,), dtype=torch.float32)
    if m and k:
        rc = lib.bitlm_quantize_rows(x2.data_ptr(), m, k, wp, float(eps), 1 if rmsnorm else 0, q.data_ptr(),
                                     a.data_ptr())
        _check(rc, "bitlm_quantize_rows")
    if x.dim() == 2:
        return q, a
    return q.reshape(x.shape), a.reshape(x.shape[:-1])


def linear_bf16(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.linear_bf16` (bit-identical): bfloat16
    (..., K) → bfloat16 (..., N) in one call (quantise, packed matmul, round to bf16)."""
    lib = _lib or _need()
    fid = _fmt_id(w)
    if x.dtype != torch.bfloat16 or x.dim() < 1 or not x.is_cpu:
        raise TypeError(f"linear_bf16 expects a bfloat16 (..., K) CPU tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if x.shape[-1] != w.K:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={w.K}")
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // w.K
    bp = None if bias is None else _f32_vec(bias, w.N, "bias").data_ptr()
    y = torch.empty((*x.shape[:-1], w.N), dtype=torch.bfloat16)
    if m:
        rc = lib.bitlm_linear_bf16(fid, x.data_ptr(), m, w.K, w.data.data_ptr(), w.scale.data_ptr(), w.groups, w.N,
                                   bp, y.data_ptr())
        _check(rc, "bitlm_linear_bf16")
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.rms_norm` (bit-identical)."""
    lib = _lib or _need()
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() < 1 or not x.is_cpu:
        raise TypeError(f"rms_norm expects a float32 or bfloat16 (..., K) CPU tensor, got {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    if weight.dtype != x.dtype or weight.dim() != 1 or weight.numel() != k or not weight.is_cpu:
        raise ValueError(f"rms_norm: weight must be a {x.dtype} CPU vector of {k} values, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    y = torch.empty_like(x)
    if k and x.numel():
        rc = lib.bitlm_rms_norm_rows(1 if x.dtype == torch.bfloat16 else 0, x.data_ptr(), x.numel() // k, k,
                                     weight.data_ptr(), float(eps), y.data_ptr())
        _check(rc, "bitlm_rms_norm_rows")
    return y


def _dense_weight(weight: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A dense head's (N, K) weight, checked, contiguous."""
    if weight.dtype != dtype or weight.dim() != 2 or not weight.is_cpu:
        raise TypeError(f"weight must be {what} (N, K) CPU tensor, got {weight.dtype} {tuple(weight.shape)}")
    return weight if weight.is_contiguous() else weight.contiguous()


def _dense_args(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, what: str):
    """Checked (x2 float32 (M, K) contiguous, weight contiguous, M, N, K) for a dense head op."""
    w = _dense_weight(weight, dtype, what)
    k = x.shape[-1]
    if weight.shape[1] != k:
        raise ValueError(f"x has K={k} but the weight has K={weight.shape[1]}")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous() or not x2.is_cpu:
        x2 = x2.to(device="cpu", dtype=torch.float32).contiguous()
    return x2, w, x2.shape[0], weight.shape[0], k


def dense_int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.dense_int8_matmul` (bit-identical)."""
    lib = _lib or _need()
    x2, w, m, n, k = _dense_args(x, weight, torch.int8, "an int8")
    s = _f32_vec(scale, n, "scale")
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.bitlm_dense_i8(x2.data_ptr(), m, k, w.data_ptr(), s.data_ptr(), n, y.data_ptr()), "bitlm_dense_i8")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def dense_int8a8_matmul(xq: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.dense_int8a8_matmul` (bit-identical)."""
    from .reference import I8A8_MAX_K

    lib = _lib or _need()
    w = _dense_weight(weight, torch.int8, "an int8")
    n, k = w.shape
    if k >= I8A8_MAX_K:
        raise ValueError(f"W8A8 head needs K < {I8A8_MAX_K}, got {k}")
    xq = _xq(xq, k)
    m = xq.shape[0]
    a = _f32_vec(a if a.dim() == 1 else a.reshape(-1), m, "a")
    s = _f32_vec(scale, n, "scale")
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.bitlm_dense_i8a8(xq.data_ptr(), a.data_ptr(), m, k, w.data_ptr(), s.data_ptr(), n, y.data_ptr()),
           "bitlm_dense_i8a8")
    return y


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.hadamard` (bit-identical on every tier)."""
    lib = _lib or _need()
    k = x.shape[-1]
    if k < 1 or x.numel() == 0:
        raise ValueError(f"hadamard: x must be a non-empty (..., K) tensor, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous() or not x2.is_cpu:
        x2 = x2.to(device="cpu", dtype=torch.float32).contiguous()
    y = torch.empty_like(x2)
    _check(lib.bitlm_hadamard_f32(x2.data_ptr(), x2.shape[0], k, y.data_ptr()), "bitlm_hadamard_f32")
    return y.reshape(x.shape)


def dense_bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.dense_bf16_matmul` (bit-identical)."""
    lib = _lib or _need()
    x2, w, m, n, k = _dense_args(x, weight, torch.bfloat16, "a bfloat16")  # bf16 bits, read as uint16
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.bitlm_dense_bf16(x2.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr()), "bitlm_dense_bf16")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _check_lowbit_head(data: torch.Tensor, scale: torch.Tensor, bits: int, n: int, k: int) -> None:
    """An int6 / int4 (n, k) head as the C side reads it: packed uint8 bytes, float16 group scales."""
    from ..packing import head_nbytes

    nbytes, nscale = head_nbytes(bits, n, k)
    if data.dtype != torch.uint8 or data.numel() != nbytes or not data.is_contiguous() or not data.is_cpu:
        raise ValueError(f"int{bits} head data must be {nbytes} contiguous CPU uint8 values, got {data.dtype} x {data.numel()}")
    if scale.dtype != torch.float16 or scale.numel() != nscale or not scale.is_contiguous() or not scale.is_cpu:
        raise ValueError(f"int{bits} head scale must be {nscale} contiguous CPU float16 values")


def dense_lowbit_matmul(xq: torch.Tensor, a: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bits: int,
                        n: int) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.dense_lowbit_matmul` (bit-identical)."""
    lib = _lib or _need()
    k = xq.shape[1]
    _check_lowbit_head(data, scale, bits, n, k)
    xq = _xq(xq, k)
    m = xq.shape[0]
    a = _f32_vec(a if a.dim() == 1 else a.reshape(-1), m, "a")
    y = torch.empty((m, n), dtype=torch.float32)
    _check(lib.bitlm_dense_lowbit(bits, xq.data_ptr(), a.data_ptr(), m, k, data.data_ptr(), scale.data_ptr(), n,
                                  y.data_ptr()), "bitlm_dense_lowbit")
    return y


# ---- fused decode step ---------------------------------------------------------------------------


class _LinearDesc(ctypes.Structure):
    _fields_ = [("fmt", _c_i64), ("n", _c_i64), ("k", _c_i64), ("groups", _c_i64), ("w", _c_p), ("s", _c_p),
                ("bias", _c_p)]


_BLOCK_LINEARS = ("q", "k", "v", "o", "up", "down")
_BLOCK_NORMS = ("input_norm", "attn_sub_norm", "post_norm", "ffn_sub_norm")


class _BlockDesc(ctypes.Structure):
    _fields_ = [(n, _LinearDesc) for n in _BLOCK_LINEARS] + [(n, _c_p) for n in (*_BLOCK_NORMS, "k_cache", "v_cache")]


class _DecoderDesc(ctypes.Structure):
    _fields_ = [(n, _c_i64) for n in ("n_layers", "d_model", "n_heads", "kv_heads", "head_dim", "ffn_dim", "max_len",
                                      "act")] + [("eps", _c_d), ("blocks", _c_p), ("kv_type", _c_i64),
                                                 ("kv_scales", _c_p)]


class _TokenDesc(ctypes.Structure):
    _fields_ = [("vocab", _c_i64), ("embed_kind", _c_i64), ("embed", _c_p), ("embed_scale", _c_p),
                ("final_norm", _c_p), ("head_bits", _c_i64), ("head", _c_p), ("head_scale", _c_p),
                ("cos_tab", _c_p), ("sin_tab", _c_p), ("rope_rows", _c_i64)]


#: KV cache types of the fused step (BITLM_KV_* in csrc/bitlm_kernels.h) and their torch dtypes.
KV_TYPES = {"f32": (0, torch.float32), "f16": (1, torch.float16), "int8": (2, torch.int8)}


def kv_quantize(x: torch.Tensor, kv: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a float32 (R, D) tensor rounded as a ``kv`` cache stores them (``bitlm_kv_quantize``):
    (values in the cache dtype, per-row float32 scales for int8 else None)."""
    lib = _lib or _need()
    code, dt = KV_TYPES[kv]
    x = x.to(torch.float32).contiguous()
    r, d = x.shape
    out = torch.empty((r, d), dtype=dt)
    sc = torch.empty(r, dtype=torch.float32) if kv == "int8" else None
    _check(lib.bitlm_kv_quantize(code, x.data_ptr(), r, d, out.data_ptr(), None if sc is None else sc.data_ptr()),
           "bitlm_kv_quantize")
    return out, sc


def rope_rows_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on float32 contiguous (M, H, D) rows with (M, D) cos / sin (``bitlm_rope_rows``); returns x."""
    lib = _lib or _need()
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 3:
        raise ValueError("rope_rows_: x must be a contiguous float32 (M, H, D) tensor")
    m, nh, d = x.shape
    cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    if cos.shape != (m, d) or sin.shape != (m, d):
        raise ValueError(f"rope_rows_: cos / sin must be ({m}, {d}), got {tuple(cos.shape)} / {tuple(sin.shape)}")
    _check(lib.bitlm_rope_rows(x.data_ptr(), m, nh, d, cos.data_ptr(), sin.data_ptr()), "bitlm_rope_rows")
    return x


def glu_relu2(y: torch.Tensor) -> torch.Tensor:
    """float32 (M, 2F) gate then up values → (M, F) relu(g)² · u (``bitlm_glu_relu2``)."""
    lib = _lib or _need()
    y = y.to(torch.float32).contiguous()
    m, f2 = y.shape
    if f2 % 2:
        raise ValueError(f"glu_relu2: {f2} columns, expected gate and up halves")
    out = torch.empty((m, f2 // 2), dtype=torch.float32)
    _check(lib.bitlm_glu_relu2(y.data_ptr(), m, f2 // 2, out.data_ptr()), "bitlm_glu_relu2")
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.argmax` (``bitlm_argmax_f32`` per row; the
    same indices); other dtypes, devices or empty rows go to torch."""
    n = x.shape[-1] if x.dim() else 0
    if x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous() or not 0 < n < 2**31:
        return x.max(-1).indices
    lib = _lib or _need()
    p, rows = x.data_ptr(), x.numel() // n
    if rows == 1:
        return torch.tensor(lib.bitlm_argmax_f32(p, n)).view(x.shape[:-1])
    return torch.tensor([lib.bitlm_argmax_f32(p + 4 * n * r, n) for r in range(rows)]).view(x.shape[:-1])


class BatchAttention:
    """``bitlm_attn_batch`` bound to N single-sequence KV caches for one batched decode step.

    ``caches``: objects with per-layer ``k`` / ``v`` lists of contiguous (1, kv_heads, max_len,
    head_dim) tensors of one ``kv`` type (``KV_TYPES``; int8 adds ``k_scale`` / ``v_scale``
    float32 (1, kv_heads, max_len) lists) and ``pos`` (the position written now).  Every tensor is
    checked here once; :meth:`run` then costs one native call per layer.
    """

    def __init__(self, caches: list, kv: str, n_heads: int, kv_heads: int, head_dim: int, n_layers: int) -> None:
        if kv not in KV_TYPES:
            raise ValueError(f"KV cache type must be one of {sorted(KV_TYPES)}, got {kv!r}")
        self.kv_code, dt = KV_TYPES[kv]
        self.N, self.H, self.Hkv, self.D = len(caches), n_heads, kv_heads, head_dim
        self.pos = torch.tensor([c.pos for c in caches], dtype=torch.int64)
        self.max_len = torch.tensor([c.max_len for c in caches], dtype=torch.int64)
        if self.N == 0 or bool((self.pos < 0).any() | (self.pos >= self.max_len).any()):
            raise ValueError("batched attention: every cache needs 0 <= pos < max_len")
        names = ("k", "v", "k_scale", "v_scale") if kv == "int8" else ("k", "v")
        table = []
        for j, c in enumerate(caches):
            rows = []
            for name in names:
                ts = getattr(c, name)
                shape = (1, kv_heads, c.max_len) + (() if name.endswith("scale") else (head_dim,))
                want = torch.float32 if name.endswith("scale") else dt
                if len(ts) != n_layers:
                    raise ValueError(f"cache {j} {name}: {len(ts)} layers, expected {n_layers}")
                for i, t in enumerate(ts):
                    if t.dtype != want or not t.is_contiguous() or tuple(t.shape) != shape:
                        raise ValueError(f"cache {j} {name}[{i}]: expected a contiguous {want} {shape} tensor, "
                                         f"got {t.dtype} {tuple(t.shape)}")
                rows.append([t.data_ptr() for t in ts])
            table.append(rows)
        self._caches = caches  # keeps every tensor pointed at alive
        # (n_layers, 2 or 4, N) pointers: layer i's k, v (, k_scale, v_scale) arrays are contiguous rows
        self.ptrs = torch.tensor(table, dtype=torch.int64).permute(2, 1, 0).contiguous()

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> torch.Tensor:
        """q (N, H, D), k / v (N, Hkv, D) float32 contiguous (q and k get RoPE in place), cos / sin
        (N, D): store the k / v rows at each cache's ``pos`` and attend → (N, H * D)."""
        lib = _lib or _need()
        N, H, Hkv, D = self.N, self.H, self.Hkv, self.D
        for name, t, shape in (("q", q, (N, H, D)), ("k", k, (N, Hkv, D)), ("v", v, (N, Hkv, D)), ("cos", cos, (N, D)),
                               ("sin", sin, (N, D))):
            if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
                raise ValueError(f"batched attention {name}: expected a contiguous float32 {shape} tensor")
        out = torch.empty((N, H * D), dtype=torch.float32)
        p = self.ptrs[layer]
        base, step = p.data_ptr(), N * 8
        ks = base + 2 * step if self.kv_code == 2 else None
        vs = base + 3 * step if self.kv_code == 2 else None
        _check(lib.bitlm_attn_batch(self.kv_code, N, H, Hkv, D, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    self.pos.data_ptr(), self.max_len.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                    base, base + step, ks, vs, out.data_ptr()), "bitlm_attn_batch")
        return out


#: FFN activations of bitlm_decode_step (gated: act(gate) * up).
ACTIVATIONS = {"silu": 1, "relu2": 2}


class Decoder:
    """``bitlm_decode_step`` bound to one packed model and one KV cache.

    ``blocks``: per layer a dict with the packed weights ``q k v o up down`` (``up`` = gate rows
    then up rows, groups as packed), optional float32 ``q_b k_b v_b`` biases, the four norm
    weights (None = no norm at that site) and ``k_cache`` / ``v_cache`` float32 tensors of
    (1, kv_heads, max_len, head_dim) of the ``kv`` type (``KV_TYPES``), plus float32 (1, kv_heads,
    max_len) ``k_scale`` / ``v_scale`` for int8.  Everything is checked once here, and every tensor
    the C side points at is held by this object.

    Without caches (``max_len=None``, no ``k_cache`` / ``v_cache`` in the blocks) it holds only the
    weights, for :meth:`rows`: one batched step of N sequences with their own caches.
    """

    def __init__(self, *, d_model: int, n_heads: int, kv_heads: int, head_dim: int, ffn_dim: int,
                 max_len: int | None, act: str, eps: float, blocks: list[dict], kv: str = "f32") -> None:
        if kv not in KV_TYPES:
            raise ValueError(f"KV cache type must be one of {sorted(KV_TYPES)}, got {kv!r}")
        kv_code, kv_dtype = KV_TYPES[kv]
        cached = max_len is not None
        scales = (ctypes.c_void_p * (2 * len(blocks)))() if kv == "int8" and cached else None
        if act not in ACTIVATIONS:
            raise ValueError(f"fused decode supports activations {sorted(ACTIVATIONS)}, got {act!r}")
        self._keep: list[torch.Tensor] = []
        self.d_model, self.head_dim = d_model, head_dim
        hd, kvd = n_heads * head_dim, kv_heads * head_dim
        shapes = {"q": (hd, d_model), "k": (kvd, d_model), "v": (kvd, d_model), "o": (d_model, hd),
                  "up": (2 * ffn_dim, d_model), "down": (d_model, ffn_dim)}
        norm_len = {"input_norm": d_model, "attn_sub_norm": hd, "post_norm": d_model, "ffn_sub_norm": ffn_dim}
        arr = (_BlockDesc * len(blocks))()
        for i, blk in enumerate(blocks):
            b = arr[i]
            for name in _BLOCK_LINEARS:
                w = blk[name]
                if (w.N, w.K) != shapes[name]:
                    raise ValueError(f"layer {i} {name}: weight is {w.N}x{w.K}, expected {shapes[name][0]}x{shapes[name][1]}")
                bias = blk.get(f"{name}_b")
                bp = None
                if bias is not None:
                    bias = _f32_vec(bias, w.N, f"layer {i} {name} bias")
                    self._keep.append(bias)
                    bp = bias.data_ptr()
                self._keep += [w.data, w.scale]
                setattr(b, name, _LinearDesc(_fmt_id(w), w.N, w.K, w.groups, w.data.data_ptr(), w.scale.data_ptr(), bp))
            for name in _BLOCK_NORMS:
                t = blk.get(name)
                if t is not None:
                    t = _f32_vec(t, norm_len[name], f"layer {i} {name}")
                    self._keep.append(t)
                    setattr(b, name, t.data_ptr())
            for name in ("k_cache", "v_cache") if cached else ():
                c = blk[name]
                if c.dtype != kv_dtype or not c.is_contiguous() or tuple(c.shape) != (1, kv_heads, max_len, head_dim):
                    raise ValueError(f"layer {i} {name}: expected a contiguous {kv_dtype} (1, {kv_heads}, {max_len}, "
                                     f"{head_dim}) tensor, got {c.dtype} {tuple(c.shape)}")
                self._keep.append(c)
                setattr(b, name, c.data_ptr())
            if scales is not None:
                for j, name in enumerate(("k_scale", "v_scale")):
                    c = blk[name]
                    if c.dtype != torch.float32 or not c.is_contiguous() or tuple(c.shape) != (1, kv_heads, max_len):
                        raise ValueError(f"layer {i} {name}: expected a contiguous float32 (1, {kv_heads}, {max_len}) "
                                         f"tensor, got {c.dtype} {tuple(c.shape)}")
                    self._keep.append(c)
                    scales[2 * i + j] = c.data_ptr()
        self._blocks, self._scales = arr, scales
        self._desc = _DecoderDesc(len(blocks), d_model, n_heads, kv_heads, head_dim, ffn_dim, max_len or 1,
                                  ACTIVATIONS[act], float(eps), ctypes.addressof(arr), kv_code,
                                  None if scales is None else ctypes.addressof(scales))
        self.max_len, self.kv_code, self.act = max_len, kv_code, act
        self.shape = (n_heads, kv_heads, head_dim, len(blocks))

    def step(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Run every block on the float32 (d_model,) residual ``x`` in place for the token at
        ``pos`` (writing the cache rows at ``pos``); cos / sin: (head_dim,) float32."""
        lib = _lib or _need()
        if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != self.d_model:
            raise ValueError(f"x must be a contiguous float32 tensor of {self.d_model} values")
        if not 0 <= pos < self.max_len:
            raise ValueError(f"KV cache overflow: position {pos} >= capacity {self.max_len}")
        cos = _f32_vec(cos.reshape(-1), self.head_dim, "cos")
        sin = _f32_vec(sin.reshape(-1), self.head_dim, "sin")
        if self.max_len is None:
            raise ValueError("this decoder holds no KV cache: use rows()")
        rc = lib.bitlm_decode_step(ctypes.addressof(self._desc), x.data_ptr(), int(pos), cos.data_ptr(), sin.data_ptr())
        _check(rc, "bitlm_decode_step")
        return x

    def bind_token(self, *, embed: torch.Tensor, embed_scale: torch.Tensor | None, final_norm: torch.Tensor,
                   head: torch.Tensor, head_scale: torch.Tensor, head_bits: int, vocab: int, cos_tab: torch.Tensor,
                   sin_tab: torch.Tensor) -> None:
        """Bind what :meth:`token` needs besides the blocks (``bitlm_decode_token``): the embedding
        table (float32, bfloat16, or int8 with float32 ``embed_scale`` per row), the final norm,
        the head (int8 rows + float32 scale per row for ``head_bits`` 8; the packed int6 / int4
        bytes + float16 group scales for 6 / 4) and the RoPE tables (rows, head_dim)."""
        if self.max_len is None:
            raise ValueError("this decoder holds no KV cache: use rows()")
        d, D = self.d_model, self.head_dim
        kinds = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
        if embed.dtype not in kinds or tuple(embed.shape) != (vocab, d) or not embed.is_contiguous():
            raise ValueError(f"embedding: expected a contiguous float32 / bfloat16 / int8 ({vocab}, {d}) tensor, "
                             f"got {embed.dtype} {tuple(embed.shape)}")
        kind = kinds[embed.dtype]
        if (kind == 2) != (embed_scale is not None):
            raise ValueError("embedding: an int8 table needs its per-row scales, other kinds none")
        es = None if embed_scale is None else _f32_vec(embed_scale, vocab, "embedding scale")
        norm = _f32_vec(final_norm, d, "final norm")
        if head_bits == 8:
            if head.dtype != torch.int8 or tuple(head.shape) != (vocab, d) or not head.is_contiguous():
                raise ValueError(f"head: expected a contiguous int8 ({vocab}, {d}) tensor")
            hs = _f32_vec(head_scale, vocab, "head scale")
        elif head_bits in (6, 4):
            _check_lowbit_head(head, head_scale, head_bits, vocab, d)
            hs = head_scale
        else:
            raise ValueError(f"head_bits must be 8, 6 or 4, got {head_bits}")
        for name, t in (("cos", cos_tab), ("sin", sin_tab)):
            if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != D or not t.is_contiguous():
                raise ValueError(f"{name} table: expected a contiguous float32 (rows, {D}) tensor")
        self._token_keep = (embed, es, norm, head, hs, cos_tab, sin_tab)
        self._token = _TokenDesc(vocab, kind, embed.data_ptr(), None if es is None else es.data_ptr(), norm.data_ptr(),
                                 head_bits, head.data_ptr(), hs.data_ptr(), cos_tab.data_ptr(), sin_tab.data_ptr(),
                                 cos_tab.shape[0])
        self._token_x = torch.empty(d)
        self._token_logits: torch.Tensor | None = None
        self.vocab = vocab

    def token(self, token: int, pos: int) -> torch.Tensor:
        """One whole decode token (``bitlm_decode_token``, after :meth:`bind_token`): embedding row,
        every block, the final norm and the head → float32 (vocab,) logits, the bits of
        embedding + :meth:`step` + ``quantize_rows`` + the head product, in one call."""
        logits = torch.empty(self.vocab)
        rc = (_lib or _need()).bitlm_decode_token(ctypes.addressof(self._desc), ctypes.addressof(self._token), token,
                                                  pos, self._token_x.data_ptr(), logits.data_ptr())
        self._token_error(rc, token, pos)
        return logits

    def token_greedy(self, token: int, pos: int) -> int:
        """:meth:`token`, then its greedy pick (``bitlm_decode_token_greedy``: argmax's index, the
        first of tied maxima, the first NaN): the next token id.  The logits go to a buffer this
        decoder reuses (:attr:`last_logits`, valid until the next call)."""
        if self._token_logits is None:
            self._token_logits = torch.empty(self.vocab)
        rc = (_lib or _need()).bitlm_decode_token_greedy(ctypes.addressof(self._desc), ctypes.addressof(self._token),
                                                         token, pos, self._token_x.data_ptr(),
                                                         self._token_logits.data_ptr())
        self._token_error(rc, token, pos)
        return rc

    @property
    def last_logits(self) -> torch.Tensor | None:
        """The logits of the last :meth:`token_greedy` call (a buffer the next call overwrites)."""
        return self._token_logits

    def _token_error(self, rc: int, token: int, pos: int) -> None:
        if rc == -1:
            if not 0 <= token < self.vocab:
                raise ValueError(f"token id {token} outside the vocabulary of {self.vocab}")
            raise ValueError(f"position {pos} outside the KV cache ({self.max_len}) or the RoPE table "
                             f"({self._token.rope_rows})")
        _check(rc, "bitlm_decode_token")

    def rows(self, x: torch.Tensor, attn: BatchAttention, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One decode step of ``attn``'s N sequences (``bitlm_decode_rows``, ReLU² models): x (N,
        d_model) float32 contiguous, the tokens' embeddings, becomes the residual streams after the
        last block, in place; every sequence's cache rows at its ``pos`` are written; cos / sin (N,
        head_dim).  The bits of ``PackedModel.decode_batch``'s per-op path."""
        lib = _lib or _need()
        N = attn.N
        if self.max_len is not None or self.act != "relu2":
            raise ValueError("rows() needs a weights-only ReLU² decoder")
        if (attn.H, attn.Hkv, attn.D, attn.ptrs.shape[0]) != self.shape or attn.kv_code != self.kv_code:
            raise ValueError("rows(): the caches' shape or KV type does not match this decoder")
        for name, t, shape in (("x", x, (N, self.d_model)), ("cos", cos, (N, self.head_dim)),
                               ("sin", sin, (N, self.head_dim))):
            if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
                raise ValueError(f"decode rows {name}: expected a contiguous float32 {shape} tensor")
        rc = lib.bitlm_decode_rows(ctypes.addressof(self._desc), N, x.data_ptr(), attn.pos.data_ptr(),
                                   attn.max_len.data_ptr(), cos.data_ptr(), sin.data_ptr(), attn.ptrs.data_ptr())
        _check(rc, "bitlm_decode_rows")
        return x


def decode_profile(enable: bool | None = None) -> dict[str, float]:
    """The per-phase timers of ``bitlm_decode_step`` accumulated so far (seconds per phase,
    ``pool_wait`` = the caller waiting for workers inside the passes, ``jobs`` = parallel jobs
    started, ``steps`` = calls profiled); then ``enable=True`` resets and starts them, ``False``
    stops them, ``None`` leaves them as they are."""
    lib = _need()
    n = lib.bitlm_decode_profile(-1, None, 0)
    out = (ctypes.c_double * n)()
    lib.bitlm_decode_profile({True: 1, False: 0, None: -1}[enable], out, n)
    names = lib.bitlm_decode_profile_names().decode().split(",")
    return dict(zip(names, list(out)))


# ---- bandwidth probe ----------------------------------------------------------------------------


def mem_read(buf: torch.Tensor) -> int:
    """Read every byte of a contiguous CPU tensor on all pool threads (bandwidth probe)."""
    if not buf.is_contiguous() or buf.data_ptr() % 64:
        raise ValueError("mem_read needs a contiguous, 64-byte aligned tensor")
    return _need().bitlm_mem_read(buf.data_ptr(), buf.numel() * buf.element_size())


def mem_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    n = src.numel() * src.element_size()
    if dst.numel() * dst.element_size() < n or not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("mem_copy needs contiguous tensors with dst at least as large as src")
    _need().bitlm_mem_copy(dst.data_ptr(), src.data_ptr(), n)


# ---- one transformers decoder layer at decode (csrc/hf_layer.c) ----------------------------------


_HF_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class _HfLayerDesc(ctypes.Structure):
    _fields_ = ([(n, _c_i64) for n in ("bf16", "d_model", "n_heads", "kv_heads", "head_dim", "ffn_dim", "act")]
                + [("eps", _c_d * 4), ("norm", _c_p * 4)] + [(n, _LinearDesc) for n in _HF_LINEARS] + [("next", _c_p)])


class HfLayer:
    """``bitlm_hf_layer_qkv`` / ``bitlm_hf_layer_out`` bound to one transformers BitNet decoder
    layer: its seven packed projections (``linears``: name in q k v o gate up down -> (PackedWeight,
    float32 bias or None)), its four norm weights (input, attn_sub, post_attention, ffn_sub) and
    epsilons, all in the model's ``dtype`` (float32 or bfloat16).  Checked once here; every tensor
    the C side reads is held by this object.  :meth:`link` names the next layer (whose q/k/v
    weights the workers prefetch after this layer's down projection)."""

    def __init__(self, *, dtype: torch.dtype, n_heads: int, kv_heads: int, head_dim: int,
                 linears: dict, norms: list[torch.Tensor], eps: list[float]) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"HfLayer: dtype must be float32 or bfloat16, got {dtype}")
        q = linears["q"][0]
        d_model, ffn = q.K, linears["gate"][0].N
        hd, kvd = n_heads * head_dim, kv_heads * head_dim
        shapes = {"q": (hd, d_model), "k": (kvd, d_model), "v": (kvd, d_model), "o": (d_model, hd),
                  "gate": (ffn, d_model), "up": (ffn, d_model), "down": (d_model, ffn)}
        self._keep: list = []
        d = _HfLayerDesc()
        d.bf16, d.d_model, d.n_heads, d.kv_heads, d.head_dim, d.ffn_dim = (
            int(dtype == torch.bfloat16), d_model, n_heads, kv_heads, head_dim, ffn)
        d.act = ACTIVATIONS["relu2"]
        for name in _HF_LINEARS:
            w, bias = linears[name]
            if (w.N, w.K) != shapes[name]:
                raise ValueError(f"HfLayer {name}: weight is {w.N}x{w.K}, expected {shapes[name][0]}x{shapes[name][1]}")
            bp = None
            if bias is not None:
                bias = _f32_vec(bias, w.N, f"HfLayer {name} bias")
                bp = bias.data_ptr()
            self._keep += [w.data, w.scale, bias]
            setattr(d, name, _LinearDesc(_fmt_id(w), w.N, w.K, w.groups, w.data.data_ptr(), w.scale.data_ptr(), bp))
        for i, (t, n) in enumerate(zip(norms, (d_model, hd, d_model, ffn))):
            if t.dtype != dtype or not t.is_contiguous() or t.numel() != n or t.device.type != "cpu":
                raise ValueError(f"HfLayer norm {i}: expected a contiguous {dtype} CPU vector of {n} values, "
                                 f"got {t.dtype} {tuple(t.shape)}")
            self._keep.append(t)
            d.norm[i] = t.data_ptr()
            d.eps[i] = float(eps[i])
        self._desc, self._addr, self._next = d, ctypes.addressof(d), None
        self.dtype, self.d_model, self.hd, self.kvd, self.head_dim = dtype, d_model, hd, kvd, head_dim
        self.n_heads, self.kv_heads = n_heads, kv_heads
        self._qshape, self._kvshape = (1, n_heads, 1, head_dim), (1, kv_heads, 1, head_dim)

    def link(self, nxt: HfLayer | None) -> None:
        self._next = nxt
        self._desc.next = None if nxt is None else nxt._addr

    def _bad(self, what: str, args: tuple) -> ValueError:
        dt = self.dtype
        for t, n, name in args:
            if t.dtype != dt or t.numel() != n or not t.is_contiguous():
                return ValueError(f"HfLayer.{what}: {name} must be {n} contiguous {dt} values, got {t.dtype} "
                                  f"{tuple(t.shape)}")
        return ValueError(f"HfLayer.{what}: bad arguments")  # not reached

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token's residual ``x`` (d_model values) and RoPE factors ``cos`` / ``sin``
        (head_dim values), all contiguous in the layer's dtype -> q (1, H, 1, D), k and v (1, Hkv,
        1, D) after the input norm, the projections and RoPE of q and k."""
        dt, D = self.dtype, self.head_dim
        if not (x.dtype == dt and cos.dtype == dt and sin.dtype == dt and x.numel() == self.d_model
                and cos.numel() == D and sin.numel() == D and x.is_contiguous() and cos.is_contiguous()
                and sin.is_contiguous()):  # one test on the decode path; the message only on failure
            raise self._bad("qkv", ((x, self.d_model, "x"), (cos, D, "cos"), (sin, D, "sin")))
        q = torch.empty(self._qshape, dtype=dt)
        k = torch.empty(self._kvshape, dtype=dt)
        v = torch.empty(self._kvshape, dtype=dt)
        _check((_lib or _need()).bitlm_hf_layer_qkv(self._addr, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                                    q.data_ptr(), k.data_ptr(), v.data_ptr()), "bitlm_hf_layer_qkv")
        return q, k, v

    def out(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer's output for residual ``x`` (d_model values) and attention output ``attn``
        (H * D values), contiguous in the layer's dtype: a new tensor shaped as ``x``."""
        dt = self.dtype
        if not (x.dtype == dt and attn.dtype == dt and x.numel() == self.d_model and attn.numel() == self.hd
                and x.is_contiguous() and attn.is_contiguous()):
            raise self._bad("out", ((x, self.d_model, "x"), (attn, self.hd, "attn")))
        y = torch.empty(x.shape, dtype=dt)
        _check((_lib or _need()).bitlm_hf_layer_out(self._addr, x.data_ptr(), attn.data_ptr(), y.data_ptr()),
               "bitlm_hf_layer_out")
        return y


class HfStack:
    """``bitlm_hf_decode_layers`` over one model's :class:`HfLayer` objects, in order: every layer
    of one decode token (batch 1) in one call, the attention over the caller's key / value
    buffers included."""

    def __init__(self, layers: list[HfLayer]) -> None:
        if not layers:
            raise ValueError("HfStack: no layers")
        l0 = layers[0]
        for x in layers:
            if (x.dtype, x.d_model, x.n_heads, x.kv_heads, x.head_dim) != (l0.dtype, l0.d_model, l0.n_heads,
                                                                          l0.kv_heads, l0.head_dim):
                raise ValueError("HfStack: the layers differ in dtype or shape")
        n = len(layers)
        self.layers, self.n = list(layers), n
        self.dtype, self.d_model, self.kv_heads, self.head_dim = l0.dtype, l0.d_model, l0.kv_heads, l0.head_dim
        self._arr = (ctypes.c_void_p * n)(*[x._addr for x in layers])
        self._k, self._v, self._cap = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)(), (ctypes.c_int64 * n)()

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor], pos: int, scale: float) -> torch.Tensor:
        """The last layer's output for one token's embedding ``x`` (d_model values) and RoPE factors
        ``cos`` / ``sin`` (head_dim values), contiguous in the layers' dtype.  ``keys[i]`` /
        ``values[i]``: layer i's cache buffers, contiguous (1, kv_heads, cap, head_dim) of the
        dtype with cap > ``pos``; the token's key and value are written at row ``pos``, and the
        attention reads rows [0, pos]."""
        dt, D, n = self.dtype, self.head_dim, self.n
        if not (x.dtype == dt and cos.dtype == dt and sin.dtype == dt and x.numel() == self.d_model
                and cos.numel() == D and sin.numel() == D and x.is_contiguous() and cos.is_contiguous()
                and sin.is_contiguous() and len(keys) == n and len(values) == n and pos >= 0):
            raise ValueError(f"HfStack.decode: x / cos / sin must be contiguous {dt} of {self.d_model} / {D} values, "
                             f"with {n} key and value buffers")
        for i, (k, v) in enumerate(zip(keys, values)):
            if not (k.dtype == dt and v.dtype == dt and k.dim() == 4 and k.shape == v.shape and k.shape[0] == 1
                    and k.shape[1] == self.kv_heads and k.shape[3] == D and k.shape[2] > pos and k.is_contiguous()
                    and v.is_contiguous()):
                raise ValueError(f"HfStack.decode: layer {i}'s key / value buffers must be contiguous {dt} "
                                 f"(1, {self.kv_heads}, cap > {pos}, {D}), got {tuple(k.shape)} / {tuple(v.shape)}")
            self._k[i], self._v[i], self._cap[i] = k.data_ptr(), v.data_ptr(), k.shape[2]
        y = torch.empty(x.shape, dtype=dt)
        _check((_lib or _need()).bitlm_hf_decode_layers(self._arr, n, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                                        self._k, self._v, self._cap, pos, float(scale), y.data_ptr()),
               "bitlm_hf_decode_layers")
        return y


# ---- the fast QAT step's element passes (csrc/qat.c) --------------------------------------------

__all__ += ["qat_rows_to_f32", "qat_ternary", "qat_binary", "qat_quantize_tensor"]


def qat_rows_to_f32(q: torch.Tensor, f: torch.Tensor, op: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.qat_rows_to_f32` (bit-identical)."""
    if q.dtype != torch.int8 or q.dim() != 2 or not q.is_cpu:
        raise TypeError(f"qat_rows_to_f32 expects an int8 (M, K) CPU tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if op not in ("div", "mul"):
        raise ValueError(f"op must be 'div' or 'mul', got {op!r}")
    m, k = q.shape
    f = f.to(torch.float32).reshape(-1)
    if f.numel() not in (1, m):
        raise ValueError(f"qat_rows_to_f32: {f.numel()} factors for {m} rows")
    stride = 0 if f.numel() == 1 or f.stride(0) == 0 else 1
    f = f[:1].contiguous() if stride == 0 else f.contiguous()
    q = q.contiguous()
    y = _out_f32(out, m, k)
    rc = (_lib or _need()).bitlm_qat_rows_to_f32(q.data_ptr(), f.data_ptr(), m, k, stride, 0 if op == "div" else 1, y.data_ptr())
    _check(rc, "bitlm_qat_rows_to_f32")
    return y


def _out_f32(out: torch.Tensor | None, m: int, k: int) -> torch.Tensor:
    if out is None:
        return torch.empty((m, k), dtype=torch.float32)
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != (m, k) or not out.is_cpu:
        raise ValueError(f"out must be a contiguous float32 CPU ({m}, {k}) tensor")
    return out


def _weight_codes(name: str, w: torch.Tensor, v: torch.Tensor, what: str) -> torch.Tensor:
    if w.dtype != torch.float32 or not w.is_cpu:
        raise TypeError(f"{name} expects a float32 CPU tensor, got {w.dtype} on {w.device}")
    v = v.to(torch.float32).reshape(-1)
    if v.numel() != 1:
        raise ValueError(f"{name} takes one {what}, got {v.numel()}")
    w, v = w.contiguous(), v.contiguous()
    t = torch.empty(w.shape, dtype=torch.int8)
    rc = getattr(_lib or _need(), f"bitlm_{name}")(w.data_ptr(), w.numel(), v.data_ptr(), t.data_ptr())
    _check(rc, f"bitlm_{name}")
    return t


def qat_ternary(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.qat_ternary` (bit-identical)."""
    return _weight_codes("qat_ternary", w, s, "scale")


def qat_binary(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Native twin of :func:`bitlm.kernels.reference.qat_binary` (bit-identical)."""
    return _weight_codes("qat_binary", w, alpha, "mean")


def qat_quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of :func:`bitlm.kernels.reference.qat_quantize_tensor` (bit-identical)."""
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"qat_quantize_tensor expects a float32 CPU tensor, got {x.dtype} on {x.device}")
    k = x.shape[-1] if x.dim() else 1
    x2 = x.reshape(-1, k).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8)
    a = torch.empty((1,), dtype=torch.float32)
    rc = (_lib or _need()).bitlm_qat_quantize_tensor(x2.data_ptr(), x2.shape[0], k, q.data_ptr(), a.data_ptr())
    _check(rc, "bitlm_qat_quantize_tensor")
    return q.reshape(x.shape), a
