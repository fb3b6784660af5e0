"""Functional batch normalization on NumPy arrays.

Layouts: ``layout="NCHW"`` puts channels on axis 1 ((N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W));
``layout="NHWC"`` puts them last ((N, C), (N, L, C), (N, H, W, C), (N, D, H, W, C)). "channels_first" and
"channels_last" are accepted as aliases. ``axis=a`` instead (an int, negative counting from the end; exclusive
with a layout other than the default, the string "NCHW") puts them on any axis of an array of rank 1 to 8: the
statistics run over every other axis. A rank-1 array (C,) with axis=0 or -1 is C channels of one value each (as
Keras sees it).

``mask=`` (batch_norm, batch_norm_forward, batch_norm_backward, batch_stats, batch_moments): statistics over the
unmasked entries only, Keras' masking: the mask has x's shape without the channel axis (or a shape broadcasting to
it, rank for rank), nonzero where an entry counts; every entry is normalised with those statistics.

Data arrays are float32 or float64, or float16 / bfloat16 storage (computed in float32, statistics float32), and
the output has the input's dtype. A C-contiguous input is used in
place; any other (Fortran order, negative or zero strides, byte-swapped) is copied once. Per-channel
arrays may have any floating-point dtype. Statistics are computed and combined in float64.

The high-level calls are built from four steps, each usable alone (for example a cross-process
SyncBatchNorm runs :func:`batch_stats`, all-reduces, then :func:`normalize`):
:func:`batch_stats`, :func:`normalize`, :func:`backward_reduce`, :func:`backward_apply`.
"""
import numpy as np

from . import _args as ck
from . import _config, _core, _masked
from . import _epilogue as _epi


