"""How the library's OpenMP threads wait between calls: a short spin, then sleep.

An OpenMP worker thread that has finished its share of a parallel region waits for the next region by spinning
(so that a call right after this one starts at once), then sleeps. GCC's runtime, libgomp, spins 300,000
iterations of a load and a pause instruction unless told otherwise: about 8 ms on a CPU whose pause takes 27 ns
(AMD Zen 3), far longer than a bn_simd call. In a program that alternates bn_simd with other multi-threaded work
(an OpenBLAS matmul in a NumPy training step), that spinning thread holds a core the other library's threads
need, after every call, wherever all cores are busy (docs/tuning.md, "OpenMP threads between calls").

So the library sets libgomp's spin count to what lasts ``SPIN_US`` microseconds on this CPU, timed once by
spinning the same loop: long enough that back-to-back bn_simd calls find their threads awake, short enough that
another library's threads get the core soon after the last call. libgomp reads its settings from the
environment once, when it is loaded, so the count is put in the environment (GOMP_SPINCOUNT) just before the
kernels' extension loads libgomp, and taken out again right after: processes started later and libraries loaded
later do not see it (a library that loads a libgomp.so.1 afterwards shares the runtime, and so the count: PyTorch's
wheel ships one of that soname, so PyTorch's threads take the count, and its thread limits, from whichever of the
two loads first; scikit-learn loads a copy of its own under another name).

It does nothing, and ``policy()`` says why, when
- the user chose: OMP_WAIT_POLICY or GOMP_SPINCOUNT is set (those apply, as always), or BN_SIMD_SPIN_US=default;
- libgomp was already loaded by another module before bn_simd (its settings are fixed then);
- the extension was not built by GCC (another OpenMP runtime), or without OpenMP.
BN_SIMD_SPIN_US=<microseconds> chooses another spin time (0: sleep at once, as OMP_WAIT_POLICY=passive).
"""
import os

from . import _runtime

# Spin time after a call (microseconds): docs/tuning.md, "OpenMP threads between calls".
SPIN_US = 200.0
# Bounds of the count: at least one iteration; at most libgomp's own default.
_MAX_COUNT = 300_000

_state = {"runtime": "libgomp" if _runtime.built_with_gcc() else "other", "applied": False, "spin_count": None,
          "spin_us": None, "reason": None}
_restore = None


_SPIN_US_EXPECTED = "BN_SIMD_SPIN_US must be a number of microseconds in [0, 1e9) or 'default'"


def _spin_us_setting():
    """The spin time asked for by BN_SIMD_SPIN_US (None: 'default', leave the runtime's own)."""
    v = os.environ.get("BN_SIMD_SPIN_US", "").strip()
    if v == "":
        return SPIN_US
    if v.lower() == "default":
        return None
    try:
        us = float(v)
    except ValueError:
        raise ValueError(_SPIN_US_EXPECTED + f", got {v!r}") from None
    if not (us >= 0.0 and us < 1e9):
        raise ValueError(_SPIN_US_EXPECTED + f", got {v!r}")
    return us


def before_load():
    """Put the spin count in the environment for libgomp to read when the kernels' extension loads it."""
    global _restore
    us = _spin_us_setting()
    user = [k for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if os.environ.get(k, "") != ""]
    if _state["runtime"] != "libgomp":
        _state["reason"] = "the extension was not built by GCC: its OpenMP runtime keeps its own settings"
    elif user:
        _state["reason"] = f"{' and '.join(user)} set in the environment"
    elif us is None:
        _state["reason"] = "BN_SIMD_SPIN_US=default"
    elif _runtime.libgomp_loaded():
        _state["reason"] = "libgomp was loaded by another module before bn_simd: its settings hold"
    else:
        ns = _runtime.spin_ns()
        count = int(round(us * 1000.0 / ns)) if ns > 0 else _MAX_COUNT
        count = min(max(count, 0), _MAX_COUNT)
        _restore = os.environ.get("GOMP_SPINCOUNT")
        os.environ["GOMP_SPINCOUNT"] = str(count)
        _state.update(applied=True, spin_count=count, spin_us=round(count * ns / 1000.0, 1))


def after_load():
    """Take the count out of the environment again."""
    global _restore
    if _state["applied"]:
        if _restore is None:
            os.environ.pop("GOMP_SPINCOUNT", None)
        else:
            os.environ["GOMP_SPINCOUNT"] = _restore
        _restore = None


def record_build(have_openmp):
    """A build without OpenMP has no threads to wait."""
    if not have_openmp:
        _state.update(applied=False, spin_count=None, spin_us=None, runtime=None, reason="built without OpenMP")


def policy():
    """How idle OpenMP threads wait: a dict with runtime, applied, spin_count, spin_us and reason (why not
    applied)."""
    return dict(_state)
