"""Batch-norm layers with running statistics, in the style of ``torch.nn.BatchNorm2d``."""
import numbers

import numpy as np

from . import _args as ck
from . import _core, _masked
from . import _epilogue as _epi
from . import functional as F


def check_keys(keys, state_dict, may_miss=lambda k: False):
    """load_state_dict(strict=True)'s check: every key of the layer present (but those may_miss allows) and no
    other; raises ValueError naming both lists."""
    missing = [k for k in keys if k not in state_dict and not may_miss(k)]
    unexpected = [k for k in state_dict if k not in keys]
    if missing or unexpected:
        raise ValueError(f"state_dict does not match this layer: missing keys {missing}, "
                         f"unexpected keys {unexpected}")

def forward_copy(a):
    """A forward's per-channel array (None kept) copied for its backward, so that an update of it in place in
    between (an optimizer step) does not change that backward (any array-like the checks took, a tensor through the
    library's own conversion)."""
    return None if a is None else np.array(ck.to_ndarray(a, "weight"))


def set_param_grads(layer, gw, gb):
    """A backward's grad_weight / grad_bias, in the layer's dtype; None for a parameter it does not hold
    (affine=False, bias=False, or weight / bias set to None after construction), as PyTorch gives a None parameter no
    gradient. ``affine`` itself is read at construction only, as PyTorch's: a weight assigned to a layer built
    without one is used by the forward and gets its gradient."""
    with np.errstate(all="ignore"):  # (a gradient beyond the dtype's range is its Inf, as the kernels store it)
        layer.grad_weight = None if layer.weight is None else gw.astype(layer.dtype)
        layer.grad_bias = None if layer.bias is None else gb.astype(layer.dtype)


class ForwardStep:
    """``with ForwardStep(layer, count, watch):`` around a forward's work, once its attributes are checked. Entering
    drops the last forward's saved state (``_saved``) and, when count, counts the batch in num_batches_tracked first,
    as PyTorch's BatchNorm counts before its work; it also sets ``_fwd_route`` to ``layer._reading()`` (what the
    attributes say of x's reading: layout, groups, normalised shape; a layer without _reading keeps that in its
    saved state), which backward reads instead of the attributes, as it reads ``_saved``: an attribute reassigned
    between the two calls changes the next forward, not the gradient of the last one (PyTorch's autograd
    differentiates the forward that ran). An Exception (a refused argument) puts the saved state, its route and the
    count back, so a failed call changes nothing. A KeyboardInterrupt, which Python raises as the kernel returns (it
    runs without the GIL), after the running statistics moved, leaves the count moved with them and no earlier
    forward's state for backward to use; so does an Exception after which an array of ``watch`` (the statistics the
    forward updates) moved: a signal handler's (a timeout's), raised at the same point. (Where the normalise and the
    update are two calls, with mask=, virtual batches or renorm, one raised as the normalise returns finds the count
    moved and the statistics not: PyTorch's count, too, moves before any of its work.)"""
    __slots__ = ("layer", "saved", "count", "route", "old_route", "watched")

    def __init__(self, layer, count=False, watch=()):
        self.layer, self.saved, self.old_route = layer, layer._saved, getattr(layer, "_fwd_route", None)
        reading = getattr(layer, "_reading", None)
        self.route = None if reading is None else reading()
        self.count = layer.num_batches_tracked if count else None
        self.watched = watched(watch) if watch else ()

    def __enter__(self):
        self.layer._saved = None
        self.layer._fwd_route = self.route  # (with _saved, not after the work: no window between the two)
        if self.count is not None:
            self.layer.num_batches_tracked = self.count + 1
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, Exception) and not moved(self.watched):
            self.layer._saved, self.layer._fwd_route = self.saved, self.old_route
            if self.count is not None:
                self.layer.num_batches_tracked = self.count
        return False


def restore_route(layer, state):
    """Unpickling: a layer pickled before it kept ``_fwd_route`` gets the route its attributes give (they have not
    changed since that forward, as far as the pickle can tell)."""
    layer.__dict__.update(state)
    if "_fwd_route" not in state:
        layer._fwd_route = layer._reading() if state.get("_saved") is not None else None


def watched(arrays):
    """(array, copy) of each ndarray of arrays: what moved() compares."""
    return [(a, a.copy()) for a in arrays if isinstance(a, np.ndarray)]


def moved(pairs):
    """Whether an array of watched() changed since (bit for bit: NaNs and signed zeros included)."""
    return any(a.tobytes() != c.tobytes() for a, c in pairs)


def assign_state(layer, staged):
    """load_state_dict's last step, once every entry of staged (name -> checked value) is known good: an array
    goes into the layer's own array of its shape and dtype, in place, as PyTorch's load_state_dict copies into its
    tensors (so references held elsewhere, an optimizer's or a SyncBatchNorm's sharing them, see the loaded values);
    a scalar, or an entry the layer holds otherwise (None, another shape or dtype, read-only), is assigned."""
    for k, v in staged.items():
        cur = getattr(layer, k, None)
        if not (isinstance(v, np.ndarray) and holds(cur, v)):
            setattr(layer, k, v)


def holds(cur, v):
    """Copy array v into cur, in place, where cur can hold it exactly (an ndarray of v's shape and dtype, writeable,
    whose elements are distinct memory: no zero stride, as an as_strided or broadcast view has); returns whether it
    did (False: cur is left as it was, for the caller to replace)."""
    if not (type(cur) is np.ndarray and cur.shape == v.shape and cur.dtype == v.dtype and cur.flags.writeable):
        return False
    steps = [abs(st) for st, n in zip(cur.strides, cur.shape) if n > 1]   # (axes of one element move nothing)
    if steps and min(steps) < cur.itemsize:
        return False   # (elements overlapping each other, a zero stride say: the copy would not hold v's values)
    np.copyto(cur, v)
    return True


