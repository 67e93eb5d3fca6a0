"""What the machine computes natively: the one place that decides "is bf16 fast on this CPU?".

Training (``SOLVER.AMP.DTYPE auto``) and inference (``--precision auto``) both ask
:func:`cpu_has_native_bf16`. On a CPU without AVX512-BF16 or AMX, PyTorch emulates bf16 with
conversions around fp32 arithmetic: measured on an AMD Zen (AVX2) CPU at 512x512, batch 2, R50,
one training iteration took 9-10 s in fp32 and 207 s under bf16 autocast.
"""

from __future__ import annotations

import functools
import os

import torch

#: Environment override for tests and for users who know better: "1" forces native bf16, "0"
#: forces the emulated case.
NATIVE_BF16_ENV = "SEGCLIP_CPU_NATIVE_BF16"

#: Expected slowdown of bf16 autocast against fp32 on a CPU without native bf16 (the measurement
#: in the module doc: 207 s / 9.5 s).
EMULATED_BF16_SLOWDOWN = 20

_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def _detect_native_bf16() -> tuple[bool, str]:
    flags = _cpuinfo_flags()
    found = [f for f in _NATIVE_FLAGS if f in flags]
    if found:
        return True, f"CPU flags {'/'.join(found)}"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    # torch reports "AVX512_BF16" / "AMX" style names on CPUs whose kernels use native bf16.
    if "BF16" in capability.upper() or "AMX" in capability.upper():
        return True, f"torch CPU capability {capability}"
    if flags:
        return False, f"no avx512_bf16/amx_bf16 in the CPU flags (torch capability {capability})"
    return False, f"CPU flags unreadable, torch CPU capability {capability}"


def native_bf16_reason() -> tuple[bool, str]:
    """``(native, why)``: whether this CPU computes bf16 natively, and the evidence."""
    override = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1", f"{NATIVE_BF16_ENV}={override}"
    if override:
        raise ValueError(f"{NATIVE_BF16_ENV}={override!r}: use 0 or 1 (or leave it unset)")
    return _detect_native_bf16()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX (bf16 autocast is then faster than fp32)."""
    return native_bf16_reason()[0]