def _threads():
    # (no context open in any thread: the module setting, without the thread-local lookup's cost)
    if _config._open_contexts:
        return _config._call_threads()
    n = _config._num_threads
    return 0 if n is None else n


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, layout="NCHW", out=None, unbiased_running_var=True, axis=None, mask=None,
               activation=None, residual=None):
    """Batch normalization with PyTorch's semantics (``torch.nn.functional.batch_norm``).

    y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]

    training=True: mean/var are the batch statistics over every axis but the channel axis (biased variance),
    and running_mean / running_var, when given, are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance
    (``unbiased_running_var=False`` stores the biased one, as Keras does).
    training=False: mean/var are running_mean / running_var (both required).

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, rank 2..5 in ``layout`` (rank 1..8 with ``axis``).
    running_mean, running_var : ndarray (C,) of a float dtype, or None; updated in place when training (then
        sharing no byte with each other, nor with out).
    weight, bias : array (C,) or None (1 and 0).
    training : bool.
    momentum : float in [0, 1] where running statistics are updated; elsewhere (training=False, or no running
        statistics) only its type is checked, its value being unused (as in PyTorch).
    eps : float > 0.
    out : ndarray shaped and typed like x, C-contiguous; may be x itself (in place).
    axis : int or None. The channel axis (negative counts from the end), instead of ``layout``.
    mask : array or None. Training: the statistics are those of the unmasked entries (nonzero), n of them per
        channel, and the running variance moves towards var * n / (n - 1) (unbiased) or var. The mask has x's
        shape without the channel axis, or broadcasts to it; it is checked and unused when training=False.
    activation : None, "relu", "relu6", ("leaky_relu", slope), ("clamp", lo, hi) or "silu" (see
        :mod:`bn_simd._epilogue`): y = act(normalised x + residual), fused into the normalise sweep (no extra pass
        over memory), computed in float32 (float64 for float64 x) and rounded once. Unknown names raise ValueError
        naming ``activation``.
    residual : array or None, x's shape and dtype (another memory order is copied), added before the activation
        (ResNet's relu(bn(x) + identity)); it must not share memory with ``out``. Neither combines with ``mask``.

    Returns y (``out`` if given). Raises TypeError for wrong types/dtypes and ValueError for wrong shapes or
    values, including training with one value (or unmasked value) per channel, and an axis beside a layout other
    than "NCHW"; a call that raises changes nothing.
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    training = ck.check_flag(training, "training")
    if training:  # (read only where it is used, as momentum's value)
        unbiased_running_var = ck.check_flag(unbiased_running_var, "unbiased_running_var")
    if activation is not None or residual is not None:
        act = _epi.parse(activation)
        _no_mask(mask)
        return _core.batch_norm_epi(x, running_mean, running_var, weight, bias, training, momentum, eps, lay, out,
                                    unbiased_running_var, act, residual, _threads())
    if mask is not None:
        if training:
            return _masked.forward(x, running_mean, running_var, weight, bias, momentum, eps, lay, out,
                                   unbiased_running_var, mask, _threads())[0]
        _masked.prepare(x, lay, mask)
    return _core.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, lay, out,
                            unbiased_running_var, _threads())


def _no_mask(mask):
    if mask is not None:
        raise ValueError("mask= does not combine with activation= or residual=")


def update_running_stats(running_mean, running_var, mean, var, n, momentum, *, unbiased=True):
    """running = (1 - momentum) running + momentum batch, in float64, stored in the arrays' dtypes.

    running_mean, running_var : writeable ndarrays (C,) of a float dtype, updated in place.
    mean, var : arrays (C,) of a float dtype: the batch mean and biased variance of n values each; with
        unbiased=True the variance moved towards is var * n / (n - 1) (for n > 1).
    n : the whole number of values >= 0 (an int, or an integral float); n = 0 (an empty batch has no statistics)
        leaves the running statistics as they are, as PyTorch's batch norm does with an empty batch.
    momentum : float in [0, 1].

    The formula :func:`batch_norm` applies. Raises TypeError for wrong types/dtypes and ValueError for wrong shapes
    or values; a call that raises changes nothing.
    """
    _core.update_running_stats(running_mean, running_var, mean, var, n, momentum,
                               ck.check_flag(unbiased, "unbiased"))


def batch_norm_forward(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None, axis=None, mask=None,
                       activation=None, residual=None):
    """Training forward for callers that run their own autograd.

    Returns (y, save_mean, save_invstd): y normalised with the batch statistics (of the unmasked entries when
    ``mask`` is given), save_mean[c] the batch mean and save_invstd[c] = 1 / sqrt(biased_var[c] + eps), both (C,)
    in x's dtype (float32 for 16-bit x), ready for :func:`batch_norm_backward` (which needs the same mask).
    ``axis``, ``mask`` and what raises: as :func:`batch_norm`.

    With ``activation`` or ``residual`` (as :func:`batch_norm`: y = act(normalised x + residual) in the same sweep),
    returns (y, save_mean, save_invstd, save_stats): save_stats = (mean, var), the batch mean and biased variance as
    float64 (C,) arrays, from which :func:`batch_norm_backward` recomputes the forward's coefficients bit for bit
    (so the backward reads no mask and no saved output: the activation's gradient comes from x).
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    if activation is not None or residual is not None:
        act = _epi.parse(activation)
        _no_mask(mask)
        return _core.batch_norm_forward_epi(x, weight, bias, eps, lay, out, act, residual, _threads())
    if mask is not None:
        y, mean, invstd, _ = _masked.forward(x, None, None, weight, bias, 0.0, eps, lay, out, False, mask,
                                             _threads())
        with np.errstate(all="ignore"):  # (an invstd beyond y's dtype is its Inf, silently, as the kernels store it)
            return y, mean.astype(y.dtype), invstd.astype(y.dtype)
    return _core.batch_norm_forward(x, weight, bias, eps, lay, out, _threads())


def batch_norm_backward(grad_out, x, save_mean, save_invstd, weight=None, *, layout="NCHW", out=None,
                        training=True, axis=None, mask=None, activation=None, residual=None, bias=None, eps=1e-5,
                        save_stats=None, grad_residual_out=None):
    """Gradients of batch normalization.

    With n values per channel, s = save_invstd[c], w = weight[c] (1 when None), x̂ = (x - save_mean[c]) s:
        grad_bias[c]   = sum grad_out
        grad_weight[c] = sum grad_out * x̂
        grad_x         = w s (grad_out - grad_bias / n - x̂ grad_weight / n)       (training=True)
        grad_x         = w s grad_out                                             (training=False: the
                         statistics were running statistics, constants; pass save_mean = running_mean and
                         save_invstd = 1 / sqrt(running_var + eps))

    grad_out and x: same shape and dtype (float32, float64, float16 or bfloat16). Returns (grad_x, grad_weight,
    grad_bias); the per-channel gradients have weight's dtype (x's when weight is None; float32 for 16-bit x). ``out``
    receives grad_x and may be grad_out or x itself (with an activation, not the residual's memory, even where the
    residual is x: refused, as the residual is read again after grad_x's first writes). ``axis``: as :func:`batch_norm`.
    ``mask`` (training=True): the forward's mask; n is then the number of unmasked positions and the statistics' terms
    (grad_bias / n, x̂ grad_weight / n) reach the unmasked entries only, while grad_weight and grad_bias sum over every
    entry (each was normalised).

    Through a fused epilogue z = act(batch_norm(x) + residual) (grad_out is dL/dz): pass the forward's
    ``activation`` and ``residual`` (the array itself: u = normalised x + residual is recomputed from them), and, with
    an activation, its ``save_stats`` (:func:`batch_norm_forward`'s fourth value; for training=False the running
    (mean, var) the forward used, as float64), ``bias`` and ``eps``: the forward's coefficients are recomputed from
    them bit for bit, and du = grad_out * act'(u) (``act'`` at the kinks: 0 for clamp/relu/relu6 at u = lo or hi,
    the slope for leaky_relu at 0, as torch.relu, relu6, Hardtanh and leaky_relu; torch.clamp's own derivative is
    1 at its bounds; at u = +-Inf and NaN PyTorch's too: relu passes grad_out at +Inf and NaN, leaky_relu gives
    1 at +Inf and the slope at -Inf and NaN, relu6 and a clamp of two bounds 0 at NaN (Hardtanh's vectorized
    backward), a clamp with only a lower bound grad_out at NaN, as relu; a clamp's lo = -inf and hi = +inf are no
    bounds) becomes the normalisation's grad_out. Returns (grad_x, grad_weight,
    grad_bias, grad_residual), grad_residual = du (None without a residual); save_mean and save_invstd are then
    unused with an activation (they may be None). Neither combines with ``mask``. ``grad_residual_out`` (with a
    residual) receives grad_residual instead of a new array, as ``out`` receives grad_x: x's shape and dtype,
    C-contiguous, aligned, writeable, and sharing no memory with grad_out, x, the residual or ``out`` (a training loop
    that reuses it saves the allocation and the page clearing of a new tensor-sized array at every step). A refused
    call writes nothing; a MemoryError from the kernels' scratch may leave ``out`` and ``grad_residual_out`` partly
    written.
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    if activation is not None or residual is not None:
        act = _epi.parse(activation)
        _no_mask(mask)
        if activation is not None:
            m, v = _epi.save_stats_of(save_stats, 2, "(mean, var) pair", "batch_norm_forward's fourth value")
            return _core.batch_norm_backward_epi(grad_out, x, m, v, eps, weight, bias, lay,
                                                 out, training, act, residual, _threads(), grad_residual_out)
        return _epi.residual_backward(
            _core, lambda o: _core.batch_norm_backward(grad_out, x, save_mean, save_invstd, weight, lay, o, training,
                                                       _threads()),
            grad_out, x, residual, grad_residual_out, out)
    _epi.no_grad_residual_out(grad_residual_out)
    if mask is not None:
        if training:
            return _masked.backward(grad_out, x, save_mean, save_invstd, weight, lay, out, mask, _threads())
        _masked.prepare(x, lay, mask)
    return _core.batch_norm_backward(grad_out, x, save_mean, save_invstd, weight, lay, out, training, _threads())


# ---- composable steps -------------------------------------------------------------------------------------

def batch_stats(x, *, layout="NCHW", axis=None, mask=None):
    """Per-channel (mean, biased variance) of x as float64 arrays of shape (C,).

    Exact two-pass sums inside fixed chunks, chunks combined in float64 (Chan et al.); bitwise the same
    for any thread count and the same numbers :func:`batch_norm` uses. An empty batch gives NaN. ``axis``,
    ``mask``: as :func:`batch_norm` (a mask selecting no entry gives NaN).
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    if mask is not None:
        xa, view, pos, n, every = _masked.prepare(x, lay, mask)
        return _masked.stats(xa, lay, view, pos, every, _threads())
    return _core.batch_stats(x, lay, _threads())


def normalize(x, mean, var, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None, axis=None):
    """y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c] with given statistics (one pass).

    mean, var, weight, bias: arrays (C,) of a float dtype (weight and bias may be None). Returns y, x's shape and
    dtype (``out`` if given). ``axis`` and what raises: as :func:`batch_norm`.
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    return _core.normalize(x, mean, var, weight, bias, eps, lay, out, _threads())


def backward_reduce(grad_out, x, mean, *, layout="NCHW", axis=None):
    """(sum grad_out, sum grad_out * (x - mean[c])) per channel, float64 arrays of shape (C,).

    grad_out and x: same shape and dtype; mean: array (C,) of a float dtype. ``axis`` and what raises: as
    :func:`batch_norm_backward`.
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    return _core.backward_reduce(grad_out, x, mean, lay, _threads())


def backward_apply(grad_out, x, mean, a, b, d, *, layout="NCHW", out=None, axis=None):
    """grad_x = a[c] * grad_out + b[c] * (x - mean[c]) + d[c] (coefficients rounded to x's dtype).

    mean, a, b, d: arrays (C,) of a float dtype. The kernel subtracts m = mean rounded to x's dtype, and the
    rounding's residual is folded into d (d - b (mean - m), in float64). Coefficients that are not finite in x's
    dtype are rounded by NumPy, which reports the overflow as ``np.errstate`` says. Returns grad_x, x's shape and
    dtype (``out`` if given: a separate array, grad_out or x itself). ``axis`` and what raises: as
    :func:`batch_norm_backward`.
    """
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    return _core.backward_apply(grad_out, x, mean, a, b, d, lay, out, _threads())


# ---- statistics as mergeable moments, and the coefficient maths ------------------------------------------------

class Moments:
    """Per-chunk moments of a batch's channels, in chunk order: ``count`` (K,) elements per channel in each chunk,
    and (K, C) float64 arrays ``shift``, ``residual`` and ``m2``: chunk k's mean of channel c is
    shift[k, c] + residual[k, c] (kept apart: their sum rounded to a double would lose the residual's bits) and m2
    its sum of squared deviations from that mean.

    The chunks are fixed by the shape alone (not by the thread count). :func:`merge_moments` of the moments of one
    call gives the bits of :func:`batch_stats`; of the moments of consecutive pieces of a batch (the ranks of a
    SyncBatchNorm), in batch order, the bits of one call on the whole batch whenever each piece ends on a chunk
    boundary of the whole (``len(count)`` chunks of ``count[0]`` elements per channel each: whole rows, or pieces of
    one row). The constructor copies and checks the arrays; :func:`merge_moments` checks them again.
    """

    __slots__ = ("count", "shift", "residual", "m2")

    def __init__(self, count, shift, residual, m2):
        self.count, self.shift, self.residual, self.m2 = self._checked(count, shift, residual, m2, "")

    @staticmethod
    def _checked(count, shift, residual, m2, where):
        """The four arrays as float64 copies of their own (count (K,), the others (K, C)), checked; where: the
        name of the Moments in a message ("" for the constructor's arguments)."""
        for name, a in (("count", count), ("shift", shift), ("residual", residual), ("m2", m2)):
            if np.iscomplexobj(a):
                raise TypeError(f"{where}{name} must hold real numbers, got complex values")
        try:
            cnt = np.array(count, dtype=np.float64).reshape(-1)
            arrays = [np.array(a, dtype=np.float64) for a in (shift, residual, m2)]
        except (TypeError, ValueError) as e:
            raise TypeError(f"{where}count, shift, residual and m2 must be real-number arrays ({e})") from None
        K = cnt.shape[0]
        C = arrays[0].shape[-1] if arrays[0].ndim == 2 else None
        for name, a in zip(("shift", "residual", "m2"), arrays):
            if a.ndim != 2 or a.shape != (K, C):
                raise ValueError(f"{where}{name} must have shape (K, C) = ({K}, {C}) to match count, got {a.shape}")
        if not np.all(np.isfinite(cnt)) or not np.all(cnt >= 0) or not np.all(cnt == np.floor(cnt)):
            raise ValueError(f"{where}count must hold finite whole numbers >= 0")
        if np.any(arrays[2] < 0):  # (NaN passes: the moments of data holding a NaN)
            raise ValueError(f"{where}m2 (sums of squared deviations) must be >= 0")
        return (cnt, *arrays)

    @property
    def num_channels(self):
        return self.shift.shape[1]

    def __iter__(self):
        return iter((self.count, self.shift, self.residual, self.m2))

    def __repr__(self):
        return f"Moments(chunks={self.count.shape[0]}, channels={self.num_channels}, n={self.count.sum():g})"


def batch_moments(x, *, layout="NCHW", axis=None, mask=None):
    """The per-chunk moments of x's channels (a :class:`Moments`), the statistics :func:`batch_stats` merges.

    ``axis``: as :func:`batch_norm`. ``mask``: the moments of the unmasked entries, gathered in order into one
    (n, C) channels-last array (whose chunks they are; an all-true mask gives the unmasked call's moments)."""
    lay = layout if axis is None else ck.axis_layout(axis, layout)
    if mask is not None:
        xa, view, pos, n, every = _masked.prepare(x, lay, mask)
        return Moments(*_masked.moments(xa, lay, view, pos, every, _threads()))
    return Moments(*_core.batch_moments(x, lay, _threads()))


def merge_moments(*parts):
    """(mean, biased var), float64 arrays of shape (C,), of the chunks of one or more :class:`Moments` merged in
    the order given (chunks of no element are skipped; no element at all gives NaN). See :class:`Moments` for when
    the result is bitwise that of one call on the whole batch."""
    if len(parts) == 1 and isinstance(parts[0], (list, tuple)):
        parts = tuple(parts[0])
    if not parts:
        raise ValueError("merge_moments needs at least one Moments")
    for i, p in enumerate(parts):
        if not isinstance(p, Moments):
            raise TypeError(f"parts[{i}] must be a bn_simd.Moments, got {type(p).__name__}")
    # (checked again: a Moments' attributes may have been replaced or written since it was made)
    checked = [Moments._checked(*p, f"parts[{i}].") for i, p in enumerate(parts)]
    C = checked[0][1].shape[1]
    for i, p in enumerate(checked):
        if p[1].shape[1] != C:
            raise ValueError(f"parts[{i}] has {p[1].shape[1]} channels, parts[0] has {C}")
    if C == 0:
        return np.empty(0, np.float64), np.empty(0, np.float64)
    count, shift, resid, m2 = (np.ascontiguousarray(np.concatenate([p[k] for p in checked])) for k in range(4))
    mean, var = np.empty(C, np.float64), np.empty(C, np.float64)
    _core.moments_merge(count, shift, resid, m2, mean, var)
    return mean, var


def norm_coefficients(mean, var, weight=None, bias=None, *, eps=1e-5, dtype=np.float32):
    """The kernels' forward coefficients: y = (x - m[c]) * a[c] + b[c] equals
    (x - mean) / sqrt(var + eps) * weight + bias, with m the mean rounded to ``dtype`` and its rounding residual
    folded into b (so a channel whose |mean| / std is 1e6 still normalises to a few ulp).

    Returns (m, a, b, exact): arrays (C,) of ``dtype`` (float32 or float64), and exact=False when some channel's
    coefficients would leave ``dtype``'s range or lose precision there (bn_simd then computes that call in float64).
    A channel whose coefficients hold a NaN gets m = NaN, a = 1, b = 0: with a NaN among its mean, var, weight or
    bias its outputs are all NaN, x's NaN where x is NaN and NaN elsewhere, with the same bits at any thread count
    (with NaN a and b, which of two NaN operands a kernel's multiply-add passed on decided a NaN's sign); coefficients
    NaN from overflow (float32 of a mean beyond its range) come with exact=False.
    """
    return _core.norm_coefficients(mean, var, weight, bias, eps, dtype)


def backward_coefficients(sum_dy, sum_dyxm, mean, invstd, n, weight=None, *, training=True, dtype=np.float32):
    """The kernels' backward coefficients from the channel sums of n values each (:func:`backward_reduce`):
    grad_x = a[c] * grad_out + b[c] * (x - m[c]) + d[c], with s = invstd, w = weight (1 when None),
    a = w s, b = -w s^3 sum_dyxm / n, d = -w s sum_dy / n (training; b = d = 0 otherwise), m the mean rounded to
    ``dtype`` and its residual folded into d. Returns (m, a, b, d, grad_weight, grad_bias): the first four of
    ``dtype``, the gradients float64 (grad_weight = s sum_dyxm, grad_bias = sum_dy). In training, a channel whose
    b or d is NaN (every grad_x NaN) gets m = NaN, a = 0, b = 1, d = 0, as :func:`norm_coefficients` does; a NaN
    parameter gradient is the one NaN (positive, quiet)."""
    return _core.backward_coefficients(sum_dy, sum_dyxm, mean, invstd, n, weight, training, dtype)
