"""Ghost batch normalization: batch statistics per virtual batch, with Keras' grouping.

A training batch of N samples is split into G = N / virtual_batch_size virtual batches of
``virtual_batch_size`` samples each; every virtual batch is normalised with its own per-channel mean and biased
variance, with the same weight and bias. The grouping is Keras' (``BatchNormalization(virtual_batch_size=v)``
reshapes the batch to (v, G, ...) and reduces over the first axis): **sample n belongs to virtual batch n mod G**,
so virtual batch j holds samples j, j + G, j + 2G, ...

Running statistics move towards the mean over the virtual batches of their means and of their variances (Keras'
single update per call; the variance unbiased with the n values of one virtual batch unless
``unbiased_running_var=False``). Eval mode does not split the batch: it normalises with the running statistics,
so any batch size works there.

How it runs: with x channels-first, (N, C, *spatial) is the C-contiguous (v, G, C, S) block, so the G virtual
batches of C channels are the G·C channels of the view (v, G·C, S): one kernel call on a reshape, no copy (the same
for (N, C) in either layout). Channels-last input with spatial axes, (N, *spatial, C), does not have this form. With
v >= 16 it is taken by columns: the view (v, G·S·C) has one column per (virtual batch, position, channel), whose
statistics over the v samples merge (in float64) into each virtual batch's, and the sweeps run on that view with
the coefficients repeated per position (no copy of x; per-column float64 arrays of 1/v of its size). With fewer
samples per virtual batch the samples are gathered by virtual batch into one copy (whole samples move, contiguous
runs), each virtual batch is one channels-last call, and the output is scattered back the same way.
"""
import numbers

import numpy as np

from . import _args as ck
from . import _core
from . import functional as F


