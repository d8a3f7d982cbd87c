"""The CPU a benchmark ran on, named precisely: vendor, family / model / stepping (as cpuid and
/proc/cpuinfo report them), the microarchitecture where the (family, model) pair is known, the
SIMD features that matter to the kernels, the kernel tier and the choices the native library
made (cache sizes, blocking), and the load average.  Every benchmark JSON records this, because
GMAC/s and tok/s numbers mean little without it: the same "AMD EPYC" string covers Zen 4, which
runs 512-bit VNNI at half the rate of Zen 5.

    python benchmarks/cpu_info.py      # prints the record as JSON
"""

from __future__ import annotations

import json
import os
import platform

# (family, first model, last model) -> microarchitecture.  Intel family 6 and AMD families
# 0x17-0x1A; models as Intel's and AMD's programming references list them.
_INTEL = [
    (0x3C, 0x3C, "Haswell"), (0x3F, 0x3F, "Haswell-E/EP"), (0x45, 0x46, "Haswell"), (0x3D, 0x3D, "Broadwell"),
    (0x47, 0x47, "Broadwell"), (0x4F, 0x4F, "Broadwell-E/EP"), (0x56, 0x56, "Broadwell-DE"),
    (0x4E, 0x4E, "Skylake"), (0x5E, 0x5E, "Skylake"), (0x55, 0x55, "Skylake-SP / Cascade Lake / Cooper Lake"),
    (0x8E, 0x8E, "Kaby / Coffee / Whiskey / Amber Lake"), (0x9E, 0x9E, "Kaby / Coffee Lake"),
    (0xA5, 0xA6, "Comet Lake"), (0x66, 0x66, "Cannon Lake"), (0x7D, 0x7E, "Ice Lake (client)"),
    (0x6A, 0x6C, "Ice Lake-SP/D"), (0x8C, 0x8D, "Tiger Lake"), (0xA7, 0xA7, "Rocket Lake"),
    (0x97, 0x9A, "Alder Lake"), (0xB7, 0xB7, "Raptor Lake"), (0xBA, 0xBA, "Raptor Lake"),
    (0xBF, 0xBF, "Raptor Lake"), (0xAA, 0xAC, "Meteor Lake"), (0xBD, 0xBD, "Lunar Lake"),
    (0xC5, 0xC6, "Arrow Lake"), (0x8F, 0x8F, "Sapphire Rapids"), (0xCF, 0xCF, "Emerald Rapids"),
    (0xAD, 0xAE, "Granite Rapids"), (0xAF, 0xAF, "Sierra Forest"), (0xDD, 0xDD, "Clearwater Forest"),
]
_AMD = {
    0x17: [(0x00, 0x2F, "Zen / Zen+"), (0x30, 0xFF, "Zen 2")],
    0x19: [(0x00, 0x0F, "Zen 3"), (0x10, 0x1F, "Zen 4"), (0x20, 0x5F, "Zen 3"), (0x60, 0x7F, "Zen 4"),
           (0xA0, 0xAF, "Zen 4c")],
    0x1A: [(0x00, 0xFF, "Zen 5")],
}
# What each generation does with a 512-bit vpdpbusd, the GEMM's one hot instruction.
_VNNI512 = {"Zen 4": "512-bit ops as two 256-bit halves (half the per-cycle rate of Zen 5)",
            "Zen 4c": "512-bit ops as two 256-bit halves", "Zen 5": "full-width 512-bit datapath"}
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx_vnni",
          "avx512_bf16", "avx512_fp16", "amx_int8", "amx_tile", "hypervisor")


def microarchitecture(vendor: str, family: int, model: int, flags: set[str] = frozenset()) -> str:
    """The microarchitecture of (vendor, family, model), or "unknown"; a virtual CPU whose flags
    are newer than its reported model says so (hypervisors often report a generic model)."""
    name = "unknown"
    if vendor == "GenuineIntel" and family == 6:
        name = next((n for lo, hi, n in _INTEL if lo <= model <= hi), "unknown")
        if "amx_tile" in flags and name not in ("Sapphire Rapids", "Emerald Rapids", "Granite Rapids"):
            name = f"Sapphire Rapids or later (AMX, AVX512-FP16 flags; cpuid model {model} reads {name})"
    elif vendor in ("AuthenticAMD", "HygonGenuine"):
        name = next((n for lo, hi, n in _AMD.get(family, []) if lo <= model <= hi), "unknown")
    return name


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # first processor only
                k, _, v = line.partition(":")
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_identity() -> dict:
    """The CPU record every benchmark JSON carries (see the module docstring)."""
    ci = _cpuinfo()
    vendor = ci.get("vendor_id", platform.processor() or "?")
    family, model, stepping = (int(ci[k]) if ci.get(k, "").isdigit() else -1 for k in ("cpu family", "model",
                                                                                         "stepping"))
    flags = set(ci.get("flags", "").split())
    arch = microarchitecture(vendor, family, model, flags)
    rec = {"model_name": ci.get("model name", platform.machine()), "vendor": vendor, "family": family,
           "model": model, "stepping": stepping, "microarchitecture": arch,
           "flags": [f for f in _FLAGS if f in flags], "logical_cpus": os.cpu_count()}
    if arch in _VNNI512:
        rec["vnni512"] = _VNNI512[arch]
    try:
        from bitlm.kernels import native

        if native.load() is not None:
            info = native.info()
            rec["kernel_tier"] = info["tier"]
            rec["kernel_config"] = info.get("kernel_config")
    except Exception as e:  # noqa: BLE001 - a record without the library's view is still useful
        rec["kernel_tier"] = f"unavailable ({type(e).__name__})"
    try:
        from bitlm import memory

        # huge pages: bitlm's weights / KV caches and the read probes sit on them where "used"
        rec["hugepages"] = memory.status()
    except Exception as e:  # noqa: BLE001
        rec["hugepages"] = f"unknown ({type(e).__name__})"
    try:
        rec["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return rec


def describe(rec: dict | None = None) -> str:
    """One line for a table caption: name, vendor family/model/stepping, microarchitecture, tier."""
    r = rec or cpu_identity()
    return (f"{r['model_name']} ({r['vendor']} family {r['family']} model {r['model']} stepping {r['stepping']}, "
            f"{r['microarchitecture']}; kernels {r.get('kernel_tier', '?')}; {_pages(r)}; "
            f"flags {' '.join(f for f in r['flags'] if f != 'hypervisor') or '-'})")


def _pages(r: dict) -> str:
    hp = r.get("hugepages")
    if not isinstance(hp, dict):
        return "pages ?"
    return f"huge pages {'on' if hp['used'] else 'off'} (THP {hp['thp']})"


if __name__ == "__main__":
    r = cpu_identity()
    print(describe(r))
    print(json.dumps(r, indent=2))
