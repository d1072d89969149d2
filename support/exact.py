"""
The CPU arithmetic pinned, so that a run repeats bit for bit: imported before torch by every entry point.

Two libraries pick their kernels by the processor, and the kernels round differently:
- torch's own vectorized kernels (AVX2 or AVX-512): pinned to AVX2, which every x86-64 CPU since 2013 has;
- MKL's matrix products: on Intel processors its default kernels depend on how the operands happen to lie in
  memory, so a resumed process computes other last digits than the run it continues. MKL's strict
  reproducibility mode makes them depend on the values alone (and not on the thread count). On other
  processors MKL's default path already does, and turning the mode on there would only move its digits.
Each is read once, at the library's first kernel; set either variable yourself to choose otherwise.
quiet_interrupt() is the scripts' other before-torch step: Ctrl-C while torch loads ends in one line.
"""
import os


def intel_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:  # not Linux
        import platform
        return "Intel" in platform.processor()


os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
if intel_cpu():
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def quiet_interrupt():
    """Ctrl-C before the run's own handlers are in place (torch takes seconds to load): one line on stderr and exit
    status 130 instead of a traceback through the imports. Scripts call it first, when run as scripts."""
    import signal
    import sys

    def stop(*_):  # nothing is written yet; os._exit, since an import in progress may swallow SystemExit
        print("interrupted (SIGINT) while starting", file=sys.stderr, flush=True)
        os._exit(130)
    signal.signal(signal.SIGINT, stop)