def check_virtual_batch_size(v, allow_none=True):
    """virtual_batch_size as an int >= 1 (or None when allow_none)."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int >= 1{' or None' if allow_none else ''}, "
                        f"got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"virtual_batch_size must be an int >= 1, got {v}")
    return int(v)


# Channels-last virtual batches with spatial axes go by columns (below) from this many samples per virtual batch, and
# are gathered into a copy below it: columns cost per-(g, s, c) float64 arrays, about 20 / v passes over x, against
# the gather's two or three copies. Measured on 64x28x28x64 float32, 2 threads, the two orders alternating in one
# process: v = 16 by columns forward 7.7 ms, backward 11.0 ms, gathered 9.7 and 14.0; v = 8 backward by columns
# 31.9 ms, gathered 22.9 (plain batch norm 3.7 and 5.0 ms; a shared, loaded VM).
COLUMNS_MIN_VIRTUAL = 16


class Split:
    """A batch split into virtual batches, as the arrays the kernel calls see.

    The G virtual batches of C channels are G·C "wide" channels, channel g·C + c being channel c of virtual batch g.
    ``parts`` lists the C-contiguous arrays of the kernel calls, each with its layout and its slice of the wide
    channels: x itself when G == 1; the view (v, G·C, S) in layout "NCHW" (one call, every wide channel) when a
    reshape gives it (channels-first data, or no spatial axes); otherwise (channels-last data with spatial axes) a
    copy of x with the G virtual batches one after the other, (G, v·S, C), one channels-last call per virtual batch.
    ``n`` is the number of values per channel of one virtual batch.
    """

    def __init__(self, x, layout, virtual_batch_size, name="x"):
        x = ck.as_data(x, name)
        self.layout = ck.check_layout(layout)
        if not 2 <= x.ndim <= 5:
            raise ValueError(f"{name} must have 2 to 5 dimensions (layout {self.layout!r}), got shape {x.shape}")
        v = check_virtual_batch_size(virtual_batch_size)
        N = x.shape[0]
        self.C = x.shape[1] if self.layout == "NCHW" else x.shape[-1]
        self.S = int(np.prod(x.shape[2:] if self.layout == "NCHW" else x.shape[1:-1]))
        if v is not None and N % v:
            raise ValueError(f"virtual_batch_size ({v}) must divide the batch size, got a batch of {N} samples "
                             f"(shape {x.shape})")
        self.v = N if v is None else v
        self.G = N // v if v is not None and v else 1
        self.shape = x.shape
        self.x = x
        self.n = self.v * self.S
        G, C = self.G, self.C
        # channels-last with spatial axes: a virtual batch's channel is not one reshape away (see columns)
        spread = G > 1 and self.layout == "NHWC" and self.S > 1
        self.columns = spread and self.v >= COLUMNS_MIN_VIRTUAL
        self.gathered = spread and not self.columns
        if self.columns:
            self.part_layout, self.slices = "NHWC", None
            self.parts = self.to_parts(x)
            return
        if G == 1:
            self.part_layout, self.slices = self.layout, [slice(0, C)]
        elif self.gathered:
            self.part_layout, self.slices = "NHWC", [slice(g * C, (g + 1) * C) for g in range(G)]
        else:
            self.part_layout, self.slices = "NCHW", [slice(0, G * C)]
        self.parts = self.to_parts(x)

    def check_train_size(self):
        """PyTorch's refusal of one value per channel in training, naming the caller's shape and the virtual batch
        size (the kernels would name their view of one virtual batch)."""
        if self.n == 1 and self.G > 0:  # (an empty batch, G = 0, is taken as elsewhere)
            raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                             f"{self.shape}" + (f" in virtual batches of {self.v}" if self.G > 1 else ""))

    def to_parts(self, a):
        """An array of x's shape (x itself, grad_out) as the arrays of the kernel calls."""
        v, G, C, S = self.v, self.G, self.C, self.S
        if self.columns:
            return [a.reshape(v, G * S * C)]
        if G == 1:
            return [a]
        if not self.gathered:  # (no virtual batch, an empty batch: no rows either, as the kernels see an empty one)
            return [a.reshape(v if G else 0, G * C, S)]
        # sample i·G + g is row i of virtual batch g: whole samples move, each a contiguous run of S·C values
        t = np.empty((G, v, S * C), a.dtype)
        t[...] = a.reshape(v, G, S * C).swapaxes(0, 1)
        return [t[g].reshape(v * S, C) for g in range(G)]

    def out_parts(self, out, into):
        """The kernel calls' output arrays for ``out`` (checked against x): views of it, or, for gathered calls, the
        gathered copies ``into`` (parts of an input the calls may overwrite: in place, no new array)."""
        if self.gathered:
            return into
        if out is None:
            return [None]
        return [out if self.G == 1 else out.reshape(self.parts[0].shape)]

    def from_parts(self, ys, out):
        """The kernel calls' outputs back in x's shape, in ``out`` when given."""
        if not self.gathered:
            y = ys[0]
            return y.reshape(self.shape) if out is None else out
        y = np.empty(self.shape, ys[0].dtype) if out is None else out
        t = ys[0].base          # the gathered copy (G, v·S, C) the calls wrote in place
        y.reshape(self.v, self.G, -1)[...] = t.reshape(self.G, self.v, -1).swapaxes(0, 1)
        return y

    def expand(self, a):
        """Columns: a (G·C,) vector of per-(virtual batch, channel) values as the (G·S·C,) vector of the columns of
        the (v, G·S·C) view, each value repeated for the S positions of its virtual batch's samples."""
        G, S, C = self.G, self.S, self.C
        return np.ascontiguousarray(np.broadcast_to(np.asarray(a).reshape(G, 1, C), (G, S, C))).reshape(-1)

    def column_stats(self):
        """Columns: the (G·C,) float64 mean and biased variance of each virtual batch's channels.

        The (v, G·S·C) view's per-column statistics over the v samples of a virtual batch are merged over the S
        positions in float64 (equal counts): mean = mean_s(m_s), var = mean_s(var_s) + mean_s((m_s - mean)^2)."""
        G, S, C = self.G, self.S, self.C
        cm, cv = _core.batch_stats(self.parts[0], "NHWC", F._threads())
        cm, cv = cm.reshape(G, S, C), cv.reshape(G, S, C)
        with np.errstate(invalid="ignore", over="ignore"):  # (an infinity gives NaN, as the kernels' own statistics)
            mean = cm.mean(axis=1)
            var = cv.mean(axis=1) + np.square(cm - mean[:, None, :]).mean(axis=1)
        return mean.reshape(-1), var.reshape(-1)

    def column_out(self, out):
        return None if out is None else out.reshape(self.parts[0].shape)

    def tile(self, a):
        """A per-channel float64 array (C,) repeated for the G virtual batches (G·C,), or None."""
        if a is None:
            return None
        a = np.asarray(a, np.float64)
        return a if self.G == 1 else np.tile(a, self.G)

    def per_group(self, a, name):
        """A per-virtual-batch statistic: (G, C) (or (C,) when G == 1) as the kernel's (G·C,) float64 vector."""
        a = ck.bf16_widened(ck.to_ndarray(a, name))  # (bfloat16 as the per-channel arguments take it: widened)
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must have a floating-point dtype, got {a.dtype}")
        want = (self.G, self.C)
        if a.shape != want and not (self.G == 1 and a.shape == (self.C,)):
            raise ValueError(f"{name} must have shape {want} (virtual batches, channels), got shape {a.shape}")
        return np.ascontiguousarray(a, np.float64).reshape(-1)

    def check_like(self, a, name):
        """grad_out: x's shape and dtype."""
        a = ck.as_data(a, name)
        if a.shape != self.shape:
            raise ValueError(f"{name} must have shape {self.shape} (the shape of x), got {a.shape}")
        if a.dtype != self.x.dtype:
            raise TypeError(f"{name} must have dtype {self.x.dtype} (the dtype of x), got {a.dtype}")
        return a

    def check_out(self, out, reads):
        return None if out is None else ck.check_out(out, self.x, reads)


