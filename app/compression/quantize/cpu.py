"""What this machine's int8 kernels need from a quantized model."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@cache
def int8_saturates() -> bool:
    """x86 without VNNI: onnxruntime's uint8 × int8 kernels add pairs of products in 16 bits (vpmaddubsw), which
    saturate with full-range 8-bit weights; 7-bit weights (`reduce_range`) cannot. On an AMD EPYC (Zen 3, AVX2)
    the digits CNN's static INT8 answered up to 6.3 away from its own QDQ graph computed in float, and 0.0 away
    with 7-bit weights."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True  # an x86 we cannot ask: 7-bit weights are right everywhere, only slightly coarser
    return not any(flag in flags for flag in _VNNI_FLAGS)