class _Layer:
    """What every layer shares: train() / eval() (``training`` is what they set) and load_state_dict over the keys
    of ``_state_keys()`` and the ``_channels`` per-channel entries."""

    def __setstate__(self, state):
        restore_route(self, state)

    def train(self, mode=True):
        """Training mode (batch statistics; running statistics updated where the layer keeps them); returns
        self."""
        self.training = train_mode(mode)
        return self

    def eval(self):
        """Inference mode (running statistics where the layer keeps them); returns self."""
        return self.train(False)

    def load_state_dict(self, state_dict, strict=True):
        """Load a dict from :meth:`state_dict` or from the PyTorch layer's (tensors are converted), or Keras' weights
        by name (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``; with renorm ``moving_stddev``,
        ``renorm_mean``, ``renorm_stddev``; or variable paths ending in them).

        Every entry is checked (shape (C,), floating dtype; num_batches_tracked an integer) before anything
        is assigned, so a rejected dict leaves the layer as it was. strict=True also rejects missing and
        unexpected keys. Values are copied into the layer's own arrays (as PyTorch's copy into its tensors:
        a reference to ``layer.running_mean`` taken before sees the loaded values), in the layer's dtype.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = _from_keras_names(detached_values(state_dict))
        keys, C = self._state_keys(), self._channels
        if strict:
            check_keys(keys, state_dict, lambda k: k == "num_batches_tracked" and _before_batch_count(state_dict))
        staged = {}
        for k in keys:
            if k not in state_dict:
                continue
            if k == "num_batches_tracked":
                if isinstance(state_dict[k], numbers.Integral) and not isinstance(state_dict[k], bool):
                    staged[k] = _batch_count(state_dict[k])  # (a Python int beyond int64 is no integer array)
                    continue
                v = ck.to_ndarray(state_dict[k], k)
                if v.dtype.kind not in "iu":
                    raise TypeError(f"num_batches_tracked must be an integer scalar, got dtype {v.dtype}")
                if v.shape not in ((), (1,)):
                    raise ValueError(f"num_batches_tracked must be an integer scalar, got shape {v.shape}")
                staged[k] = _batch_count(int(v.reshape(())))
            else:
                if state_dict[k] is None:
                    raise TypeError(f"state_dict[{k!r}] must be an array of shape ({C},), got None")
                staged[k] = np.array(ck.per_channel(state_dict[k], k, C, of="the layer"), dtype=self.dtype)
        assign_state(self, staged)


# Keras' names of the same arrays (a variable's path ends in its name: "batch_normalization/gamma"); with renorm,
# Keras' three more (renorm_mean is the same name in both)
_KERAS_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var",
                "moving_stddev": "running_std", "renorm_stddev": "renorm_std", "renorm_mean": "renorm_mean"}


def detached_values(state_dict):
    """state_dict with its tensors that require grad detached (a module's ``state_dict(keep_vars=True)`` holds its
    Parameters): loading copies their values and records nothing, as PyTorch's load_state_dict."""
    if not any(getattr(v, "requires_grad", False) is True for v in state_dict.values()):
        return state_dict
    return {k: v.detach() if getattr(v, "requires_grad", False) is True else v for k, v in state_dict.items()}


def _from_keras_names(state_dict):
    """state_dict with Keras' weight names (gamma, beta, moving_mean, moving_variance; with renorm moving_stddev,
    renorm_mean, renorm_stddev; or paths ending in them) put under this library's; a dict holding none of Keras' own
    names, or mixing them with this library's, comes back unchanged (the mixture is then refused as unexpected
    keys). A Keras dict has no batch count: the layer keeps its own."""
    renamed = {}
    for k, v in state_dict.items():
        name = k.rsplit("/", 1)[-1] if isinstance(k, str) else k
        target = _KERAS_NAMES.get(name)
        if target is None or target in renamed or (target != name and target in state_dict):
            return state_dict
        renamed[target] = v
    return renamed if renamed else state_dict


def _before_batch_count(state_dict):
    """A state dict from before PyTorch's BatchNorm counted batches (its version metadata below 2, or none, as in a
    plain dict): PyTorch loads it without num_batches_tracked, strict or not, and keeps the layer's count."""
    meta = getattr(state_dict, "_metadata", None)
    version = meta.get("", {}).get("version") if isinstance(meta, dict) else None
    return version is None or version < 2


def _batch_count(v):
    """A reassigned num_batches_tracked: a whole number >= 0 (an int, a NumPy integer or a 0-d integer array),
    returned as an int."""
    a = v if isinstance(v, np.ndarray) else None
    if isinstance(v, bool) or not (isinstance(v, (numbers.Integral, np.integer)) or (
            a is not None and a.ndim == 0 and a.dtype.kind in "iu")):
        raise TypeError(f"num_batches_tracked must be a whole number >= 0 or None, got {type(v).__name__} {v!r}")
    n = int(v)
    if not 0 <= n <= _INT64_MAX:
        raise ValueError(f"num_batches_tracked must be >= 0 and <= 2**63 - 1 (PyTorch's int64 counter), got {n}")
    return n


_INT64_MAX = 2**63 - 1