def train_forward(split, weight, bias, eps, out):
    """The training forward on a Split: (y, mean, invstd, var), the last three float64 (G·C,) (var the biased
    variance as computed, for the running statistics' update)."""
    out = split.check_out(out, [("x", split.x)])
    w = split.tile(ck.per_channel(weight, "weight", split.C))
    b = split.tile(ck.per_channel(bias, "bias", split.C))
    split.check_train_size()
    if split.columns:
        mean, var = split.column_stats()
        y = _core.normalize(split.parts[0], split.expand(mean), split.expand(var), _expand(split, w),
                            _expand(split, b), eps, "NHWC", split.column_out(out), F._threads())
        return (y.reshape(split.shape) if out is None else out), mean, 1.0 / np.sqrt(var + eps), var
    mean, invstd, var = np.empty(split.G * split.C), np.empty(split.G * split.C), np.empty(split.G * split.C)
    ys = []
    for part, o, sl in zip(split.parts, split.out_parts(out, split.parts), split.slices):
        y, mean[sl], invstd[sl], var[sl] = _core.batch_norm(part, None, None, _sl(w, sl), _sl(b, sl), True, 0.0, eps,
                                                            split.part_layout, o, True, F._threads(), 2)
        ys.append(y)
    return split.from_parts(ys, out), mean, invstd, var


def _sl(a, sl):
    return None if a is None else a[sl]


def _expand(split, a):
    return None if a is None else split.expand(a)


