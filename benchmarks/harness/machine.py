"""The machine under the benchmarks: glibc's malloc thresholds and a one-line CPU description."""
import ctypes
import os
import platform
import types

# whether steady_allocator() has been applied in this process
MALLOC = types.SimpleNamespace(steady=False)


def steady_allocator():
    """Make glibc's malloc keep freed memory instead of returning it to the system (Linux only).

    By default glibc hands back freed memory above a threshold that it adapts as the program runs, so
    whether a 1-32 MB temporary of the NumPy baseline (or a PyTorch output) reuses warm pages or faults
    in fresh ones depends on what was allocated before: the same NumPy call can take several times longer
    in one process than in another. Fixed thresholds make those sizes reuse memory every time. Arrays over
    32 MB (glibc's largest mmap threshold) are still mapped fresh at each allocation, as before.
    Returns True when applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):
        return False
    MALLOC.steady = MALLOC.steady or bool(ok)
    return bool(ok)


def describe():
    """CPU model (/proc/cpuinfo "model name"), logical cores and L3 size where the system tells."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    line = f"{model}, {os.cpu_count()} cores ({platform.machine()})"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()
        if size.endswith("K") and size[:-1].isdigit() and int(size[:-1]) % 1024 == 0:
            size = f"{int(size[:-1]) // 1024} MiB"
        line += f", L3 {size}"
    except OSError:
        pass
    return line
