"""Batch normalization whose statistics span the batches of several processes (SyncBatchNorm).

P ranks each hold a piece of one batch; forward and backward give every rank the result of one process running
:class:`~bn_simd.BatchNorm` on the pieces concatenated in rank order: the statistics, y, grad_x, grad_weight,
grad_bias and the running statistics. Ranks may hold different batch sizes, including 0.

Communicators
-------------
``comm`` is an mpi4py communicator, a ``torch.distributed`` process group (gloo, CPU), or any object with the two
methods of this protocol (the adapters :class:`MPICommunicator` and :class:`TorchCommunicator` implement it):

``allreduce(buf)``
    buf: a 1-D C-contiguous float64 ndarray of the same length on every rank. Returns an array of that length
    holding the element-wise sum over the ranks (buf itself, summed in place, or a new array), the same values on
    every rank (as MPI's and gloo's algorithms give: fast mode decides on them whether to exchange again).
``allgather(buf)``
    buf: a 1-D C-contiguous float64 ndarray; lengths may differ between ranks. Returns a sequence with every
    rank's buffer, in rank order.

``comm=None`` takes the world of whichever library is initialised: mpi4py's ``COMM_WORLD`` when MPI is, else
``torch.distributed``'s default group when it is. Neither library is imported by bn_simd unless the program has
imported it.

Modes
-----
``mode="exact"`` gathers every rank's per-chunk moments (:func:`~bn_simd.batch_moments`) and merges them in chunk
order (:func:`~bn_simd.merge_moments`); the backward gathers per-chunk sums and adds them in chunk order. Every
rank computes the same numbers, and when each rank's piece ends on a chunk boundary of the whole batch the result
is bitwise that of one process (channels-first maps of 16x16 and larger: every sample; see
:func:`chunk_rows`). Bytes sent per rank: forward 8 (3 + K (3 C + 1)), backward 8 (4 + 2 K C), K its chunks.

``mode="fast"`` sends 2 C + 1 float64 per rank each way in one allreduce, after an allgather of four values per
rank (a flag, the channel count, whether the data is float64 and a digest of the shift), by which every rank learns
of a refused input or of another channel count before the allreduce (whose buffers of different lengths would abort
the job), and of shifts that differ between ranks (a layer unpickled on some ranks and rebuilt on others, say): the
ranks then all take the exact exchange, which has no shift, and the layers' next shift is the same again. Forward: the
count n_r and, relative to a shift K[c] that every rank holds alike, S1 = n_r (mean_r - K) and
S2 = M2_r + n_r (mean_r - K)^2 from the rank's own (exact, chunked) statistics; then mean = K + S1 / n and
M2 = S2 - S1^2 / n. The subtraction loses about eps_double (mean - K)^2 / var of the variance, so when
(mean - K)^2 > 2^20 var (2^4 var when any rank's data is float64) a second allreduce repeats the exchange relative to
the mean just found (error then eps_double-sized); every rank takes that decision on the same summed numbers. The
layer's shift is the previous call's mean (zeros at first), so only the first batch of a channel whose mean is far
from 0 (1000 std in float32, 4 in float64) pays the second round. Backward: the count and the two channel sums.
Results agree with one process to the output's rounding for float32 data. For float64 data each rank's own mean,
rounded to half an ulp of |mean|, enters the variance through n_r (mean_r - mean)^2: a relative error of about
eps_double |mean| / std (measured: mean / std = 1e6, about 9000 eps; 1e7, 5e4-1.5e5 eps); exact mode gives one
process's bits.

Errors
------
A rank whose input is refused (wrong shape, dtype, channels) still takes part in the exchange with a marker and
raises its own error; every other rank then raises RuntimeError naming the failed ranks, instead of hanging or
computing with a missing piece. A call that raises changes nothing (running statistics included).
"""
import hashlib
import sys

import numpy as np

from . import _args as ck
from . import functional as F
from .layers import BatchNorm, ForwardStep, _no_residual, forward_copy, moved, set_param_grads

MODES = ("exact", "fast")
# (mean - shift)^2 / var above which the fast mode's one-allreduce form loses more than ~2^20 eps_double of the
# variance: the exchange is then repeated relative to the mean just found
_SHIFT_RATIO = float(2 ** 20)
# the same for float64 data (on any rank): the variance then keeps the bits of the data's own type, within ~2^4 ulp
_SHIFT_RATIO_F64 = float(2 ** 4)
# must match the chunk geometry of src/batchnorm.c (BN_CHUNK_BYTES, BN_CL_CHUNK_BYTES, BN_CL_MIN_ROWS, BN_MIN_RUN,
# BN_CHUNK_MIN_PER_CHANNEL); tests/test_sync.py checks chunk_rows against batch_moments' counts
_CF_CHUNK_BYTES, _CL_CHUNK_BYTES, _CL_MIN_ROWS, _MIN_RUN, _MIN_PER_CHANNEL = 32768, 256 << 10, 64, 512, 256


# ---- communicators ------------------------------------------------------------------------------------------------