class BatchNorm(_Layer):
    """Batch normalization over the channel axis, with learnable affine parameters and running statistics.

    Parameters
    ----------
    num_features : int >= 1, the number of channels C.
    eps : float > 0, added to the variance.
    momentum : float in [0, 1] or None. ``running = (1 - momentum) running + momentum batch``; None keeps the
        cumulative average over ``num_batches_tracked``. (Keras' momentum is 1 - this one.)
    affine : bool, learnable ``weight`` (ones) and ``bias`` (zeros) of shape (C,).
    track_running_stats : bool. When False there are no running statistics and batch statistics are used in
        training and in eval mode alike.
    layout : "NCHW" (channels on axis 1) or "NHWC" (channels last).
    dtype : float32 or float64, the dtype of parameters and running statistics. Inputs may be either.
    unbiased_running_var : bool. True (PyTorch) stores the unbiased batch variance in running_var; False
        stores the biased one (Keras).
    axis : int or None. The channel axis (negative counts from the end) of inputs of rank 1 to 8, instead of
        ``layout`` (which must then stay "NCHW"); BatchNorm1d/2d/3d keep their ranks.
    bias : bool (PyTorch 2.x). False with affine=True: a learnable ``weight`` and no ``bias`` (None; no
        ``bias`` key in the state dict, ``grad_bias`` stays None).
    virtual_batch_size : int >= 1 or None. Ghost batch norm in training: statistics per virtual batch of this many
        samples, Keras' grouping (sample n in virtual batch n mod N / virtual_batch_size); the batch size must be a
        multiple. Running statistics move towards the mean of the virtual batches' statistics. See
        :mod:`bn_simd.virtual`.
    renorm : bool. Batch Renormalization in training (Keras' ``renorm=True``, :mod:`bn_simd.renorm`); the layer
        then also keeps ``running_std``, ``renorm_mean`` and ``renorm_std`` (state keys of the same names). Needs
        track_running_stats=True.
    renorm_clipping : dict with keys among "rmax", "rmin", "dmax" (missing: inf, 0, inf), or None.
    renorm_momentum : float in [0, 1], the weight of the new batch in renorm_mean / renorm_std (this library's
        convention, as ``momentum``: Keras' renorm_momentum=0.99 is 0.01 here).
    activation : None, "relu", "relu6", ("leaky_relu", slope), ("clamp", lo, hi) or "silu": the layer returns
        act(batch_norm(x) + residual), fused into the normalise sweep (:func:`bn_simd.batch_norm`), and
        ``backward`` differentiates through it (the activation's gradient recomputed from x with the forward's
        coefficients). ``layer(x, residual=r)`` adds r (x's shape and dtype) before the activation and
        ``backward`` then also sets ``grad_residual``. Neither combines with mask=, virtual_batch_size or renorm.

    PyTorch's rules for the running statistics: eval mode normalises with them whenever the layer holds them (also
    after ``track_running_stats`` is switched off), a training call updates them only when track_running_stats is
    on, and ``momentum``'s value is checked only where it is used (training with tracked statistics).

    A new layer is in training mode; ``eval()`` / ``train()`` switch it. Calling the layer returns the
    normalised array; ``backward(grad_out)`` after a call returns grad_x and sets ``grad_weight`` and
    ``grad_bias`` (overwritten each time, not accumulated). ``layer(x, mask=m)`` takes the training statistics
    over the unmasked entries only (see :func:`bn_simd.batch_norm`); ``backward`` then uses the same mask.

    Thread safety: a layer holds state (running statistics, the saved forward for backward), so one layer
    must not be called from several threads at once. The functional API is safe to call concurrently on
    different arrays. The layer keeps a reference to the last training input for backward: changing that
    array in place before ``backward`` changes the gradients. The weight is the forward's (a copy, C values): an
    optimizer step between a forward and its backward does not change that backward.
    """

    _ranks = (2, 3, 4, 5)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 layout="NCHW", dtype=np.float32, unbiased_running_var=True, axis=None, bias=True,
                 virtual_batch_size=None, renorm=False, renorm_clipping=None, renorm_momentum=0.01,
                 activation=None):
        self._act = _epi.parse(activation)
        self.activation = activation
        dt = ck.check_dtype(dtype)
        self.num_features = _check_features(num_features)
        self.eps = ck.check_eps(eps)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        # (its value matters only where running statistics are updated, as PyTorch's: its type always)
        self.momentum = (ck.check_momentum(momentum, allow_none=True) if self.track_running_stats
                         else _momentum_type(momentum))
        self.layout = ck.check_layout(layout)
        self.axis = None if axis is None else ck.check_axis(axis, layout)
        self.dtype = dt
        self.unbiased_running_var = bool(unbiased_running_var)
        C = self.num_features
        self.weight = np.ones(C, dt) if self.affine else None
        self.bias = np.zeros(C, dt) if self.affine and bias else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dt)
            self.running_var = np.ones(C, dt)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self.training = True
        self._saved = self._fwd_weight = self._fwd_route = None  # (the last forward's state; its weight, copied)
        self._init_extras(virtual_batch_size, renorm, renorm_clipping, renorm_momentum)
        if self.axis is not None and (self.renorm or self.virtual_batch_size is not None):
            raise ValueError("axis= does not combine with virtual_batch_size or renorm (use layout=)")
        if activation is not None and (self.renorm or self.virtual_batch_size is not None):
            raise ValueError("activation= does not combine with virtual_batch_size or renorm")

    def _init_extras(self, virtual_batch_size, renorm, renorm_clipping, renorm_momentum):
        """Virtual batches and batch renormalization (bn_simd.virtual, bn_simd.renorm)."""
        from . import renorm as R
        self.virtual_batch_size = R.check_virtual_batch_size(virtual_batch_size)
        self.renorm = bool(renorm)
        self.renorm_clipping = renorm_clipping
        R.check_clipping(renorm_clipping)
        self.renorm_momentum = R.check_renorm_momentum(renorm_momentum)
        if self.renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs track_running_stats=True (its moving statistics are running ones)")
        if self.renorm:
            C = self.num_features
            self.running_std = np.ones(C, self.dtype)
            self.renorm_mean = np.zeros(C, self.dtype)
            self.renorm_std = np.ones(C, self.dtype)

    # ---- state resets --------------------------------------------------------------------------------------
    def reset_running_stats(self):
        if self.track_running_stats:
            _refill(self, "running_mean", 0)
            _refill(self, "running_var", 1)
            self.num_batches_tracked = 0
        if getattr(self, "renorm", False):
            _refill(self, "running_std", 1)
            _refill(self, "renorm_mean", 0)
            _refill(self, "renorm_std", 1)

    def reset_parameters(self):
        self.reset_running_stats()
        _reset_affine(self)

    # ---- forward / backward --------------------------------------------------------------------------------
    def _check_input(self, x):
        if self.axis is None:
            return ck.check_layer_input(x, self._ranks, type(self).__name__, self.num_features, self.layout, half=True)
        ranks = None if type(self) is BatchNorm else self._ranks  # (BatchNorm1d/2d/3d keep theirs)
        return ck.check_layer_input(x, ranks, type(self).__name__, self.num_features, self.layout, self.axis,
                                    half=True)

    def forward(self, x, *, out=None, mask=None, residual=None):
        """Normalise x (rank per class, channels per ``layout`` or ``axis``); returns y (``out`` if given).

        mask: statistics of the unmasked entries only, in training (see :func:`bn_simd.batch_norm`); checked and
        unused when the running statistics are used. residual: an array like x added before the layer's activation
        (y = act(bn(x) + residual)); the layer keeps a reference to it for backward."""
        self._check_state()
        x = self._check_input(x)
        act = _epi.parse(self.activation)  # (re-checked: the attribute may have been reassigned)
        lay = self._reading()
        if act != _epi.NONE or residual is not None:
            return self._forward_epilogue(x, out, mask, residual, act, lay)
        batch_stats, update, momentum = self._forward_mode()  # (PyTorch's rules)
        # backward needs the input: keep a copy when the output overwrites it
        saved_x = x.copy() if out is not None and np.may_share_memory(out, x) else x
        if self.training and (self.renorm or self.virtual_batch_size is not None):
            if mask is not None:
                raise ValueError("mask= does not combine with virtual_batch_size or renorm")
            from . import renorm as R
            fw = forward_copy(self.weight)  # (before the call: out may be the weight's memory)
            with ForwardStep(self, self._counts(), self._updated(update)):
                y, saved = R.layer_forward(self, x, out, saved_x, update, momentum)
                self._saved, self._fwd_weight = saved, fw
            return y
        with ForwardStep(self, self._counts(), self._updated(update)):
            return self._forward_plain(x, out, mask, saved_x, batch_stats, update, momentum, lay)

    __call__ = forward

    def _updated(self, update):
        """The arrays a forward updates (update: whether it does): the running statistics, renorm's too."""
        if not update:
            return ()
        if getattr(self, "renorm", False):
            return (self.running_mean, self.running_var, getattr(self, "running_std", None),
                    getattr(self, "renorm_mean", None), getattr(self, "renorm_std", None))
        return self.running_mean, self.running_var

    def _reading(self):
        """How x is read (ForwardStep's route): its layout, ``layout`` or the one ``axis`` names."""
        return self.layout if self.axis is None else ck.axis_layout(self.axis, self.layout)

    def _forward_plain(self, x, out, mask, saved_x, batch_stats, update, momentum, lay):
        """forward without an epilogue, renorm or virtual batches (inside its ForwardStep)."""
        passed = update or not batch_stats
        fw = forward_copy(self.weight)  # (before the call: out may be the weight's memory)
        if mask is not None and batch_stats:  # statistics of the unmasked entries
            y, mean, invstd, _ = _masked.forward(x, self.running_mean if update else None,
                                                 self.running_var if update else None, self.weight, self.bias,
                                                 momentum, self.eps, lay, out, self.unbiased_running_var, mask,
                                                 F._threads())
            mask = np.array(ck.to_ndarray(mask, "mask"))  # (a copy, for backward)
        else:
            if mask is not None:  # checked, unused: the running statistics normalise
                _masked.prepare(x, lay, mask)
                mask = None
            y, mean, invstd = _core.batch_norm(x, self.running_mean if passed else None,
                                               self.running_var if passed else None, self.weight, self.bias,
                                               batch_stats, momentum, self.eps, lay, out, self.unbiased_running_var,
                                               F._threads(), True)
        self._saved = (saved_x, mean, invstd, batch_stats, mask)
        self._fwd_weight = fw
        return y

    def _counts(self):
        """Whether a forward counts its batch in num_batches_tracked: in training with tracking on, whether or not
        the layer holds running statistics (as PyTorch's BatchNorm counts before it looks at them)."""
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _forward_mode(self):
        """(batch_stats, update, momentum) of a forward: batch statistics in training, and in eval when the layer
        holds no running statistics; running statistics updated in training when tracked (track_running_stats may
        be switched after construction: eval still uses the statistics the layer holds); the update's momentum,
        None meaning the cumulative average, 1 / (batches with this one)."""
        held = self.running_mean is not None or self.running_var is not None
        batch_stats = self.training or not held
        update = self.training and self.track_running_stats and held
        momentum = 0.0 if not update else (
            self.momentum if self.momentum is not None else
            1.0 / (self.num_batches_tracked + 1) if self.num_batches_tracked is not None else 0.0)
        return batch_stats, update, momentum

    def _forward_epilogue(self, x, out, mask, residual, act, lay):
        """forward with a fused activation and/or residual: saves what backward needs (x, the float64 statistics the
        call normalised with, the residual), not the output."""
        if mask is not None or self.renorm or self.virtual_batch_size is not None:
            raise ValueError("activation= and residual= do not combine with mask=, virtual_batch_size or renorm")
        batch_stats, update, momentum = self._forward_mode()
        saved_x = x.copy() if out is not None and np.may_share_memory(out, x) else x
        passed = update or not batch_stats
        w, b = forward_copy(self.weight), forward_copy(self.bias)  # (before the call: out may be their memory)
        with ForwardStep(self, self._counts(), self._updated(update)):
            y, mean, invstd, var = _core.batch_norm_epi(x, self.running_mean if passed else None,
                                                        self.running_var if passed else None, self.weight, self.bias,
                                                        batch_stats, momentum, self.eps, lay, out,
                                                        self.unbiased_running_var, act, residual, F._threads(), True)
            self._saved = ("epilogue", saved_x, mean, var, batch_stats, act, residual, w, b, self.eps)
        return y

    def backward(self, grad_out, *, out=None, grad_residual_out=None):
        """Gradient of the last forward call: returns grad_x and sets grad_weight / grad_bias (affine only).

        After a training-mode forward the batch statistics are differentiated through; after an
        eval-mode forward they are the (constant) running statistics. Through the layer's activation and residual
        when the forward had them: grad_residual is then set too (None without a residual), written into
        ``grad_residual_out`` when given (as :func:`bn_simd.batch_norm_backward`'s; a forward without a residual
        raises ValueError for it).
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        if isinstance(self._saved, tuple) and isinstance(self._saved[0], str):  # (a forward with an epilogue)
            _, x, mean, var, training, act, residual, w, b, eps = self._saved
            if residual is None:
                _no_residual(grad_residual_out)
            gx, gw, gb, self.grad_residual = _core.batch_norm_backward_epi(grad_out, x, mean, var, eps, w, b,
                                                                           self._fwd_route, out, training, act,
                                                                           residual, F._threads(), grad_residual_out)
            set_param_grads(self, gw, gb)
            return gx
        _no_residual(grad_residual_out)
        if not isinstance(self._saved, tuple):  # a forward with virtual batches or renormalization
            from . import renorm as R
            return R.layer_backward(self, grad_out, out)
        x, mean, invstd, training, mask = self._saved
        lay = self._fwd_route  # (the forward's: ForwardStep)
        if mask is None:
            gx, gw, gb = _core.batch_norm_backward(grad_out, x, mean, invstd, self._fwd_weight, lay, out, training,
                                                   F._threads())
        else:
            gx, gw, gb = _masked.backward(grad_out, x, mean, invstd, self._fwd_weight, lay, out, mask,
                                          F._threads())
        set_param_grads(self, gw, gb)
        return gx

    def _check_state(self):
        """The public attributes may be reassigned by users; check them before they reach a kernel."""
        _check_mode_and_dtype(self)
        C = self.num_features = _check_features(self.num_features)
        for name in ("weight", "bias"):
            v = getattr(self, name)
            if self.affine or v is not None:
                ck.per_channel(v, name, C)
        update = self.training and self.track_running_stats
        for name in ("running_mean", "running_var"):  # the statistics the layer holds; written only in an update
            ck.per_channel(getattr(self, name), name, C, inplace=update)
        self.eps = ck.check_eps(self.eps)
        # momentum's value matters only in an update (PyTorch ignores it elsewhere); its type always
        self.momentum = ck.check_momentum(self.momentum, allow_none=True) if update else _momentum_type(self.momentum)
        if update:  # (as momentum: read only in an update)
            self.unbiased_running_var = ck.check_flag(self.unbiased_running_var, "unbiased_running_var")
        self.layout = ck.check_layout(self.layout)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked = _batch_count(self.num_batches_tracked)
        if self.axis is not None:
            self.axis = ck.check_axis(self.axis, self.layout)
        if getattr(self, "renorm", False) or getattr(self, "virtual_batch_size", None) is not None:
            if self.axis is not None:
                raise ValueError("axis= does not combine with virtual_batch_size or renorm (use layout=)")
            from . import renorm as R
            R.check_layer(self, update)

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self):
        """Copies of the state under PyTorch's keys: weight, bias (affine; a parameter set to None is left out, as
        PyTorch leaves out a None parameter), running_mean, running_var, num_batches_tracked (track_running_stats; a
        0-d int64 array)."""
        d = {}
        for k in self._state_keys():  # the parameters and the statistics the layer holds, as PyTorch's buffers
            if k == "num_batches_tracked":
                d[k] = np.array(_batch_count(self.num_batches_tracked), dtype=np.int64)
            else:
                d[k] = _state_copy(self, k)
        return d

    def _state_keys(self):
        held = [k for k in ("running_mean", "running_var", "num_batches_tracked") if getattr(self, k) is not None]
        extra = ["running_std", "renorm_mean", "renorm_std"] if getattr(self, "renorm", False) else []
        return _param_keys(self) + held + extra

    @property
    def _channels(self):
        return self.num_features

    def __repr__(self):
        where = f"layout={self.layout!r}" if self.axis is None else f"axis={self.axis}"
        extras = (f", virtual_batch_size={self.virtual_batch_size}" if getattr(self, "virtual_batch_size", None)
                  else "") + (f", renorm=True, renorm_clipping={self.renorm_clipping}, "
                              f"renorm_momentum={self.renorm_momentum}" if getattr(self, "renorm", False) else "")
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, {'' if self.bias is not None or not self.affine else 'bias=False, '}"
                f"track_running_stats={self.track_running_stats}, {where}, dtype={self.dtype.name}{extras}"
                f"{'' if getattr(self, 'activation', None) is None else f', activation={self.activation!r}'})")


def _param_keys(layer):
    """The state keys of a layer's parameters: weight and bias, but a None one (affine=False, bias=False, or set to
    None after construction: PyTorch's state_dict and load_state_dict skip a None parameter)."""
    return [k for k in ("weight", "bias") if getattr(layer, k) is not None]