def _column_backward(split, g, m, s, w_eff, out):
    """Columns: (grad_x, sum grad_out x̂, sum grad_out), the sums float64 (G·C,), from the channel sums of the
    (v, G·S·C) views merged over the S positions and the coefficients of each (virtual batch, channel)."""
    G, S, C = split.G, split.S, split.C
    gv = g.reshape(split.parts[0].shape)
    sdy, sdxm = _core.backward_reduce(gv, split.parts[0], split.expand(m), "NHWC", F._threads())
    sdy, sdxm = sdy.reshape(G, S, C).sum(axis=1).reshape(-1), sdxm.reshape(G, S, C).sum(axis=1).reshape(-1)
    cm, a, b, d, sdx, sdy = _core.backward_coefficients(sdy, sdxm, m, s, float(split.n), w_eff, True,
                                                        split.x.dtype)
    gx = _core.backward_apply(gv, split.parts[0], split.expand(cm), split.expand(a), split.expand(b),
                              split.expand(d), "NHWC", split.column_out(out), F._threads())
    return (gx.reshape(split.shape) if out is None else out), sdx, sdy


def mean_stats(split, mean, var):
    """The update's statistics: the mean over the virtual batches of their means and biased variances, float64 (C,)
    (Keras' reduce_mean over the virtual-batch axis)."""
    return mean.reshape(split.G, split.C).mean(axis=0), var.reshape(split.G, split.C).mean(axis=0)


def virtual_batch_norm_forward(x, weight=None, bias=None, *, virtual_batch_size, eps=1e-5, layout="NCHW", out=None):
    """Training forward of ghost batch normalization (virtual batches, Keras' grouping: see the module).

    y = (x - mean[g, c]) / sqrt(var[g, c] + eps) * weight[c] + bias[c] for the samples of virtual batch g.

    x : float32/float64 ndarray, rank 2..5 in ``layout``, batch axis first; its batch size N must be a multiple
        of ``virtual_batch_size`` (int >= 1; None: the whole batch, plain batch norm).
    weight, bias : arrays (C,) or None (1 and 0).
    out : ndarray shaped and typed like x, C-contiguous; may be x itself.

    Returns (y, save_mean, save_invstd): save_mean[g, c] and save_invstd[g, c] = 1 / sqrt(var[g, c] + eps), float64
    arrays (G, C) with G = N / virtual_batch_size, for :func:`virtual_batch_norm_backward`. Raises ValueError when
    virtual_batch_size does not divide N, or a virtual batch has one value per channel, and as
    :func:`bn_simd.batch_norm_forward` otherwise.
    """
    return forward_with_var(x, weight, bias, virtual_batch_size, eps, layout, out)[:3]


def forward_with_var(x, weight, bias, virtual_batch_size, eps, layout, out):
    """virtual_batch_norm_forward's (y, save_mean, save_invstd) and the biased variances (G, C) as computed (for a
    running variance: 1 / invstd^2 - eps loses their bits where they are far below eps)."""
    split = Split(x, layout, check_virtual_batch_size(virtual_batch_size))
    y, mean, invstd, var = train_forward(split, weight, bias, eps, out)
    return y, mean.reshape(split.G, split.C), invstd.reshape(split.G, split.C), var.reshape(split.G, split.C)


def virtual_batch_norm_backward(grad_out, x, save_mean, save_invstd, weight=None, *, virtual_batch_size,
                                layout="NCHW", out=None):
    """Gradients of :func:`virtual_batch_norm_forward`, each virtual batch through its own statistics.

    With x̂ = (x - save_mean[g]) save_invstd[g] in virtual batch g of n values per channel:
        grad_x        = w s_g (grad_out - sum_g grad_out / n - x̂ sum_g grad_out x̂ / n)    (sums over batch g)
        grad_weight   = sum over all samples of grad_out x̂,   grad_bias = sum of grad_out

    grad_out, x : same shape and dtype. save_mean, save_invstd : (G, C) arrays from the forward. Returns
    (grad_x, grad_weight, grad_bias); the per-channel gradients have weight's dtype (x's when weight is None).
    ``out`` receives grad_x and may be grad_out or x itself.
    """
    split = Split(x, layout, check_virtual_batch_size(virtual_batch_size))
    return train_backward(split, grad_out, save_mean, save_invstd, weight, out)