class MPICommunicator:
    """The protocol over an mpi4py communicator (``Allreduce`` in place with ``MPI.SUM``; ``Allgatherv`` after an
    ``Allgather`` of the lengths)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def allreduce(self, buf):
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def allgather(self, buf):
        sizes = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([buf.shape[0]], np.int64), sizes)
        out = np.empty(int(sizes.sum()), np.float64)
        self.comm.Allgatherv(buf, [out, sizes.tolist()])
        return np.split(out, np.cumsum(sizes)[:-1])

    def __repr__(self):
        return f"MPICommunicator(rank={self.rank}, size={self.size})"


class TorchCommunicator:
    """The protocol over a ``torch.distributed`` process group (None: the default group) with a CPU backend (gloo):
    ``all_reduce`` in place on a tensor sharing the buffer's memory; ``all_gather`` of the buffers padded to the
    longest after one of their lengths."""

    def __init__(self, group=None):
        import torch.distributed as dist
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def allreduce(self, buf):
        import torch
        import torch.distributed as dist
        dist.all_reduce(torch.from_numpy(buf), op=dist.ReduceOp.SUM, group=self.group)
        return buf

    def allgather(self, buf):
        import torch
        import torch.distributed as dist
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([buf.shape[0]], dtype=torch.int64), group=self.group)
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        mine = torch.zeros(longest, dtype=torch.float64)
        mine[:buf.shape[0]] = torch.from_numpy(buf)
        parts = [torch.empty(longest, dtype=torch.float64) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        return [p.numpy()[:s] for p, s in zip(parts, sizes)]

    def __repr__(self):
        return f"TorchCommunicator(rank={self.rank}, size={self.size})"


def _mpi_world():
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return MPICommunicator(mpi.COMM_WORLD)
    return None


def _torch_world():
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return TorchCommunicator(None)
    return None


def as_communicator(comm=None):
    """The protocol object for ``comm`` (see the module's documentation): an mpi4py communicator or a
    torch.distributed process group wrapped in its adapter, an object with ``allreduce`` and ``allgather`` as it is,
    None the initialised world (mpi4py's COMM_WORLD, else torch.distributed's default group).

    Raises RuntimeError when comm is None and neither library is initialised, TypeError for anything else."""
    if comm is None:
        world = _mpi_world() or _torch_world()
        if world is None:
            raise RuntimeError("comm=None needs an initialised communication library: MPI (import mpi4py.MPI, "
                               "which initialises it) or torch.distributed (init_process_group); neither is")
        return world
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(comm, mpi.Comm):
        if comm.Is_inter():  # (its collectives deliver the remote group's buffers: statistics of the other group)
            raise TypeError("comm must be an intra-communicator (mpi4py's Intracomm, COMM_WORLD or one split from "
                            "it), got an inter-communicator; merge its groups first (comm.Merge())")
        return MPICommunicator(comm)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and isinstance(comm, dist.ProcessGroup):
        return TorchCommunicator(comm)
    if callable(getattr(comm, "allreduce", None)) and callable(getattr(comm, "allgather", None)):
        return comm
    raise TypeError(f"comm must be an mpi4py communicator, a torch.distributed process group, an object with "
                    f"allreduce(buf) and allgather(buf) methods, or None; got {type(comm).__name__}")


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _setup(comm, mode, layout, what):
    """(communicator, layout) of a synced call, mode and layout checked. A refused mode or layout is raised after
    this rank took part in the first step every protocol starts with (an allgather of [ok, C, ...]), so that the
    other ranks raise RuntimeError there instead of waiting for it."""
    comm = as_communicator(comm)
    try:
        _check_mode(mode)
        return comm, ck.check_layout(layout)
    except (ValueError, TypeError) as e:
        _gather(comm, _Failed(e), 0, what)   # (raises e once the exchange is done)
        raise


# ---- failing together ---------------------------------------------------------------------------------------------

class _Failed:
    """A local error held back until the exchange is done (so that the other ranks are not left waiting)."""

    def __init__(self, error):
        self.error = error


def _attempt(fn, *args):
    """fn(*args), or its error held in a _Failed: any Exception (a refused argument, an array-like whose conversion
    raises, a MemoryError), so that this rank still takes part in the exchange; the error is raised after it."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (re-raised after the exchange)
        return _Failed(e)


def _raise_if_failed(local, failed, what):
    """failed: a description of the ranks that failed ("" when none did)."""
    if isinstance(local, _Failed):
        raise local.error
    if failed:
        raise RuntimeError(f"{what}: the input of {failed} was refused there (see its error); nothing was changed")


def _gather(comm, payload, C, what):
    """allgather of [ok, C, body...] per rank; returns the bodies in rank order after checking every rank's flag
    and channel count (RuntimeError on the ranks whose own input was fine)."""
    ok = not isinstance(payload, _Failed)
    head = np.array([1.0 if ok else 0.0, float(C)])
    buf = np.concatenate([head, payload if ok else np.empty(0)])
    parts = [np.asarray(p, np.float64) for p in comm.allgather(buf)]
    failed = [r for r, p in enumerate(parts) if p.shape[0] < 2 or p[0] != 1.0]
    _raise_if_failed(payload, f"rank(s) {failed}" if failed else "", what)
    channels = [int(p[1]) for p in parts]
    if any(c != C for c in channels):
        raise ValueError(f"{what}: the ranks' inputs have different channel counts {channels}")
    return [p[2:] for p in parts]


def _agree(comm, local, C, wide, what, key=0):
    """Fast mode's first step: an allgather of [ok, C, wide, key] per rank (4 values), so that every rank sees a
    failed rank or another channel count (the allreduce's length) before the allreduce, which would abort the job on
    buffers of different lengths, and raises alike. Returns whether any rank's data is float64 (wide), and whether
    every rank sent the same key (the forward's: a digest of its shift, an int below 2^48)."""
    body = np.array([1.0 if wide else 0.0, float(key)])
    heads = _gather(comm, local if isinstance(local, _Failed) else body, C, what)
    keys = {float(h[1]) if h.shape[0] > 1 else None for h in heads}
    return any(h.shape[0] > 0 and h[0] == 1.0 for h in heads), len(keys) == 1


def _shift_key(K):
    """The 48-bit digest of a shift's float64 bytes that fast mode's ranks compare (an int a float64 holds exactly)."""
    if isinstance(K, _Failed):
        return 0
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(K, np.float64).tobytes(), digest_size=6).digest(),
                          "little")