def _reset_affine(layer):
    """reset_parameters' weight to ones and bias to zeros (affine; a None one stays None)."""
    if layer.affine:
        if layer.weight is not None:
            _refill(layer, "weight", 1)
        if layer.bias is not None:
            _refill(layer, "bias", 0)


def _refill(layer, name, value):
    """A reset of a per-channel attribute to value: in place in the layer's own array; an array-like assigned to it
    (a tensor, a tuple, a read-only array: the calls take them) is replaced by a new array of the layer's dtype."""
    a = getattr(layer, name)
    if isinstance(a, np.ndarray) and a.flags.writeable:
        a.fill(value)
    else:
        setattr(layer, name, np.full(np.shape(a), value, layer.dtype))


def _state_copy(layer, name):
    """A copy of a per-channel attribute for state_dict, as an ndarray whatever array-like was assigned to it."""
    return np.array(ck.to_ndarray(getattr(layer, name), name))


def _check_features(n):
    """num_features as an int in [1, 2**31)."""
    if type(n) is int and 1 <= n < 2**31:  # (the usual case, without the ABC check's cost)
        return n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {type(n).__name__}")
    if not 1 <= n < 2**31:
        raise ValueError(f"num_features must be >= 1 and < 2**31, got {n}")
    return int(n)


_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_mode_and_dtype(layer):
    """training (reassigned: a bool, or what bool() takes) and dtype (the parameter gradients': float32 or float64),
    re-checked before a call; the usual values pass without a call."""
    if type(layer.training) is not bool:
        layer.training = ck.check_flag(layer.training, "training")
    if not isinstance(layer.dtype, np.dtype) or layer.dtype not in _PARAM_DTYPES:  # (None, "float32" compare equal)
        layer.dtype = ck.check_dtype(layer.dtype)