def train_backward(split, grad_out, save_mean, save_invstd, weight, out, scale=None):
    """The backward on a Split: (grad_x, sum grad_out x̂, sum grad_out) (the sums float64 (C,) when scale is given,
    else (grad_x, grad_weight, grad_bias) in weight's dtype). scale: extra per-channel factor of the weight (renorm's
    r, a constant)."""
    g = split.check_like(grad_out, "grad_out")
    m = split.per_group(save_mean, "save_mean")
    s = split.per_group(save_invstd, "save_invstd")
    w = ck.per_channel(weight, "weight", split.C)
    out = split.check_out(out, [("grad_out", g), ("x", split.x)])
    w_eff = split.tile((np.ones(split.C) if w is None else np.asarray(w, np.float64))
                       * (1.0 if scale is None else scale))
    if split.columns:
        gx, sdx, sdy = _column_backward(split, g, m, s, w_eff, out)
        return _grads(split, gx, sdx, sdy, w, scale)
    sdx, sdy, gxs = np.empty(split.G * split.C), np.empty(split.G * split.C), []
    gparts = split.to_parts(g)
    for part, gpart, o, sl in zip(split.parts, gparts, split.out_parts(out, gparts), split.slices):
        gx, sdx[sl], sdy[sl] = _core.batch_norm_backward(gpart, part, m[sl], s[sl], w_eff[sl], split.part_layout,
                                                         o, True, F._threads())
        gxs.append(gx)
    return _grads(split, split.from_parts(gxs, out), sdx, sdy, w, scale)


def _grads(split, gx, sdx, sdy, w, scale):
    """The per-(virtual batch, channel) sums summed over the virtual batches, typed as train_backward returns
    them."""
    sdx = sdx.reshape(split.G, split.C).sum(axis=0)
    sdy = sdy.reshape(split.G, split.C).sum(axis=0)
    if scale is not None:
        return gx, sdx, sdy
    dt = split.x.dtype if w is None else w.dtype
    return gx, sdx.astype(dt), sdy.astype(dt)


def virtual_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
                       eps=1e-5, *, virtual_batch_size, layout="NCHW", out=None, unbiased_running_var=True):
    """:func:`bn_simd.batch_norm` with virtual batches in training (Keras' ``virtual_batch_size``).

    training=True: each virtual batch is normalised with its own statistics (:func:`virtual_batch_norm_forward`),
    and running_mean / running_var, when given, move towards the mean over the virtual batches of their means and
    variances: ``running = (1 - momentum) running + momentum mean_g(batch_g)``, the variance unbiased with the
    n = virtual_batch_size · spatial values of one virtual batch (``unbiased_running_var=False``: biased, Keras).
    training=False: the running statistics, whatever the batch size (as Keras).

    Returns y. Raises as :func:`virtual_batch_norm_forward` and :func:`bn_simd.batch_norm`; a call that raises
    changes nothing.
    """
    training = ck.check_flag(training, "training")
    if not training:
        check_virtual_batch_size(virtual_batch_size)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps, layout=layout, out=out)
    unbiased_running_var = ck.check_flag(unbiased_running_var, "unbiased_running_var")
    split = Split(x, layout, check_virtual_batch_size(virtual_batch_size))
    C = split.C
    rm = ck.per_channel(running_mean, "running_mean", C, inplace=True)
    rv = ck.per_channel(running_var, "running_var", C, inplace=True)
    ck.together(rm, rv, False)
    mom = ck.check_momentum(momentum, False) if rm is not None else None
    e = ck.check_eps(eps)
    if rm is not None:
        ck.stats_apart(out, (("running_mean", rm), ("running_var", rv)))
    y, mean, invstd, var = train_forward(split, weight, bias, e, out)
    if rm is not None and split.n * split.G > 0:
        bm, bv = mean_stats(split, mean, var)
        F.update_running_stats(rm, rv, bm, bv, split.n, mom, unbiased=unbiased_running_var)
    return y