def _allreduce(comm, payload, size, what):
    """allreduce of [count, body...] (size values), after _agree: every rank's payload is there, of this length."""
    total = np.asarray(comm.allreduce(np.ascontiguousarray(payload, np.float64)), np.float64)
    if total.shape != (size,):
        raise RuntimeError(f"{what}: comm.allreduce returned shape {total.shape}, expected ({size},)")
    return total


# ---- chunk geometry -----------------------------------------------------------------------------------------------

def _view3(a, layout):
    """The (outer, C, inner) view of a C-contiguous array in a layout."""
    if layout == "NCHW":
        return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:])))
    return a.reshape(int(np.prod(a.shape[:-1])), a.shape[-1], 1)


def _chunks(outer, C, inner, itemsize):
    """The kernels' reduction chunks of an (outer, C, inner) array, in chunk order, as (r0, r1, i0, i1): rows
    [r0, r1) and positions [i0, i1) of each channel (of the view after C == 1 is flattened to (1, 1, n)).
    The same for statistics and backward sums, and for every thread count."""
    if C == 1:
        outer, inner = 1, outer * inner
    if outer * inner == 0 or C == 0:
        return []
    if inner == 1:
        R = max((_CL_CHUNK_BYTES // itemsize) // C, _CL_MIN_ROWS)
        return [(r, min(r + R, outer), 0, 1) for r in range(0, outer, R)]
    L = _CF_CHUNK_BYTES // itemsize
    cb = 1 if inner >= _MIN_RUN else min(-(-_MIN_RUN // inner), C)
    if inner > L:
        return [(r, r + 1, i, min(i + L, inner)) for r in range(outer) for i in range(0, inner, L)]
    R = min(-(-_MIN_PER_CHANNEL // inner), max(L // (cb * inner), 1))
    return [(r, min(r + R, outer), 0, inner) for r in range(0, outer, R)]


def chunk_rows(shape, layout="NCHW", dtype=np.float32):
    """Where an input of this shape may be split between ranks with exact mode's results bitwise those of one
    process: the number of leading rows (samples for channels-first; rows of the (N * spatial, C) matrix for
    channels-last) per chunk, so that every piece whose length is a multiple of it (except the last piece) ends on
    a chunk boundary. 1 for channels-first maps of 16x16 and larger. None when the chunks are not whole rows (a
    single channel, whose elements are chunked as one run); 0 for an empty shape."""
    layout = ck.check_layout(layout)
    itemsize = np.dtype(dtype).itemsize
    if layout == "NCHW":
        outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    else:
        outer, C, inner = int(np.prod(shape[:-1])), shape[-1], 1
    ch = _chunks(outer, C, inner, itemsize)
    if not ch:
        return 0
    if C == 1:
        return None
    r0, r1, i0, i1 = ch[0]
    return r1 - r0 if (i0, i1) == (0, inner) else 1


def backward_chunk_sums(grad_out, x, mean, *, layout="NCHW"):
    """Per-chunk (sum grad_out, sum grad_out * (x - mean[c])), a float64 array (K, 2, C): the partial sums that
    :func:`~bn_simd.backward_reduce` adds in chunk order (``sums.sum`` in that order is its result bitwise). For
    exact-mode SyncBatchNorm, whose ranks' chunks are added in the order of the whole batch.

    grad_out and x: same shape and dtype (float32/float64) in ``layout``; mean (C,) of a float dtype. Raises as
    :func:`~bn_simd.backward_reduce`."""
    layout = ck.check_layout(layout)
    xa, g = ck.as_data(x, "x"), ck.as_data(grad_out, "grad_out")
    if g.shape != xa.shape:
        raise ValueError(f"grad_out must have the shape of x {xa.shape}, got {g.shape}")
    if g.dtype != xa.dtype:
        raise TypeError(f"grad_out must have the dtype of x ({xa.dtype}), got {g.dtype}")
    F.backward_reduce(g[:0], xa[:0], mean, layout=layout)  # (rank, layout and mean, checked as usual)
    x3, g3 = _view3(xa, layout), _view3(g, layout)
    outer, C, inner = x3.shape
    if C == 1:
        x3, g3 = x3.reshape(1, 1, -1), g3.reshape(1, 1, -1)
    chunks = _chunks(outer, C, inner, xa.dtype.itemsize)
    if not chunks:
        return np.zeros((0, 2, C), np.float64)
    out = np.empty((len(chunks), 2, C), np.float64)
    if C > 1 and inner > 1 and all(r1 - r0 == 1 and (i0, i1) == (0, inner) for r0, r1, i0, i1 in chunks):
        # chunks of one row (channels-first maps of 16x16 and up): each channel's run in a row is then summed on
        # its own, as a channel of the (1, outer C, inner) view is, so one call gives every chunk's sums
        s = F.backward_reduce(g3.reshape(1, outer * C, inner), x3.reshape(1, outer * C, inner),
                              np.tile(np.asarray(mean, np.float64), outer), layout="NCHW")
        out[:, 0], out[:, 1] = s[0].reshape(outer, C), s[1].reshape(outer, C)
        return out
    for k, (r0, r1, i0, i1) in enumerate(chunks):
        # one chunk as a call of its own has exactly one chunk: its sums are the whole call's partial sums
        out[k, 0], out[k, 1] = F.backward_reduce(g3[r0:r1, :, i0:i1], x3[r0:r1, :, i0:i1], mean, layout="NCHW")
    return out


def _sum_in_order(parts, C):
    """sum over k of parts[k] (K, C), one after the other from 0.0: the kernels' order (not NumPy's pairwise)."""
    s = np.zeros(C, np.float64)
    for p in parts:
        s += p
    return s


# ---- the functional form ------------------------------------------------------------------------------------------

def _channels_of(x, layout):
    """x's channel count, or 0 where it has none (its own checks then refuse it, inside the exchange)."""
    try:
        shape = np.shape(x)
    except Exception:  # noqa: BLE001  (an array-like whose conversion raises: as_data raises it again, in _attempt)
        return 0
    if not 2 <= len(shape) <= 5:
        return 0
    return shape[1] if layout == "NCHW" else shape[-1]


def _local_moments(x, layout):
    m = F.batch_moments(x, layout=layout)
    return np.concatenate([[float(m.count.shape[0])], m.count, m.shift.ravel(), m.residual.ravel(), m.m2.ravel()])


def _local_fast(x, layout, shift):
    """([n_r, S1, S2] of this rank's piece relative to shift (see the module's Modes), whether x is float64)."""
    xa = ck.as_data(x, "x")
    mean_r, var_r = F.batch_stats(xa, layout=layout)
    C = mean_r.shape[0]
    n_r = float(xa.size // C) if C else 0.0
    K = _shift_array(shift, C)
    wide = xa.dtype == np.float64
    if n_r == 0:
        return np.zeros(2 * C + 1), wide
    d = mean_r - K
    with np.errstate(over="ignore"):  # (a variance beyond double's range is +Inf already)
        return np.concatenate([[n_r], n_r * d, n_r * var_r + n_r * d * d]), wide


def _shift_array(shift, C):
    if shift is None:
        return np.zeros(C)
    s = np.asarray(shift, dtype=np.float64)
    if s.shape != (C,):
        raise ValueError(f"shift must have shape ({C},), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("shift must hold finite values (a shift of Inf or NaN makes every sum relative to it NaN)")
    return s


def sync_batch_stats(x, comm=None, *, layout="NCHW", mode="exact", shift=None):
    """(mean, var, n) of the batch that the ranks' pieces x form, concatenated in rank order: float64 (C,) mean and
    biased variance per channel, and n, the number of values per channel over all ranks (an int). Every rank gets
    the same numbers. No values at all give NaN statistics.

    x : float32/float64 array of rank 2..5 in ``layout`` (channels on axis 1 for "NCHW", last for "NHWC"); the
        leading (batch) size may differ between ranks and be 0.
    comm : see the module's documentation (None: the initialised world).
    mode : "exact" (per-chunk moments gathered and merged in chunk order: bitwise one process's
        :func:`~bn_simd.batch_stats` when the pieces end on chunk boundaries) or "fast" (an allgather of 4 values,
        then one allreduce of 2 C + 1 values, relative to ``shift``).
    shift : fast mode's shift (C,), the same on every rank (None: zeros; shifts that differ between ranks make every
        rank take the exact exchange); the closer to the mean, the fewer bits lost (a second allreduce restores them
        when it is more than 1000 standard deviations away, 4 when any rank's data is float64).

    Raises ValueError/TypeError for a bad x, mode or shift on that rank, RuntimeError on the others.
    """
    comm, layout = _setup(comm, mode, layout, "sync_batch_stats")
    C = _channels_of(x, layout)
    mean, var, n, _ = _exchange_stats(comm, x, C, layout, mode, shift, "sync_batch_stats")
    return mean, var, n


def _exchange_stats(comm, x, C, layout, mode, shift, what):
    """(mean, var, n, allreduces) over the ranks; see sync_batch_stats."""
    if mode == "exact":
        bodies = _gather(comm, x if isinstance(x, _Failed) else _attempt(_local_moments, x, layout), C, what)
        parts = []
        for b in bodies:
            K = int(b[0])
            count = b[1:1 + K]
            rest = b[1 + K:].reshape(3, K, C)
            parts.append(F.Moments(count, rest[0], rest[1], rest[2]))
        mean, var = F.merge_moments(parts)
        n = int(sum(p.count.sum() for p in parts))
        return mean, var, n, 0
    K = x if isinstance(x, _Failed) else _attempt(_shift_array, shift, C)
    local = _attempt(_local_fast, x, layout, shift) if not isinstance(K, _Failed) else K
    wide, same = _agree(comm, local, C, not isinstance(local, _Failed) and local[1], what, _shift_key(K))
    if not same:  # (ranks holding different shifts would sum S1 and S2 relative to different points: every rank
        # sees the same keys and takes the exact exchange, which has no shift)
        mean, var, n, _ = _exchange_stats(comm, x, C, layout, "exact", None, what)
        return mean, var, n, 0
    ratio = _SHIFT_RATIO_F64 if wide else _SHIFT_RATIO
    size = 2 * C + 1
    total = _allreduce(comm, local[0], size, what)
    rounds = 1
    n = total[0]
    if n > 0 and np.any(np.isinf(total[1:1 + C])):
        # (S1 beyond double's range: the data so far from the shift, or so large, that the sums overflowed; every
        # rank sees the same total and takes the exact exchange, which adds no such sums)
        mean, var, n, _ = _exchange_stats(comm, x, C, layout, "exact", None, what)
        return mean, var, n, rounds  # (the exact exchange is an allgather: no more allreduces)
    if n > 0:
        mean, var, far = _fast_finish(total, K, C, ratio)
        if far:
            # the shift was far from the mean for some channel: again, relative to the mean (the same on every rank;
            # a channel whose mean is not finite, NaN data say, keeps the first shift: its statistics stay NaN)
            shift = np.where(np.isfinite(mean), mean, K)
            total = _allreduce(comm, _local_fast(x, layout, shift)[0], size, what)
            rounds = 2
            mean, var, _ = _fast_finish(total, shift, C, ratio)
    else:
        mean = var = np.full(C, np.nan)
    return mean, var, int(n), rounds


def _fast_finish(total, K, C, ratio):
    """From the summed [n, S1, S2] relative to K: mean = K + S1 / n, var = (S2 - S1^2 / n) / n, and whether the
    subtraction lost more than about ratio eps_double of the variance ((mean - K)^2 > ratio var)."""
    n, s1, s2 = total[0], total[1:1 + C], total[1 + C:]
    with np.errstate(over="ignore", invalid="ignore"):
        m = s1 / n
        between = s1 * m  # S1^2 / n
        m2 = s2 - between
        # (squares of finite deviations beyond double's range: an infinite variance, as the kernels give)
        m2 = np.where(np.isnan(m2) & (s2 == np.inf) & np.isfinite(s1), np.inf, m2)
    var = np.maximum(m2, 0.0) / n
    with np.errstate(invalid="ignore"):
        # (an S2 or S1^2 / n beyond double's range with a finite S1: the shift so far from the mean that the squares
        # overflowed, which the exchange relative to the mean may not)
        far = bool(np.any(between > ratio * np.maximum(m2, 0.0)) or
                   np.any(np.isfinite(s1) & (np.isinf(s2) | np.isinf(between))))
    return K + m, var, far


def sync_backward_reduce(grad_out, x, mean, comm=None, *, layout="NCHW", mode="exact"):
    """(sum_dy, sum_dyxm, n) over every rank: float64 (C,) sums of grad_out and grad_out * (x - mean[c]) over the
    concatenated batch, and the number of values per channel. Every rank gets the same numbers.

    grad_out, x : the rank's pieces, same shape and dtype (float32/float64) in ``layout``.
    mean : (C,) the batch mean every rank shares (from :func:`sync_batch_stats`).
    mode : "exact" (per-chunk sums gathered and added in chunk order: bitwise one process's
        :func:`~bn_simd.backward_reduce` when the pieces end on chunk boundaries) or "fast" (an allgather of 4
        values, then one allreduce of 2 C + 1 values: the count and the two sums).

    Raises as :func:`sync_batch_stats`.
    """
    comm, layout = _setup(comm, mode, layout, "sync_backward_reduce")
    return _exchange_grad(comm, grad_out, x, mean, _channels_of(x, layout), layout, mode, "sync_backward_reduce")


def _local_chunk_sums(grad_out, x, mean, layout):
    s = backward_chunk_sums(grad_out, x, mean, layout=layout)
    C = s.shape[2]
    n = float(ck.as_data(x, "x").size // C) if C else 0.0
    return np.concatenate([[n, float(s.shape[0])], s.ravel()])


def _local_grad_sums(grad_out, x, mean, layout):
    sdy, sdyx = F.backward_reduce(grad_out, x, mean, layout=layout)
    C = sdy.shape[0]
    n = float(ck.as_data(x, "x").size // C) if C else 0.0
    return np.concatenate([[n], sdy, sdyx])


def _exchange_grad(comm, grad_out, x, mean, C, layout, mode, what, failed=None, own=None):
    """(sum_dy, sum_dyxm, n) over the ranks; see sync_backward_reduce. failed: this rank's input was refused. own: a
    list that receives this rank's own (sum_dy, sum_dyxm) (PyTorch's SyncBatchNorm returns the parameter gradients of
    the rank's piece, which data-parallel training then averages)."""
    if mode == "exact":
        local = failed or _attempt(_local_chunk_sums, grad_out, x, mean, layout)
        bodies = _gather(comm, local, C, what)
        n = int(sum(b[0] for b in bodies))
        parts = np.concatenate([b[2:].reshape(int(b[1]), 2, C) for b in bodies])
        if own is not None:  # (local is intact: the gather copies)
            mine = local[2:].reshape(int(local[1]), 2, C)
            own[:] = [_sum_in_order(mine[:, 0], C), _sum_in_order(mine[:, 1], C)]
        return _sum_in_order(parts[:, 0], C), _sum_in_order(parts[:, 1], C), n
    local = failed or _attempt(_local_grad_sums, grad_out, x, mean, layout)
    _agree(comm, local, C, False, what)  # (the backward has no shift: its key is 0 on every rank)
    if own is not None:  # (before the allreduce, which may reduce in place)
        own[:] = [local[1:1 + C].copy(), local[1 + C:].copy()]
    total = _allreduce(comm, local, 2 * C + 1, what)
    return total[1:1 + C].copy(), total[1 + C:].copy(), int(total[0])


def sync_batch_norm_forward(x, weight=None, bias=None, comm=None, *, eps=1e-5, layout="NCHW", mode="exact", out=None,
                            shift=None):
    """Training forward over the ranks' concatenated batch: stats -> merge -> normalise.

    Returns (y, mean, invstd, n): y the rank's piece normalised (x's shape and dtype; ``out`` if given), mean and
    invstd = 1 / sqrt(var + eps) float64 (C,) (pass them to :func:`sync_batch_norm_backward`), n the values per
    channel over all ranks. weight, bias: (C,) or None. Other arguments as :func:`sync_batch_stats`. Raises
    ValueError when n is 1 (as one process's training call), and as :func:`sync_batch_stats`.
    """
    comm, layout = _setup(comm, mode, layout, "sync_batch_norm_forward")
    C = _channels_of(x, layout)
    xa = _attempt(_forward_checks, x, weight, bias, eps, layout, out, C)
    mean, var, n, _ = _exchange_stats(comm, xa, C, layout, mode, shift, "sync_batch_norm_forward")
    _check_count(n, np.shape(x))
    y = F.normalize(xa, mean, var, weight, bias, eps=eps, layout=layout, out=out)
    return y, mean, 1.0 / np.sqrt(var + ck.check_eps(eps)), n


def _forward_checks(x, weight, bias, eps, layout, out, C):
    """The checks of sync_batch_norm_forward's normalise, on this rank before the exchange (a refusal there would
    leave the other ranks a step ahead); returns x as the kernels read it."""
    xa = ck.as_data(x, "x")
    ck.per_channel(weight, "weight", C)
    ck.per_channel(bias, "bias", C)
    ck.check_eps(eps)
    if out is not None:
        ck.check_out(out, xa, [("x", xa)])
    return xa


def _backward_checks(grad_out, x, mean, invstd, weight, out, C):
    """The checks of sync_batch_norm_backward's apply, on this rank before the exchange (as _forward_checks)."""
    xa, g = ck.as_data(x, "x"), ck.as_data(grad_out, "grad_out")
    for v, name in ((mean, "mean"), (invstd, "invstd")):
        if ck.per_channel(v, name, C) is None:
            raise TypeError(f"{name} must be an array of shape ({C},), got None")
    ck.per_channel(weight, "weight", C)
    if out is not None:
        ck.check_out(out, xa, [("grad_out", g), ("x", xa)])
    return None


def _check_count(n, shape):
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got 1 over all ranks (this "
                         f"rank's input has shape {shape})")


def sync_batch_norm_backward(grad_out, x, mean, invstd, weight=None, comm=None, *, layout="NCHW", mode="exact",
                             out=None):
    """Backward of :func:`sync_batch_norm_forward`: reduce -> exchange -> coefficients -> apply.

    With n values per channel over all ranks, s = invstd, w = weight (1 when None), x̂ = (x - mean) s, the sums
    over every rank's values: grad_bias = sum grad_out, grad_weight = sum grad_out x̂, and on each rank
    grad_x = w s (grad_out - grad_bias / n - x̂ grad_weight / n).

    Returns (grad_x, grad_weight, grad_bias): grad_x the rank's piece (``out`` if given: may be grad_out or x), the
    parameter gradients (the same on every rank) in weight's dtype (x's without weight). Raises as
    :func:`sync_batch_stats`.
    """
    comm, layout = _setup(comm, mode, layout, "sync_batch_norm_backward")
    C = _channels_of(x, layout)
    failed = _attempt(_backward_checks, grad_out, x, mean, invstd, weight, out, C)
    sdy, sdyx, n = _exchange_grad(comm, grad_out, x, mean, C, layout, mode, "sync_batch_norm_backward", failed=failed)
    return _apply_grad(grad_out, x, mean, invstd, weight, sdy, sdyx, n, layout, out)


def _apply_grad(grad_out, x, mean, invstd, weight, sdy, sdyx, n, layout, out):
    xa = ck.as_data(x, "x")
    if n == 0:
        gx = F.backward_apply(grad_out, xa, mean, np.zeros(sdy.shape), np.zeros(sdy.shape), np.zeros(sdy.shape),
                              layout=layout, out=out)
        gw, gb = np.zeros(sdy.shape), np.zeros(sdy.shape)
    else:
        m, a, b, d, gw, gb = F.backward_coefficients(sdy, sdyx, mean, invstd, n, weight, training=True,
                                                     dtype=xa.dtype)
        gx = F.backward_apply(grad_out, xa, m, a, b, d, layout=layout, out=out)
    like = np.asarray(weight).dtype if weight is not None else xa.dtype
    return gx, gw.astype(like), gb.astype(like)


# ---- the layer ----------------------------------------------------------------------------------------------------

class SyncBatchNorm(BatchNorm):
    """Batch normalization over the batch that several processes' pieces form (``torch.nn.SyncBatchNorm``, on CPU).

    Parameters as :class:`~bn_simd.BatchNorm` (num_features, eps, momentum, affine, track_running_stats, layout,
    dtype, unbiased_running_var, bias), and
    comm : an mpi4py communicator, a torch.distributed process group, an object implementing the protocol of
        :mod:`bn_simd.sync`, or None: the world of whichever library is initialised, looked up at each call.
    mode : "exact" or "fast" (see :mod:`bn_simd.sync`).

    Virtual batches, renormalization, fused activations and ``axis=`` are not offered here (``layout=`` is).

    Whenever batch statistics are used (training mode, or eval without running statistics) every rank must call
    the layer, and later ``backward``, together; each gets its own piece of y and grad_x, and the statistics,
    grad_weight, grad_bias and running statistics of one process normalising the pieces concatenated in rank
    order. Pieces may differ in size, including 0. An eval-mode call with running statistics communicates nothing.
    Inputs of rank 2..5 in ``layout``. Errors as :class:`~bn_simd.BatchNorm`; a rank whose input is refused raises
    its own error and the others RuntimeError (nothing changed on any).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *, comm=None,
                 layout="NCHW", dtype=np.float32, mode="exact", unbiased_running_var=True, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout=layout, dtype=dtype,
                         unbiased_running_var=unbiased_running_var, bias=bias)
        if comm is not None:
            as_communicator(comm)  # (refuse a wrong type now, not at the first call)
        self.comm = comm
        self.mode = mode
        # fast mode's shift: the previous call's mean, the same on every rank (see the module's documentation)
        self._shift = np.zeros(self.num_features)
        self._sync_n = None  # values per channel over the ranks in the last call that communicated, else None

    @property
    def mode(self):
        """"exact" or "fast" (see :mod:`bn_simd.sync`); the same on every rank."""
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = _check_mode(value)

    def _check_plain(self):
        """The attributes SyncBatchNorm lacks (set on it after construction), refused in eval and training alike."""
        if self.activation is not None or self.axis is not None:
            raise ValueError(f"SyncBatchNorm has no fused activation and no axis= (layout= only): activation and axis "
                             f"must be None, got {self.activation!r} and {self.axis!r}")

    def _reading(self):
        return self.layout  # (no axis: _check_plain refuses one)

    def _local_forward(self, x, out):
        """This rank's checks before the exchange: the layer's state, x and out (a refusal here still takes part in
        the exchange, as a failure: _attempt)."""
        self._check_plain()
        if getattr(self, "renorm", False) or getattr(self, "virtual_batch_size", None) is not None:
            raise ValueError("SyncBatchNorm has no virtual batches or renormalization: virtual_batch_size must be None "
                             "and renorm False")
        self._check_state()
        xa = self._check_input(x)
        if out is not None:
            ck.check_out(out, xa, [("x", xa)])
        if self.training and self.track_running_stats:
            ck.stats_apart(out, (("running_mean", self.running_mean), ("running_var", self.running_var)))
        return xa

    def forward(self, x, *, out=None):
        """Normalise this rank's piece x; returns y (``out`` if given). Communicates when batch statistics are
        used (every rank must call it then)."""
        # BatchNorm's rules: eval mode normalises with the running statistics whenever the layer holds them
        held = self.running_mean is not None or self.running_var is not None
        try:
            self.training = ck.check_flag(self.training, "training")
        except Exception as e:
            # (refused on this rank alone. Without running statistics every rank communicates, in training or eval:
            # this one takes part in the exchange as a failure, and the others raise RuntimeError instead of waiting.
            # With them, whether the others communicate depends on their own flags: raised here, before any exchange)
            if not held:
                try:
                    comm = as_communicator(self.comm)
                except Exception:  # noqa: BLE001 (no communicator: this rank's own error is the one to see)
                    raise e from None
                _exchange_stats(comm, _Failed(e), self.num_features, self.layout, self.mode, None, "SyncBatchNorm")
            raise
        if not self.training and held:
            self._check_plain()
            y = super().forward(x, out=out)
            self._sync_n = None
            return y
        comm = as_communicator(self.comm)
        # (from the exchange on, where a Ctrl-C is likeliest: no earlier state for backward)
        with ForwardStep(self, watch=self._updated(self.training and self.track_running_stats and held)) as step:
            return self._synced_forward(comm, x, out, held, step.watched)

    def _synced_forward(self, comm, x, out, held, stats):
        """forward's exchange and normalise (inside its ForwardStep; stats: its snapshot of the running statistics)."""
        xa = _attempt(self._local_forward, x, out)
        mean, var, n, _ = _exchange_stats(comm, xa, self.num_features, self.layout, self.mode, self._shift,
                                          "SyncBatchNorm")
        _check_count(n, xa.shape)
        update = self.training and self.track_running_stats and held
        momentum = 0.0 if not update else (
            self.momentum if self.momentum is not None else
            1.0 / (self.num_batches_tracked + 1) if self.num_batches_tracked is not None else 0.0)
        saved_x = xa.copy() if out is not None and np.may_share_memory(out, xa) else xa
        fw = forward_copy(self.weight)  # (before the normalise: out may be the weight's memory)
        # (an interrupt during the normalise is raised as it returns, before the count and statistics move; the count
        # moves before the update, as in PyTorch, so one raised as the update returns finds both moved)
        y = F.normalize(xa, mean, var, self.weight, self.bias, eps=self.eps, layout=self.layout, out=out)
        counted, count = self._counts(), self.num_batches_tracked
        try:
            if counted:
                self.num_batches_tracked = count + 1
            if update and n > 0:
                F.update_running_stats(self.running_mean, self.running_var, mean, var, n, momentum,
                                       unbiased=self.unbiased_running_var)
        except Exception:
            if counted and not moved(stats):  # (a refusal; a signal handler's exception as it returned: kept)
                self.num_batches_tracked = count
            raise
        if n > 0 and np.all(np.isfinite(mean)):
            self._shift = mean
        self._saved = (saved_x, mean, 1.0 / np.sqrt(var + self.eps), True)
        self._fwd_weight = fw
        self._sync_n = n
        return y

    __call__ = forward

    def _local_backward(self, grad_out, x, out, grad_residual_out=None):
        _no_residual(grad_residual_out)  # (no residual in a synchronised forward)
        g = ck.as_data(grad_out, "grad_out")
        if g.shape != x.shape:
            raise ValueError(f"grad_out must have the shape of x {x.shape}, got {g.shape}")
        if g.dtype != x.dtype:
            raise TypeError(f"grad_out must have the dtype of x ({x.dtype}), got {g.dtype}")
        if out is not None:
            ck.check_out(out, x, [("grad_out", g), ("x", x)])
        return None

    def backward(self, grad_out, *, out=None, grad_residual_out=None):
        """Gradient of the last forward call: returns this rank's grad_x and sets grad_weight / grad_bias (the
        whole batch's, the same on every rank). Communicates after a call that did (every rank must call it).
        grad_residual_out: as BatchNorm.backward's (the forward has no residual: only None is accepted)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        if self._sync_n is None:
            return super().backward(grad_out, out=out, grad_residual_out=grad_residual_out)
        x, mean, invstd, _ = self._saved
        n = self._sync_n
        comm = as_communicator(self.comm)
        failed = _attempt(self._local_backward, grad_out, x, out, grad_residual_out)
        lay = self._fwd_route  # (the forward's layout: ForwardStep)
        sdy, sdyx, _ = _exchange_grad(comm, grad_out, x, mean, self.num_features, lay, self.mode,
                                      "SyncBatchNorm.backward", failed)
        gx, gw, gb = _apply_grad(grad_out, x, mean, invstd, self._fwd_weight, sdy, sdyx, n, lay, out)
        set_param_grads(self, gw, gb)
        return gx

    def __repr__(self):
        return super().__repr__()[:-1] + f", mode={self.mode!r})"

    @classmethod
    def convert_sync_batchnorm(cls, layer_or_layers, comm=None, *, mode="exact"):
        """Layers with every :class:`~bn_simd.BatchNorm` (not the instance norms) replaced by a SyncBatchNorm
        that shares its parameter and running-statistic arrays (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``)
        and keeps its settings, mode (train/eval) and num_batches_tracked.

        layer_or_layers : a layer, or a list, tuple (a namedtuple too) or dict of them (nested containers too): the
            same kind of container is returned with its entries converted; a layer found at several places becomes
            one SyncBatchNorm at each of them. Anything else is returned as it is.

        Raises ValueError for a BatchNorm with virtual batches, renormalization, a fused activation or axis= (which
        SyncBatchNorm lacks); nothing is changed.
        """
        _check_mode(mode)
        if comm is not None:
            as_communicator(comm)
        return _convert(layer_or_layers, comm, mode, {})


def _convert(obj, comm, mode, done):
    """done: id(layer) -> its SyncBatchNorm, so that a layer at several places stays one layer (one
    num_batches_tracked)."""
    from .layers import _InstanceNorm
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, BatchNorm) and not isinstance(obj, (_InstanceNorm, SyncBatchNorm)):
        if getattr(obj, "renorm", False) or getattr(obj, "virtual_batch_size", None) is not None:
            raise ValueError(f"cannot convert {obj!r}: SyncBatchNorm has no virtual batches or renormalization "
                             f"(virtual_batch_size={getattr(obj, 'virtual_batch_size', None)}, "
                             f"renorm={getattr(obj, 'renorm', False)})")
        if obj.activation is not None or obj.axis is not None:
            raise ValueError(f"cannot convert {obj!r}: SyncBatchNorm has no fused activation and no axis= (layout= "
                             f"only), got activation={obj.activation!r}, axis={obj.axis!r}")
        new = SyncBatchNorm(obj.num_features, obj.eps, obj.momentum, obj.affine, obj.track_running_stats, comm=comm,
                            layout=obj.layout, dtype=obj.dtype, mode=mode,
                            unbiased_running_var=obj.unbiased_running_var)
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "training"):
            setattr(new, k, getattr(obj, k))
        done[id(obj)] = new
        return new
    if isinstance(obj, dict):
        return type(obj)((k, _convert(v, comm, mode, done)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):   # (a namedtuple: built from its fields)
        return type(obj)._make(_convert(v, comm, mode, done) for v in obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, comm, mode, done) for v in obj)
    return obj