def train_mode(mode):
    """train()'s mode: a bool (or NumPy's), as PyTorch's Module.train takes (it raises ValueError for others: "False"
    would have set training on)."""
    if not isinstance(mode, (bool, np.bool_)):
        raise ValueError(f"train() takes a bool mode, got {type(mode).__name__} {mode!r}")
    return bool(mode)


def _momentum_type(m):
    """momentum where its value is unused: None or a real number, kept as given."""
    if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Real)):
        raise TypeError(f"momentum must be a real number in [0, 1] or None, got {type(m).__name__}")
    return m


class BatchNorm1d(BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input (NHWC: (N, C) or (N, L, C))."""
    _ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """BatchNorm over (N, C, H, W) input (NHWC: (N, H, W, C))."""
    _ranks = (4,)


class BatchNorm3d(BatchNorm):
    """BatchNorm over (N, C, D, H, W) input (NHWC: (N, D, H, W, C))."""
    _ranks = (5,)


def _no_residual(grad_residual_out):
    """A backward after a forward without a residual takes no grad_residual_out (ValueError naming it)."""
    _epi.no_grad_residual_out(grad_residual_out, "the forward had no residual, got grad_residual_out with "
                                                 "residual=None")


def _batched_grad(grad_out, out, x, unbatched):
    """grad_out checked as data, and with out, given a leading axis of one sample when the forward's input had none
    (x: the forward's batched input)."""
    g = ck.as_data(grad_out, "grad_out", half=True)
    if unbatched:
        if g.shape != x.shape[1:]:   # (named in the caller's shapes, not the batched ones)
            raise ValueError(f"grad_out must have the shape of x {x.shape[1:]}, got {g.shape}")
        g = g[np.newaxis]
        if out is not None:
            out = ck.check_out(out, x[0], [("grad_out", g[0])])[np.newaxis]
    return g, out


class _InstanceNorm(BatchNorm):
    """Instance normalization: each (sample, channel) over its spatial positions (``torch.nn.InstanceNorm2d``).

    Parameters as :class:`BatchNorm`, with PyTorch's defaults affine=False and track_running_stats=False (and
    ``bias=True``; ``bias=False`` as PyTorch 2.x's: with affine=True a learnable ``weight`` and no ``bias``). With
    track_running_stats=True, a training-mode call updates running_mean / running_var with the batch averages of
    the instance statistics (the variance unbiased; momentum=None updates nothing, as in PyTorch), and an eval-mode
    call normalises with them. Unbatched input (one dimension less: (C, *spatial)) is accepted and returned
    unbatched, as in PyTorch. ``backward``, ``grad_weight``, ``grad_bias``, ``state_dict`` and modes as
    :class:`BatchNorm` (state keys weight, bias, running_mean, running_var, num_batches_tracked, as present).
    ``activation`` and ``layer(x, residual=r)`` as :class:`BatchNorm`'s: y = act(instance_norm(x) + r) in the normalise
    sweep, and ``backward`` differentiates through it (and sets ``grad_residual``).

    One difference: with track_running_stats switched off after construction, the layer updates no running
    statistics (BatchNorm's rule), where PyTorch's instance norm, which passes its buffers whenever it holds them,
    still moves them at every call that uses the input's statistics.
    """

    _ranks = (3, 4, 5)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, *,
                 layout="NCHW", dtype=np.float32, activation=None, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout=layout, dtype=dtype,
                         activation=activation, bias=bias)

    def _batched(self, x):
        a = ck.as_data(x, "x", half=True)
        if a.ndim == self._ranks[0] - 1:
            C = a.shape[0] if self.layout == "NCHW" else a.shape[-1]
            if C != self.num_features:  # (checked here: the message shows the caller's shape, not the batched one)
                axis = "0" if self.layout == "NCHW" else "-1"
                raise ValueError(f"x must have {self.num_features} channels on axis {axis} (layout {self.layout!r}), "
                                 f"got {C} in shape {a.shape}")
            return a[np.newaxis], True
        return a, False

    def forward(self, x, *, out=None, residual=None):
        """Normalise x ((N, C, *spatial) or unbatched (C, *spatial); channels per ``layout``); returns y. residual: an
        array like x added before the layer's activation (the layer keeps a reference to it for backward)."""
        self._check_state()
        x, unbatched = self._batched(x)
        given = out  # (an unbatched call returns the caller's out itself)
        if out is not None and unbatched:
            out = ck.check_out(out, x[0], [("x", x[0])])[np.newaxis]
        x = self._check_input(x)
        saved_x = x.copy() if out is not None and np.may_share_memory(out, x) else x
        act = _epi.parse(self.activation)
        if act != _epi.NONE or residual is not None:
            if unbatched and residual is not None:
                residual = ck.as_data(residual, "residual", half=True)
                if residual.shape != x.shape[1:]:   # (named in the caller's shapes, not the batched ones)
                    raise ValueError(f"residual must have the shape of x {x.shape[1:]}, got {residual.shape}")
                residual = residual[np.newaxis]
            with ForwardStep(self, watch=self._updated(self.training)):
                y = self._forward_epilogue_in(x, out, saved_x, residual, act, unbatched)
            return (y[0] if given is None else given) if unbatched else y
        with ForwardStep(self, watch=self._updated(self.training)):
            y = self._forward_in(x, out, saved_x, unbatched)
        return (y[0] if given is None else given) if unbatched else y

    __call__ = forward

    def _reading(self):
        return self.layout

    def _forward_in(self, x, out, saved_x, unbatched):
        """forward without an epilogue (inside its ForwardStep)."""
        fw = forward_copy(self.weight)  # (before the call: out may be the weight's memory)
        if self.track_running_stats and not self.training:  # (batch norm's eval: no momentum, no update)
            y, mean, invstd = _core.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                               0.0, self.eps, self.layout, out, True, F._threads(), True)
            self._saved = (saved_x, mean, invstd, False, unbatched)
            self._fwd_weight = fw
        else:
            # momentum=None: PyTorch's instance norm passes momentum 0 (running statistics left as they are)
            update = self.training and self.track_running_stats and self.momentum is not None
            y, mean, invstd = _core.instance_norm(x, self.running_mean if update else None,
                                                  self.running_var if update else None, self.weight, self.bias, True,
                                                  self.momentum if update else 0.0, self.eps, self.layout, out,
                                                  F._threads(), 2)  # (float64 statistics, as group norm's)
            self._saved = (saved_x, mean, invstd, True, unbatched)
            self._fwd_weight = fw
        return y

    def _forward_epilogue_in(self, x, out, saved_x, residual, act, unbatched):
        """forward with a fused activation and/or residual: the running statistics of batch norm's eval (eval with
        tracked statistics), else the instance statistics (float64, kept for backward; the running ones updated with
        their batch averages as the plain forward does)."""
        w, b = forward_copy(self.weight), forward_copy(self.bias)
        if self.track_running_stats and not self.training:
            y, mean, _, var = _core.batch_norm_epi(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                   False, 0.0, self.eps, self.layout, out, True, act, residual,
                                                   F._threads(), True)
            self._saved = ("epilogue", saved_x, mean, var, False, act, residual, w, b, self.eps, unbatched)
            return y
        update = self.training and self.track_running_stats and self.momentum is not None
        # (the running statistics move as the plain forward moves them: the same call, through the epilogue)
        y, mean, var = _core.instance_norm(x, self.running_mean if update else None,
                                           self.running_var if update else None, self.weight, self.bias, True,
                                           self.momentum if update else 0.0, self.eps, self.layout, out, F._threads(),
                                           True, act, residual)
        self._saved = ("epilogue", saved_x, mean, var, True, act, residual, w, b, self.eps, unbatched)
        return y

    def backward(self, grad_out, *, out=None, grad_residual_out=None):
        """Gradient of the last forward call (through the instance statistics, or with the running statistics as
        constants after an eval-mode call that used them): returns grad_x and sets grad_weight / grad_bias (and
        grad_residual, into ``grad_residual_out`` when given, as :meth:`BatchNorm.backward`)."""
        from . import groups
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        if isinstance(self._saved[0], str):  # (a forward with an epilogue)
            return self._backward_epilogue(grad_out, out, grad_residual_out)
        _no_residual(grad_residual_out)
        x, mean, invstd, input_stats, unbatched = self._saved
        self.grad_residual = None
        given = out
        g, out = _batched_grad(grad_out, out, x, unbatched)
        lay = self._fwd_route  # (the forward's layout: ForwardStep)
        if input_stats:
            gx, gw, gb = groups.instance_norm_backward(g, x, mean, invstd, self._fwd_weight, layout=lay, out=out)
        else:
            gx, gw, gb = F.batch_norm_backward(g, x, mean, invstd, self._fwd_weight, layout=lay, out=out,
                                               training=False)
        set_param_grads(self, gw, gb)
        return (gx[0] if given is None else given) if unbatched else gx

    def _backward_epilogue(self, grad_out, out, gro):
        _, x, mean, var, input_stats, act, residual, w, b, eps, unbatched = self._saved
        if residual is None:
            _no_residual(gro)
        given, given_out = gro, out
        g, out = _batched_grad(grad_out, out, x, unbatched)
        if unbatched and gro is not None:  # (checked as the sample it is: its messages name the caller's shape)
            gro = ck.check_out(gro, x[0], [], "grad_residual_out")[np.newaxis]
        lay = self._fwd_route
        if input_stats:
            gx, gw, gb, gr = _core.group_backward_epi(g, x, mean, var, eps, None, w, b, lay, out, act, residual,
                                                      F._threads(), True, gro)
        else:
            gx, gw, gb, gr = _core.batch_norm_backward_epi(g, x, mean, var, eps, w, b, lay, out, False, act, residual,
                                                           F._threads(), gro)
        set_param_grads(self, gw, gb)
        self.grad_residual = given if given is not None else None if gr is None else gr[0] if unbatched else gr
        return (gx[0] if given_out is None else given_out) if unbatched else gx


