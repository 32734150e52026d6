"""Portable CPU numerics: pin torch's ATen kernels and MKL to AVX2 so fewer float32 results depend on the CPU.

Measured here: 3 meta-iterations of digits meta-training give different meta-weights under torch's AVX512
kernels, under its AVX2 kernels, and under MKL with or without ``MKL_CBWR=AVX2``, so results depended on the
instruction set of the CPU they ran on. Pinning ATen's kernel dispatch (``ATEN_CPU_CAPABILITY``), oneDNN's
instruction set (``ONEDNN_MAX_CPU_ISA``) and MKL's conditional numerical reproducibility mode (``MKL_CBWR``) to
AVX2 makes the hand-coded baselines bit-identical across x86-64 CPUs with AVX2 (checked between an AMD EPYC and an
Intel Xeon, same torch/MKL versions, one intra-op thread), but not meta-training: it departed at the first
meta-iteration there, so meta-trained results are only statistically reproducible (``tools/numerics_trace.py``
names the first op that departs between the kernel paths one machine can select).

These variables are read once, when torch and MKL start, so :func:`ensure_portable_numerics` sets them and
re-executes the process; call it first thing in an entry point. ``LEARNED_OPT_NATIVE_NUMERICS=1`` turns it off
(the fastest kernels of this CPU, results tied to it).
"""
from __future__ import annotations

import os
import platform
import sys
from typing import FrozenSet, List, Optional, Sequence

PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
NATIVE_SWITCH = "LEARNED_OPT_NATIVE_NUMERICS"
# CPU kernel paths one x86-64 machine with AVX-512 can select, by the environment torch and MKL read at start; the
# first is PORTABLE_ENV. tools/numerics_trace.py traces where they depart, experiments/reproduce_check.py re-runs
# under one of them. "native" leaves every choice to this CPU (another CPU's default).
KERNEL_PATHS = {
    "pinned_avx2": dict(PORTABLE_ENV),
    "pinned_avx2_strict": {**PORTABLE_ENV, "MKL_CBWR": "AVX2,STRICT"},
    "aten_default": {**PORTABLE_ENV, "ATEN_CPU_CAPABILITY": "default"},
    "aten_avx512": {**PORTABLE_ENV, "ATEN_CPU_CAPABILITY": "avx512"},
    "mkl_compatible": {**PORTABLE_ENV, "MKL_CBWR": "COMPATIBLE"},
    "mkl_avx512": {**PORTABLE_ENV, "MKL_CBWR": "AVX512"},
    "native": {},
    "pinned_2_threads": {**PORTABLE_ENV, "OMP_NUM_THREADS": "2"},
}


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first value of ``name`` in /proc/cpuinfo, or None where there is no such file or field."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> FrozenSet[str]:
    """Instruction-set flags of this CPU from /proc/cpuinfo (empty where it cannot be read)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_model() -> Optional[str]:
    """CPU model name from /proc/cpuinfo, else ``platform.processor()``, else None."""
    return _cpuinfo_field("model name") or platform.processor() or None


def portable_numerics_supported() -> bool:
    """Whether this is an x86-64 Linux machine whose CPU has AVX2 (where the pinning applies)."""
    return (sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
            and "avx2" in cpu_flags())


def numerics_pinned() -> bool:
    """Whether this process's environment carries every :data:`PORTABLE_ENV` setting."""
    return all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items())


def ensure_portable_numerics(argv: Optional[Sequence[str]] = None) -> None:
    """Re-execute this process with :data:`PORTABLE_ENV` set, unless already set, unsupported or switched off.

    ``argv`` is the command line to re-run after the interpreter; by default this process's own
    (``sys.orig_argv``, which keeps ``-m module`` and ``-c code``, unlike ``sys.argv``).
    """
    if os.environ.get(NATIVE_SWITCH) == "1" or numerics_pinned() or not portable_numerics_supported():
        return
    os.environ.update(PORTABLE_ENV)
    if argv is None:
        # sys.argv turns "python -m pkg.mod" into "python /path/pkg/mod.py" (relative imports break) and
        # drops the code of "python -c"; orig_argv is the command line as typed
        args: List[str] = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)[1:])
    else:
        args = list(argv)
    # buffered output would be lost by exec
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + args)
