"""The machine a benchmark ran on, as its header states it.

Speedups of int8 models depend on the CPU's int8 instructions more than on anything we
do: ORT's u8×s8 kernels on AVX2 without VNNI add products pairwise into int16
(`vpmaddubsw`, the reason for `--reduce-range`), with VNNI they accumulate in int32. The
sandbox these benchmarks run in is not always the same CPU (RESULTS.md of 2026-11-29 had
ORT's dynamic MiniLM at 2.28x FP32, as on the AVX-512 VNNI CPU of techniques.md's
anchors; on 2026-12-03's AVX2-only EPYC it ran at 1.37x), so every header says which.
"""

from __future__ import annotations

import platform
from pathlib import Path

# the flags (as /proc/cpuinfo spells them) that decide int8 speed, in the order written
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_description() -> str:
    """'<model name> (<int8 ISA flags>; <how ORT's u8×s8 kernels accumulate>)'."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine()):
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    isa = [f for f in INT8_FLAGS if f in flags] or ["no int8 dot-product flags seen"]
    from qcompile.backends.ort import u8s8_pairs_saturate

    kernels = (
        "ORT's u8×s8 kernels saturate int16 pairs (7-bit weights by default)"
        if u8s8_pairs_saturate()
        else "ORT's u8×s8 kernels accumulate in int32"
    )
    return f"{name} ({', '.join(isa)}; {kernels})"