class InstanceNorm1d(_InstanceNorm):
    """InstanceNorm over (N, C, L) or (C, L) input (NHWC: (N, L, C) or (L, C))."""
    _ranks = (3,)


class InstanceNorm2d(_InstanceNorm):
    """InstanceNorm over (N, C, H, W) or (C, H, W) input (NHWC: (N, H, W, C) or (H, W, C))."""
    _ranks = (4,)


class InstanceNorm3d(_InstanceNorm):
    """InstanceNorm over (N, C, D, H, W) or (C, D, H, W) input (NHWC: (N, D, H, W, C) or (D, H, W, C))."""
    _ranks = (5,)


class GroupNorm(_Layer):
    """Group normalization over groups of channels (``torch.nn.GroupNorm``).

    Parameters
    ----------
    num_groups : int >= 1 dividing num_channels.
    num_channels : int >= 1, the number of channels C.
    eps : float > 0.
    affine : bool, learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    layout : "NCHW" (channels on axis 1) or "NHWC" (channels last).
    dtype : float32 or float64, the dtype of the parameters.
    bias : bool (PyTorch 2.x), as :class:`BatchNorm`'s: False with affine=True, a learnable ``weight`` and no ``bias``
        (None; no ``bias`` key in the state dict, ``grad_bias`` stays None).

    activation : None, "relu", "relu6", ("leaky_relu", slope), ("clamp", lo, hi) or "silu", as :class:`BatchNorm`'s:
        the layer returns act(group_norm(x) + residual), fused into the normalise sweep, and ``backward``
        differentiates through it; ``layer(x, residual=r)`` adds r (x's shape and dtype) first and ``backward`` then
        also sets ``grad_residual``.

    Calling the layer normalises (N, C, *spatial) input (rank 2..5) with the statistics of each (sample, group), in
    training and eval mode alike; ``backward(grad_out)`` returns grad_x and sets ``grad_weight`` and ``grad_bias``.
    ``state_dict`` keys: weight, bias (affine), as PyTorch's.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, layout="NCHW", dtype=np.float32,
                 activation=None, bias=True):
        _epi.parse(activation)
        self.activation = activation
        for name, v in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if not 1 <= v < 2**31:
                raise ValueError(f"{name} must be >= 1 and < 2**31, got {v}")
        if num_channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide num_channels ({num_channels})")
        dt = ck.check_dtype(dtype)
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        self.eps = ck.check_eps(eps)
        self.affine = bool(affine)
        self.layout = ck.check_layout(layout)
        self.dtype = dt
        self.weight = np.ones(self.num_channels, dt) if self.affine else None
        self.bias = np.zeros(self.num_channels, dt) if self.affine and bias else None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self.training = True
        self._saved = self._fwd_weight = self._fwd_route = None  # (the last forward's state; its weight, copied)

    def reset_parameters(self):
        _reset_affine(self)

    def _reading(self):
        return self.layout, self.num_groups

    def _check_state(self):
        for name in ("weight", "bias"):
            v = getattr(self, name)
            if self.affine or v is not None:
                ck.per_channel(v, name, self.num_channels)
        self.eps = ck.check_eps(self.eps)
        self.layout = ck.check_layout(self.layout)
        _check_mode_and_dtype(self)

    def forward(self, x, *, out=None, residual=None):
        """Normalise x ((N, C, *spatial), rank 2..5, channels per ``layout``); returns y (``out`` if given).
        residual: an array like x added before the layer's activation (the layer keeps a reference to it for
        backward)."""
        from . import groups
        self._check_state()
        # (without per-channel parameters num_channels is unused: any C that num_groups divides, as PyTorch)
        C = self.num_channels if self.weight is not None or self.bias is not None else None
        x = ck.check_layer_input(x, None, "GroupNorm", C, self.layout, half=True)
        saved_x = x.copy() if out is not None and np.may_share_memory(out, x) else x
        act = _epi.parse(self.activation)
        w, b = forward_copy(self.weight), forward_copy(self.bias)  # (before the call: out may be their memory)
        with ForwardStep(self):
            if act != _epi.NONE or residual is not None:
                y, mean, var = _core.group_forward_epi(x, self.num_groups, self.weight, self.bias, self.eps,
                                                       self.layout, out, act, residual, F._threads(), False, True)
                self._saved = ("epilogue", saved_x, mean, var, act, residual, w, b, self.eps)
                return y
            # (the statistics kept in float64 for the backward: a float32 mean loses digits where |mean| >> std)
            y, mean, invstd = _core.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.layout,
                                               out, F._threads(), 3)
            self._saved = (saved_x, mean, invstd)
            self._fwd_weight = w
        return y

    __call__ = forward

    def backward(self, grad_out, *, out=None, grad_residual_out=None):
        """Gradient of the last forward call: returns grad_x and sets grad_weight / grad_bias (affine only), and
        grad_residual (into ``grad_residual_out`` when given) as :meth:`BatchNorm.backward`."""
        from . import groups
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        lay, G = self._fwd_route  # (the forward's: ForwardStep)
        if isinstance(self._saved[0], str):  # (a forward with an epilogue)
            _, x, mean, var, act, residual, w, b, eps = self._saved
            if residual is None:
                _no_residual(grad_residual_out)
            gx, gw, gb, self.grad_residual = _core.group_backward_epi(grad_out, x, mean, var, eps, G, w, b, lay, out,
                                                                      act, residual, F._threads(), False,
                                                                      grad_residual_out)
            set_param_grads(self, gw, gb)
            return gx
        _no_residual(grad_residual_out)
        x, mean, invstd = self._saved
        self.grad_residual = None
        gx, gw, gb = groups.group_norm_backward(grad_out, x, mean, invstd, G, self._fwd_weight, layout=lay, out=out)
        set_param_grads(self, gw, gb)
        return gx

    def state_dict(self):
        """Copies of weight and bias (affine; bias=False, or a parameter set to None: left out, as PyTorch's), PyTorch's
        keys."""
        return {k: _state_copy(self, k) for k in self._state_keys()}

    def _state_keys(self):
        return _param_keys(self)

    @property
    def _channels(self):
        return self.num_channels

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        nobias = ", bias=False" if self.affine and self.bias is None else ""
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}{nobias}, "
                f"layout={self.layout!r}, dtype={self.dtype.name}{act})")
