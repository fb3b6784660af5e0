"""Normalization layers with the semantics and names of Keras 3's ``keras.layers.BatchNormalization``,
``LayerNormalization``, ``RMSNormalization`` and ``GroupNormalization`` (the last three at the end of this module).

For Keras users moving a model's normalisation to NumPy arrays: the same arguments and defaults (axis=-1,
momentum=0.99, epsilon=1e-3), the same moving-statistics update (``moving = moving * momentum + batch * (1 -
momentum)``, the biased batch variance), the same masking, weights in Keras' order, and a backward for training
loops of one's own. Keras itself is not needed (nor imported). Batch renormalization (``renorm=True``, Keras 3's
arguments and moving statistics) and ghost batches (``virtual_batch_size``, Keras 2's grouping) run on the
functional calls of :mod:`bn_simd.renorm` and :mod:`bn_simd.virtual`.

    >>> import numpy as np
    >>> from bn_simd.keras import BatchNormalization
    >>> layer = BatchNormalization()                        # channels last, like Keras
    >>> x = np.random.default_rng(0).standard_normal((8, 5, 5, 3), dtype=np.float32)
    >>> y = layer(x, training=True)                         # batch statistics; moving statistics updated
    >>> gx = layer.backward(np.ones_like(y))                # sets layer.grad_gamma, layer.grad_beta
    >>> gamma, beta, moving_mean, moving_variance = layer.get_weights()
"""
import math
import numbers

import numpy as np

from . import _args as ck
from . import _core, _masked
from .functional import _threads
from .layers import ForwardStep, forward_copy, holds
from .renorm import (batch_renorm_backward, batch_renorm_forward, check_clipping, renorm_corrections,
                     update_renorm_stats)
from .virtual import check_virtual_batch_size, forward_with_var, virtual_batch_norm_backward

_KERAS_INERT = {  # Keras arguments this layer leaves out, taken (constructor, from_config) at Keras' default only
    "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None,
    "synchronized": False,
}
_MIXED = ("mixed_float16", "mixed_bfloat16")  # Keras' mixed policies: float32 variables, 16-bit computation


def _check_inert(name, value, layer="BatchNormalization"):
    """A Keras argument of _KERAS_INERT must hold its default (None; synchronized false: False, 0, 0.0 or None, as
    Keras takes them)."""
    default = _KERAS_INERT[name]
    off = value is None or (isinstance(value, (numbers.Real, np.bool_)) and not isinstance(value, np.ndarray)
                            and value == 0)
    if not (value is None if default is None else off):
        raise ValueError(f"{name}={value!r} is not supported by bn_simd.keras.{layer} (only {default!r})")


def _constant_value(value, name, any_rank=False):
    """A Keras Constant's value (a number, a list of per-channel numbers, or Keras' serialized NumPy array of them)
    as a float or a 1-d float64 array (any_rank: nested lists too, an n-d array to broadcast to the weights)."""
    if isinstance(value, dict) and value.get("class_name") == "__numpy__":
        value = (value.get("config") or {}).get("value")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    nested = isinstance(value, (list, tuple))
    items = (_flat(value) if any_rank else value) if nested else [value]
    if any_rank and nested:
        try:
            np.array(value, np.float64)
        except ValueError:  # (ragged lists)
            items = [None]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items) or (nested and not items):
        raise ValueError(f"{name} must be a Constant of a real number or of a non-empty list of per-channel real "
                         f"numbers{' (or of nested lists of them)' if any_rank else ''}, got the value {value!r}")
    return np.array(value, np.float64) if nested else float(value)


def _flat(v):
    """The numbers of nested lists, in order."""
    return [w for u in v for w in (_flat(u) if isinstance(u, (list, tuple)) else [u])]


def _constant(spec, name, any_rank=False):
    """The constant an initializer stands for: "zeros"/"ones" (Keras' names, any case), a real number, or Keras'
    serialized Zeros / Ones / Constant (whose value may be a list of per-channel values: then a 1-d float64 array;
    any_rank: nested lists too, an n-d array); None for a callable (called at build time)."""
    if callable(spec) and not isinstance(spec, (str, numbers.Number)):
        return None
    if isinstance(spec, str):
        key = spec.lower()
        if key in ("zeros", "zero"):
            return 0.0
        if key in ("ones", "one"):
            return 1.0
    elif isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return float(spec)
    elif isinstance(spec, dict) and spec.get("class_name") in ("Zeros", "Ones", "Constant"):
        cls = spec["class_name"]
        return 0.0 if cls == "Zeros" else 1.0 if cls == "Ones" else _constant_value(
            (spec.get("config") or {}).get("value", 0.0), name, any_rank)
    raise ValueError(f"{name} must be 'zeros', 'ones', a number, a serialized Keras Zeros/Ones/Constant or a "
                     f"callable (shape, dtype) -> array, got {spec!r}")


def _policy(dtype):
    """(the layer's dtype, the Keras mixed policy's name or None): float32 or float64. A Keras dtype policy, a
    ``keras.DTypePolicy`` or its serialized form, is read for its name; a mixed policy, "mixed_float16" or
    "mixed_bfloat16", keeps its variables in float32, as Keras does; another name starting with "mixed_" is refused
    (ValueError), as Keras refuses it."""
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name", dtype)
    elif not isinstance(dtype, (str, np.dtype, type)) and hasattr(dtype, "variable_dtype") and isinstance(
            getattr(dtype, "name", None), str):  # a keras.DTypePolicy (Keras is not imported here)
        dtype = dtype.name
    if isinstance(dtype, str) and dtype.startswith("mixed_"):
        if dtype not in _MIXED:
            raise ValueError(f"dtype must be float32, float64 or a Keras mixed policy ('mixed_float16', "
                             f"'mixed_bfloat16'), got {dtype!r}")
        return np.dtype(np.float32), dtype
    return ck.check_dtype(dtype), None


def _computed(x):
    """The inputs as the array Keras computes in, result_type(x.dtype, float32): float16, bfloat16 (ml_dtypes' arrays
    and torch tensors), integers and bool in float32; float32 and float64 as they are (C-contiguous)."""
    if not isinstance(x, np.ndarray) or x.dtype not in ck.SUPPORTED_DTYPES:
        x = ck.bf16_widened(ck.to_ndarray(x, "inputs"))
        if x.dtype.kind in "biu" or (x.dtype.kind == "f" and x.dtype.itemsize < 4):
            x = x.astype(np.float32)
    return ck.as_data(x, "inputs")


def _initial_array(spec, name, shape, dtype, what, any_rank=False):
    """A weight's initial values of `shape` from its initializer spec (see _constant): a Constant's list broadcast
    (1 value, or as many as the last dim; any_rank: an n-d array that broadcasts to shape), a callable (shape,
    dtype name) -> array called; what: the last dim's name for the message."""
    value = _constant(spec, name, any_rank)
    if isinstance(value, np.ndarray):  # a Constant's per-channel values (one value: every channel's, as Keras)
        if value.ndim > 1 or value.shape not in ((1,), shape[-1:]):
            try:
                if not any_rank or np.broadcast_shapes(value.shape, shape) != shape:
                    raise ValueError
            except ValueError:
                got = f"{value.shape[0]} values" if value.ndim == 1 else f"shape {value.shape}"
                raise ValueError(f"{name} must be a Constant of 1 or {shape[-1]} values {what}"
                                 f"{f' or of values broadcasting to {shape}' if any_rank else ''}, got a Constant of "
                                 f"{got}") from None
        return np.array(np.broadcast_to(value, shape), dtype=dtype)
    if value is not None:
        return np.full(shape, value, dtype)
    a = ck.to_ndarray(spec(shape, dtype.name), name)
    if a.dtype.kind not in "fiu" or a.shape != shape:
        raise ValueError(f"{name} must return an array of shape {shape} of numbers, got {a.dtype} {a.shape}")
    return np.array(a, dtype=dtype)


def _assign(layer, names, staged):
    """set_weights' assignment of checked arrays: copied into the layer's own arrays where they can hold them (as
    Keras assigns into its variables), else (another shape or dtype, read-only, or memory shared with another
    weight) replacing them."""
    held = [getattr(layer, n) for n in names]
    for i, (n, w) in enumerate(zip(names, staged)):
        cur = held[i]
        if any(j != i and isinstance(o, np.ndarray) and np.shares_memory(cur, o) for j, o in enumerate(held)) \
                or not holds(cur, w):
            setattr(layer, n, w)


def _keras_momentum(m, name):
    """A momentum in Keras' meaning (the old value's share) as a float in [0, 1]."""
    if isinstance(m, bool) or not isinstance(m, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(m).__name__}")
    v = ck.as_float(m, name, "in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (Keras' meaning: the moving statistics' share), got {m!r}")
    return v


class _KerasWeights:
    """What the Keras layers share: their weights as Keras lists them (``_weight_names()``, the learnable ones
    gamma, beta and scale), and the dtype name of their config."""

    @property
    def weights(self):
        """The weight arrays themselves in Keras' order (see :meth:`get_weights`); [] before build."""
        return [getattr(self, k) for k in self._weight_names()] if self.built else []

    @property
    def trainable_weights(self):
        return [w for k, w in zip(self._weight_names(), self.weights)
                if self.trainable and k in ("gamma", "beta", "scale")]

    @property
    def non_trainable_weights(self):
        return [w for w in self.weights if not any(w is t for t in self.trainable_weights)]

    def get_weights(self):
        """Copies of the weights in Keras' order: BatchNormalization [gamma, beta, moving_mean, moving_variance]
        (+ [moving_stddev, renorm_mean, renorm_stddev] with renorm); LayerNormalization and GroupNormalization
        [gamma, beta]; RMSNormalization [scale]; without gamma when scale=False and beta when center=False; []
        before build."""
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        """Set the weights from a list in :meth:`get_weights`' order (NumPy arrays, tensors, Keras' own
        ``get_weights()``; None is refused), in the layer's dtype. Every entry is checked before any is assigned.
        The values are copied into the layer's own arrays, as Keras assigns into its variables: the arrays
        :attr:`weights` gave before stay the layer's weights and see the new values (an array the layer holds
        otherwise, of another shape or dtype, read-only, or sharing memory with another weight, is replaced)."""
        names = self._weight_names()
        if not self.built:
            raise ValueError(f"set_weights needs the weights made first: call the layer or build(input_shape), "
                             f"got a list of {len(weights)} for a layer without weights")
        if len(weights) != len(names):
            raise ValueError(f"weights must be a list of {len(names)} arrays ({', '.join(names)}), got "
                             f"{len(weights)}")
        _assign(self, names, [self._weight_array(w, i, n) for i, (n, w) in enumerate(zip(names, weights))])

    def _dtype_name(self):
        """The mixed policy's name when the layer was made with one (and keeps float32), else the dtype's name."""
        return self._policy if self._policy is not None and self.dtype == np.float32 else self.dtype.name


def _grad_given(grad_out, shape):
    """A backward's grad_out None refused by name (to_ndarray would make it a 0-d object array: a shape error)."""
    if grad_out is None:
        raise TypeError(f"grad_out must be an array of the last call's input shape {shape}, got None")


class BatchNormalization(_KerasWeights):
    """Batch normalization over every axis but ``axis``, as ``keras.layers.BatchNormalization`` (Keras 3).

    Parameters
    ----------
    axis : int, the channel (feature) axis of the input, negative counting from the end; inputs have rank 1 to 8
        (a rank-1 input (C,) is C channels of one value each, as in Keras).
    momentum : float in [0, 1]. ``moving = moving * momentum + batch * (1 - momentum)`` (Keras' meaning: the
        opposite of PyTorch's and :class:`bn_simd.BatchNorm`'s).
    epsilon : float > 0, added to the variance.
    center, scale : bool, independently: a learnable offset ``beta`` / factor ``gamma`` (None when False).
    beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer : "zeros",
        "ones", a number, a serialized Keras Zeros/Ones/Constant (a Constant's value a number, or a list of 1 or C
        per-channel values, checked against C at build), or a callable (shape, dtype) -> array.
    beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint, synchronized : Keras' arguments this
        layer leaves out, taken when they hold Keras' defaults (None, and False for synchronized); else ValueError.
    renorm : bool. Batch renormalization (Ioffe 2017) in training, as Keras 3's ``renorm=True``: y = ((x - mean_B)
        / s_B * r + d) * gamma + beta with s_B = sqrt(var_B + epsilon), s = max(renorm_stddev, sqrt(epsilon)),
        r = clip(s_B / s, rmin, rmax) and d = clip((mean_B - renorm_mean) / s, -dmax, dmax), r and d constants for
        the gradient (see :mod:`bn_simd.renorm`). Three more weights: moving_stddev, renorm_mean, renorm_stddev.
    renorm_clipping : dict with keys among "rmax", "rmin", "dmax" (a missing key or None: no bound), or None (or,
        as Keras takes ``renorm_clipping or {}``, any false value: no clipping).
    renorm_momentum : float in [0, 1], Keras' meaning as ``momentum``: ``renorm_mean = renorm_mean *
        renorm_momentum + mean_B * (1 - renorm_momentum)``, the same for renorm_stddev with s_B. The inference
        statistics move with ``momentum``: moving_mean towards mean_B, moving_stddev towards s_B, and
        ``moving_variance = max(moving_stddev^2 - epsilon, 0)``.
    virtual_batch_size : int >= 1 or None. Ghost batch normalization in training, Keras 2's grouping: a batch of
        N = virtual_batch_size * G samples (axis 0, which must then not be the channel axis) is G virtual batches,
        sample n in virtual batch n mod G, each normalised with its own statistics; the moving statistics (and
        renorm's r and d) use the mean over the virtual batches of their means and variances. N must be a multiple
        of virtual_batch_size; a virtual batch of one value per channel and a mask are refused. Inference does not
        split the batch.
    trainable : bool. False freezes the layer: it then runs in inference mode even when called with
        training=True, as in Keras.
    dtype : float32 (Keras' default; None and the mixed policies mixed_float16 and mixed_bfloat16 too, whose
        variables are float32) or float64, or a Keras dtype policy of one of these (a ``keras.DTypePolicy`` or its
        serialized dict, read for its name): the weights' dtype and the output's (float32 under a mixed policy,
        where Keras would return the policy's 16-bit compute dtype; :meth:`get_config` gives the policy's name).
        Under a mixed policy Keras also rounds the inputs to the 16-bit type before its statistics; this layer
        computes on the inputs as given (float32 ones stay float32), so its statistics and outputs differ from
        Keras' by about that rounding (1e-4 to 1e-3 relative on float32 inputs). Other names starting with
        "mixed_" raise ValueError, as in Keras.
    name : str.

    The weights are made at the first call (or :meth:`build`, once: a built layer's build raises ValueError, as in
    Keras), shaped (C,) with C = input_shape[axis]; later inputs must have the same rank and C. ``layer(inputs,
    training=False, mask=None)``: x = inputs float32 or float64, computed in x's dtype with float64 statistics
    (float16, bfloat16 (ml_dtypes' arrays, torch tensors), integer and bool inputs in float32, as Keras does),
    returned in the layer's dtype. training=True uses the batch's mean and biased variance (those of the entries
    where ``mask`` is nonzero when a mask is given: x's shape without the channel axis, or a shape broadcasting to
    it) and updates ``moving_mean`` / ``moving_variance`` in place; every entry is normalised. :meth:`backward`
    gives the gradients of the last call.

    As Keras: one value per channel (a batch of one row) gives variance 0, and a mask that leaves a batch no entry
    gives mean 0 and variance 0 (moving statistics updated with them). Unlike Keras: an empty batch leaves the
    moving statistics as they were (Keras writes NaN; with virtual_batch_size too, at any rank), and a mask must
    broadcast to x's shape without its channel axis wherever that axis is (Keras inserts it last). With renorm a
    rank-1 input works (Keras 3 fails on it): s_B = sqrt(epsilon), y = d·gamma + beta. A virtual batch of one value
    per channel raises ValueError (Keras 2 gives it variance 0).

    Raises TypeError for wrong types or dtypes and ValueError for wrong shapes or values, naming the argument; a
    call that raises changes nothing. A layer holds state: call one layer from one thread at a time.
    """

    _policy = None  # (the mixed policy's name; a layer pickled before it existed reads this)

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones", *,
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 renorm=False, renorm_clipping=None, renorm_momentum=0.99, synchronized=False,
                 virtual_batch_size=None, trainable=True, dtype="float32", name="batch_normalization"):
        self.axis = ck.check_axis(axis)
        self.momentum = _keras_momentum(momentum, "momentum")
        self.epsilon = ck.check_eps(epsilon, "epsilon")
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        for arg in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                    "moving_variance_initializer"):
            _constant(getattr(self, arg), arg)
        if not isinstance(renorm, (bool, np.bool_)):
            raise TypeError(f"renorm must be a bool, got {type(renorm).__name__}")
        self.renorm = bool(renorm)
        # (checked only with renorm, and stored as Keras stores it: its config round-trips; a training call with
        # renorm checks it again)
        if self.renorm:
            try:  # (Keras takes `renorm_clipping or {}`: None, [], 0 and any other false value are no clipping)
                none = not renorm_clipping
            except (TypeError, ValueError):  # (an array of several values: refused below)
                none = False
            renorm_clipping = {} if none else renorm_clipping
            check_clipping(renorm_clipping)
        self.renorm_clipping = dict(renorm_clipping) if isinstance(renorm_clipping, dict) else renorm_clipping
        self.renorm_momentum = _keras_momentum(renorm_momentum, "renorm_momentum")
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        if self.virtual_batch_size is not None and self.axis == 0:
            raise ValueError("axis must not be 0 with virtual_batch_size: axis 0 is the batch axis the virtual "
                             "batches split, got axis=0")
        for arg, value in (("beta_regularizer", beta_regularizer), ("gamma_regularizer", gamma_regularizer),
                           ("beta_constraint", beta_constraint), ("gamma_constraint", gamma_constraint),
                           ("synchronized", synchronized)):
            _check_inert(arg, value)
        self.trainable = bool(trainable)
        self.dtype, self._policy = _policy(dtype)
        self.name = str(name)
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self.grad_gamma = self.grad_beta = None
        self.built = False
        self._ndim = self._C = None  # (the built rank and channel count)
        self._saved = self._fwd_gamma = None

    # ---- weights -------------------------------------------------------------------------------------------
    def build(self, input_shape):
        """Make the weights for inputs of shape ``input_shape`` (rank 1 to 8; C = input_shape[axis]). A built layer
        raises ValueError and keeps its weights, as Keras 3 refuses a second build."""
        shape = tuple(input_shape)
        if self.built:
            raise ValueError(f"build: the layer is already built (inputs of {self._ndim} dimensions, "
                             f"{self.num_features} channels on axis {self.axis}) and keeps its weights, as Keras "
                             f"refuses a second build; make a new layer for other inputs, got input_shape {shape}")
        nd = len(shape)
        if not 1 <= nd <= ck.MAX_DIMS:
            raise ValueError(f"input_shape must have 1 to {ck.MAX_DIMS} dimensions, got {shape}")
        if not -nd <= self.axis < nd:
            raise ValueError(f"axis {self.axis} is out of bounds for input shape {shape}")
        if self.virtual_batch_size is not None and self.axis % nd == 0:
            raise ValueError(f"axis must not be the batch axis 0 with virtual_batch_size, got axis={self.axis} for "
                             f"input shape {shape}")
        C = shape[self.axis]
        if C is None or isinstance(C, bool) or not isinstance(C, numbers.Integral) or C < 1:
            raise ValueError(f"input_shape[{self.axis}] (the channels) must be a known int >= 1, got {C!r}")
        C = int(C)
        made = {}
        for arg, attr, on in (("gamma_initializer", "gamma", self.scale), ("beta_initializer", "beta", self.center),
                              ("moving_mean_initializer", "moving_mean", True),
                              ("moving_variance_initializer", "moving_variance", True)):
            if on:
                made[attr] = self._initial(getattr(self, arg), arg, C)
        if self.renorm:  # Keras: the stddevs start at sqrt(moving_variance's initial value), renorm_mean at its mean's
            made["moving_stddev"] = np.sqrt(made["moving_variance"])
            made["renorm_mean"] = made["moving_mean"].copy()
            made["renorm_stddev"] = made["moving_stddev"].copy()
        self.gamma = self.beta = None
        for attr, v in made.items():
            setattr(self, attr, v)
        self._ndim, self._C = nd, C
        self.built = True

    def _initial(self, spec, name, C):
        return _initial_array(spec, name, (C,), self.dtype, f"(the channels, input_shape[{self.axis}])")

    @property
    def num_features(self):
        """C, the number of channels (None before the weights are made): the built one, whatever arrays the weights'
        attributes were given since (each is checked against it)."""
        return self._C

    def __setstate__(self, state):
        """Unpickling, also a layer pickled before it kept its channel count and its call's axis."""
        self.__dict__.update(state)
        if "_C" not in state:
            self._C = None if self.moving_mean is None else int(np.shape(self.moving_mean)[0])
        if isinstance(self._saved, tuple) and len(self._saved) == 7:
            self._saved = self._saved + (self.axis,)
        elif isinstance(self._saved, _Grouped) and not hasattr(self._saved, "axis"):
            self._saved.axis = self.axis

    def _weight_names(self):
        return ((["gamma"] if self.scale else []) + (["beta"] if self.center else [])
                + ["moving_mean", "moving_variance"]
                + (["moving_stddev", "renorm_mean", "renorm_stddev"] if self.renorm else []))


    def _weight_array(self, w, i, n):
        """set_weights' entry i (weight n) checked, in the layer's dtype."""
        C = self.num_features
        if w is None:
            raise TypeError(f"weights[{i}] ({n}) must be an array of shape ({C},), got None")
        try:
            return np.array(ck.per_channel(w, n, C), dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"weights[{i}] ({n}): {e}".replace(f"channels of x", "channels of the layer")) from None

    # ---- configuration -------------------------------------------------------------------------------------
    def get_config(self):
        """The constructor's arguments as a dict (Keras' keys; the initializers as given; dtype the mixed policy's
        name for a layer made with one). virtual_batch_size (Keras 2's key; Keras 3 has none) only when set, so that
        Keras 3's ``from_config`` takes the dict of a layer without virtual batches."""
        config = {"name": self.name, "trainable": self.trainable, "dtype": self._dtype_name(), "axis": self.axis,
                  "momentum": self.momentum, "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
                  "beta_initializer": self.beta_initializer, "gamma_initializer": self.gamma_initializer,
                  "moving_mean_initializer": self.moving_mean_initializer,
                  "moving_variance_initializer": self.moving_variance_initializer, "renorm": self.renorm,
                  "renorm_clipping": (dict(self.renorm_clipping) if isinstance(self.renorm_clipping, dict)
                                      else self.renorm_clipping),
                  "renorm_momentum": self.renorm_momentum}
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        return config

    @classmethod
    def from_config(cls, config):
        """A new layer from :meth:`get_config`'s dict, or from a Keras config with these arguments (Keras 3's
        renorm keys included, Keras 2's virtual_batch_size taken, and its one-element list axis, as a built
        tf.keras 2 layer saves it, read as that axis; Keras' dtype policy and serialized Zeros/Ones/Constant
        initializers are read; its regularizers, constraints and ``synchronized`` must hold their defaults, None and
        False). Raises TypeError for other keys."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(cls(**{}).get_config()) - {"virtual_batch_size"} - set(_KERAS_INERT))
        if unknown:
            raise TypeError(f"config has keys BatchNormalization does not take: {unknown}")
        axis = config.get("axis")
        if isinstance(axis, (list, tuple)) and len(axis) == 1:
            # (a built tf.keras 2 layer saves its axis as a one-element list; Keras' legacy loader unwraps it)
            config = dict(config, axis=axis[0])
        return cls(**config)

    # ---- forward / backward --------------------------------------------------------------------------------
    def _input(self, x):
        """The call's inputs as the array computed in: Keras' result_type(x.dtype, float32), float16, bfloat16
        (ml_dtypes' arrays and torch tensors), integers and bool in float32; float32 and float64 as they are."""
        a = _computed(x)
        self.axis = ck.check_axis(self.axis)  # (reassigned since)
        if not self.built:
            self.build(a.shape)
        if not -self._ndim <= self.axis < self._ndim:
            raise ValueError(f"axis {self.axis} is out of bounds for the {self._ndim} dimensions the layer was built "
                             f"for")
        if a.ndim != self._ndim or a.shape[self.axis] != self.num_features:
            raise ValueError(f"inputs must have {self._ndim} dimensions and {self.num_features} channels on axis "
                             f"{self.axis} (the shape the layer was built for), got shape {a.shape}")
        return a

    def _check_state(self, C):
        for k in self._weight_names():
            v = getattr(self, k)
            if v is None:  # (reassigned since: per_channel takes None for "no weight")
                raise TypeError(f"{k} must be an array of shape ({C},), got None (set scale / center to go without "
                                f"gamma / beta)")
            ck.per_channel(v, k, C, inplace=k not in ("gamma", "beta"))

    def __call__(self, inputs, training=False, mask=None):
        """Normalise ``inputs`` (x: float32/float64, float16, bfloat16, integers and bool computed in float32; the
        built rank, C channels on ``axis``); returns y in the layer's dtype.

        training=True (and trainable): the batch statistics (of the unmasked entries when ``mask`` is given),
        moving statistics updated in place; otherwise the moving statistics (a mask is checked and unused)."""
        fresh = not self.built
        try:
            x = self._input(inputs)
            C = self.num_features
            self._check_state(C)
            if training and self.trainable:
                self._check_training_args(x.ndim)
            moving = ("moving_mean", "moving_variance") + (("moving_stddev", "renorm_mean", "renorm_stddev")
                                                           if self.renorm else ())
            with ForwardStep(self, watch=[getattr(self, k) for k in moving] if training and self.trainable else ()):
                y = self._forward(x, training, mask, C)
        except Exception:
            if fresh and self.built:  # (a call that raises changes nothing: not even the build it started with)
                self._unbuild()
            raise
        return y if y.dtype == self.dtype else y.astype(self.dtype)

    def _unbuild(self):
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self._ndim = self._C = None
        self.built = False

    def _forward(self, x, training, mask, C):
        """__call__'s work once its arguments are checked (inside its ForwardStep)."""
        lay = ck.axis_layout(self.axis)
        nt = _threads()
        pos = None
        if training and self.trainable and self.virtual_batch_size is not None:
            if mask is not None:
                raise ValueError("mask must be None with virtual_batch_size (ghost batches take no mask), got a "
                                 f"{type(mask).__name__}")
            y, self._saved = self._virtual_forward(x)
            self._fwd_gamma = forward_copy(self.gamma)
        elif training and self.trainable:
            share = 1.0 - self.momentum  # bn_simd's momentum: running = (1 - m) running + m batch
            if mask is not None:
                x, view, pos, n, every = _masked.prepare(x, lay, mask)
                if every:
                    pos = None
            else:
                n = x.size // C
            r = d = None
            if pos is None and n >= 2 and not self.renorm:
                y, mean, invstd = _core.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                                                   True, share, self.epsilon, lay, None, False, nt, True)
            else:
                if pos is None:  # one value per channel: mean x, variance 0 (Keras' moments)
                    mean, var = _core.batch_stats(x, lay, nt)
                elif n == 0:  # no entry selected: Keras' masked moments, 0 / (0 + its epsilon), are 0 and 0
                    mean, var = np.zeros(C), np.zeros(C)
                else:
                    mean, var = _masked.stats(x, lay, view, pos, False, nt)
                invstd = 1.0 / np.sqrt(var + self.epsilon)
                if self.renorm:
                    r, d = self._corrections(mean, var, empty=not x.size)
                    scale, shift = self._composed(r, d)
                    y = _core.normalize(x, mean, var, scale, shift, self.epsilon, lay, None, nt)
                else:
                    y = _core.normalize(x, mean, var, self.gamma, self.beta, self.epsilon, lay, None, nt)
                if x.size:  # (n matters only to an unbiased update; a count of 0 would update nothing)
                    if self.renorm:
                        self._renorm_update(mean, invstd, max(n, 1))
                    else:
                        _core.update_running_stats(self.moving_mean, self.moving_variance, mean, var, max(n, 1),
                                                   share, False)
            self._saved = (x, mean, invstd, True, pos, r, d, self.axis)
            self._fwd_gamma = forward_copy(self.gamma)
        else:
            if mask is not None:
                _masked.prepare(x, lay, mask)
            y, mean, invstd = _core.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                                               False, 0.0, self.epsilon, lay, None, False, nt, True)
            self._saved = (x, mean, invstd, False, None, None, None, self.axis)
            self._fwd_gamma = forward_copy(self.gamma)
        return y

    def backward(self, grad_out):
        """Gradient of the last call: returns grad_x (the dtype x was computed in) and sets ``grad_gamma`` (scale)
        and ``grad_beta`` (center) in the layer's dtype.

        After a call with batch statistics the gradient runs through them (the unmasked entries' when masked, each
        virtual batch's own with virtual_batch_size), as Keras' autograd does; after an inference call the moving
        statistics are constants. With renorm, r and d are constants (Keras' stop_gradient): grad_x is batch norm's
        with the weight gamma·r, and grad_gamma = r·sum(grad_out·x̂) + d·sum(grad_out)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a call first")
        _grad_given(grad_out, self._saved.shape if isinstance(self._saved, _Grouped) else self._saved[0].shape)
        if isinstance(self._saved, _Grouped):
            return self._virtual_backward(grad_out)
        x, mean, invstd, batch, pos, r, d, axis = self._saved  # (the forward's axis, not one reassigned since)
        g = ck.bf16_widened(ck.to_ndarray(grad_out, "grad_out"))
        if g.dtype != x.dtype and g.dtype.kind == "f" and g.shape == x.shape:
            g = g.astype(x.dtype)  # (y came back in the layer's dtype, which may not be the one computed in)
        lay = ck.axis_layout(axis)
        # renorm: batch norm's gradient with the weight gamma r (r, d constants), as renorm.batch_renorm_backward
        w = self._fwd_gamma if r is None else self._composed(r, d, self._fwd_gamma)[0]
        if pos is not None:
            ax = axis % x.ndim
            mask = pos.reshape(x.shape[:ax] + x.shape[ax + 1:])  # (the positions the forward selected)
            gx, gw, gb = _masked.backward(g, x, mean, invstd, w, lay, None, mask, _threads())
        else:
            gx, gw, gb = _core.batch_norm_backward(g, x, mean, invstd, w, lay, None, batch, _threads())
        if r is not None:  # d(y)/d(gamma) = x̂ r + d
            gw = r * gw + d * gb
        self.grad_gamma = gw.astype(self.dtype) if self.scale else None
        self.grad_beta = gb.astype(self.dtype) if self.center else None
        return gx

    # ---- renormalization and virtual batches (the functional calls of bn_simd.renorm / bn_simd.virtual) -------
    def _check_training_args(self, nd):
        """The attributes a training call uses (users may reassign them after construction), checked before it."""
        self.momentum = _keras_momentum(self.momentum, "momentum")
        if self.renorm:
            check_clipping(self.renorm_clipping)
            self.renorm_momentum = _keras_momentum(self.renorm_momentum, "renorm_momentum")
        self.virtual_batch_size = check_virtual_batch_size(self.virtual_batch_size)
        moved = ("moving_mean", "moving_variance") + (
            ("moving_stddev", "renorm_mean", "renorm_stddev") if self.renorm else ())
        ck.stats_distinct(tuple((k, getattr(self, k)) for k in moved))
        if self.virtual_batch_size is not None and self.axis % nd == 0:
            raise ValueError(f"axis must not be the batch axis 0 with virtual_batch_size, got axis={self.axis} for "
                             f"an input of {nd} dimensions")

    def _clip_bounds(self):
        rmax, rmin, dmax = check_clipping(self.renorm_clipping)
        return {"rmax": rmax, "rmin": rmin, "dmax": dmax}

    def _corrections(self, mean, var, empty=False):
        if empty:  # no statistics: the neutral r = 1, d = 0, so that the gradients' sums over nothing stay 0
            return np.ones(self.num_features), np.zeros(self.num_features)
        return renorm_corrections(mean, var, self.renorm_mean, self.renorm_stddev, eps=self.epsilon,
                                  **self._clip_bounds())

    def _composed(self, r, d, gamma=False):
        """Keras' composed transform (x̂ r + d) gamma + beta = x̂ (gamma r) + (gamma d + beta), float64 (C,); gamma:
        the layer's unless given (None: none)."""
        gamma = self.gamma if gamma is False else gamma
        g64 = np.ones_like(r) if gamma is None else np.asarray(gamma, np.float64)
        b64 = np.zeros_like(r) if self.beta is None else np.asarray(self.beta, np.float64)
        return g64 * r, g64 * d + b64

    def _renorm_update(self, save_mean, save_invstd, n):
        # renorm.py's momenta are the new batch's share: Keras' m is 1 - m there
        update_renorm_stats(self.moving_mean, self.moving_variance, self.moving_stddev, self.renorm_mean,
                            self.renorm_stddev, save_mean, save_invstd, n, momentum=1.0 - self.momentum,
                            renorm_momentum=1.0 - self.renorm_momentum, eps=self.epsilon, unbiased=False)

    def _batch_first(self, a, axis=None):
        """x-shaped ``a`` as the (N, C, S) "NCHW" / (N, M, C) "NHWC" array the functional calls take (a view, or a
        channels-last copy when the channel axis, ``axis`` or the layer's, is neither 1 nor the last)."""
        nd, ax = a.ndim, (self.axis if axis is None else axis) % a.ndim
        N, C = a.shape[0], a.shape[ax]
        rest = math.prod(a.shape[1:ax] + a.shape[ax + 1:])  # (not -1: an empty batch has no size to infer it from)
        if ax == 1:
            return a.reshape(N, C, rest) if nd > 2 else a, "NCHW"
        if ax == nd - 1:
            return a.reshape(N, rest, C), "NHWC"
        return np.ascontiguousarray(np.moveaxis(a, ax, -1)).reshape(N, rest, C), "NHWC"

    def _from_batch_first(self, a, shape, axis=None):
        ax = (self.axis if axis is None else axis) % len(shape)
        if ax in (1, len(shape) - 1):
            return a.reshape(shape)
        moved = shape[:ax] + shape[ax + 1:] + (shape[ax],)
        return np.ascontiguousarray(np.moveaxis(a.reshape(moved), -1, ax))

    def _virtual_forward(self, x):
        """Training forward with virtual batches (and renorm): (y in x's shape, _Grouped)."""
        v = self.virtual_batch_size
        xv, lay = self._batch_first(x)
        if self.renorm:
            y, mean, invstd, r, d = batch_renorm_forward(xv, self.renorm_mean, self.renorm_stddev, self.gamma,
                                                         self.beta, eps=self.epsilon, layout=lay,
                                                         virtual_batch_size=v, **self._clip_bounds())
            if not x.size:
                r, d = self._corrections(None, None, empty=True)
        else:
            y, mean, invstd, var = forward_with_var(xv, self.gamma, self.beta, v, self.epsilon, lay, None)
            r = d = None
        if x.size:
            n = x.size // (x.shape[0] // v * self.num_features)  # values per channel of one virtual batch
            if self.renorm:
                self._renorm_update(mean, invstd, n)
            else:  # Keras 2: one update with the mean over the virtual batches of their means and variances
                _core.update_running_stats(self.moving_mean, self.moving_variance, mean.mean(axis=0),
                                           var.mean(axis=0), n, 1.0 - self.momentum, False)
        saved = _Grouped(xv, lay, x.shape, mean, invstd, r, d, v, self.axis)
        return self._from_batch_first(y, x.shape), saved

    def _virtual_backward(self, grad_out):
        sv = self._saved
        g = ck.bf16_widened(ck.to_ndarray(grad_out, "grad_out"))
        if g.shape != sv.shape:
            raise ValueError(f"grad_out must have shape {sv.shape} (the shape of x), got {g.shape}")
        if g.dtype != sv.x.dtype and g.dtype.kind == "f":
            g = g.astype(sv.x.dtype)
        gv, _ = self._batch_first(ck.as_data(g, "grad_out"), sv.axis)  # (the forward's axis)
        if sv.r is None:
            gx, gw, gb = virtual_batch_norm_backward(gv, sv.x, sv.mean, sv.invstd, self._fwd_gamma, layout=sv.layout,
                                                     virtual_batch_size=sv.v)
        else:
            gx, gw, gb = batch_renorm_backward(gv, sv.x, sv.mean, sv.invstd, sv.r, sv.d, self._fwd_gamma,
                                               layout=sv.layout, virtual_batch_size=sv.v)
        self.grad_gamma = gw.astype(self.dtype) if self.scale else None
        self.grad_beta = gb.astype(self.dtype) if self.center else None
        return self._from_batch_first(gx, sv.shape, sv.axis)

    def __repr__(self):
        extra = (f", renorm=True, renorm_clipping={self.renorm_clipping!r}, renorm_momentum={self.renorm_momentum}"
                 if self.renorm else "")
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        return (f"BatchNormalization(axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, "
                f"center={self.center}, scale={self.scale}{extra}, dtype={self._dtype_name()}, name={self.name!r})")


class _Grouped:
    """What a training call with virtual batches keeps for its backward: the batch-first input and its layout, x's
    shape, the per-virtual-batch statistics (G, C), r and d (renorm) or None, the virtual batch size and the channel
    axis."""

    __slots__ = ("x", "layout", "shape", "mean", "invstd", "r", "d", "v", "axis")

    def __init__(self, x, layout, shape, mean, invstd, r, d, v, axis):
        self.x, self.layout, self.shape, self.mean, self.invstd, self.r, self.d = x, layout, shape, mean, invstd, r, d
        self.v, self.axis = v, axis


# ---- layer, RMS and group normalization --------------------------------------------------------------------------

_LN_INERT = ("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint")


def _untransposed(a, perm):
    """a, computed on x.transpose(perm) made contiguous, back in x's axis order (C-contiguous)."""
    return np.ascontiguousarray(a.transpose(np.argsort(perm)))


class _KerasNorm(_KerasWeights):
    """What LayerNormalization, RMSNormalization and GroupNormalization share: weights made at the first call (or
    build), shaped by the input; Keras' get/set_weights, config and dtype policy; a call that keeps what
    :meth:`backward` needs. A subclass gives ``_names`` (its weights, with the initializer argument of each),
    ``_plan(shape)`` (checks the built shape, returns the weights' shape) and ``_forward`` / ``_backward``."""

    def _init_common(self, epsilon, trainable, dtype, name, inert):
        self.epsilon = ck.check_eps(epsilon, "epsilon")
        for arg, value in inert.items():
            _check_inert(arg, value, type(self).__name__)
        self.trainable = bool(trainable)
        self.dtype, self._policy = _policy(dtype)
        self.name = str(name)
        self.built = False
        self._ndim = self._wshape = None  # (the built rank, and the weights' shape)
        self._saved = None
        for n, _ in self._names:
            setattr(self, n, None)
            setattr(self, "grad_" + n, None)

    def _init_affine(self, center, scale, beta_initializer, gamma_initializer, epsilon, trainable, dtype, name,
                     inert):
        """_init_common with Keras' center / scale, their initializers and the four inert arguments (_LN_INERT)."""
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        for arg in ("beta_initializer", "gamma_initializer"):
            _constant(getattr(self, arg), arg, True)
        self._init_common(epsilon, trainable, dtype, name, dict(zip(_LN_INERT, inert)))

    def _weight_names(self):
        return [n for n, _ in self._names if self._has(n)]

    def _has(self, n):
        return True

    def build(self, input_shape):
        """Make the weights for inputs of shape ``input_shape`` (rank 1 to 8; None for a size the weights do not
        take). A built layer raises ValueError and keeps its weights, as Keras 3 refuses a second build."""
        shape = tuple(input_shape)
        if self.built:
            raise ValueError(f"build: the layer is already built (inputs of {self._ndim} dimensions, weights of "
                             f"shape {self._wshape}) and keeps its weights, as Keras refuses a second build; make a "
                             f"new layer for other inputs, got input_shape {shape}")
        if not 1 <= len(shape) <= ck.MAX_DIMS:
            raise ValueError(f"input_shape must have 1 to {ck.MAX_DIMS} dimensions, got {shape}")
        wshape = self._plan(shape)
        made = {n: _initial_array(getattr(self, arg) if arg else "ones", arg or n, wshape, self.dtype,
                                  "(the last normalised axis)", True) for n, arg in self._names if self._has(n)}
        for n, v in made.items():
            setattr(self, n, v)
        self._ndim, self._wshape = len(shape), wshape
        self.built = True

    def _size(self, shape, a, what):
        """shape[a] as an int >= 1 (a size the weights take)."""
        d = shape[a]
        if d is None or isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
            raise ValueError(f"input_shape[{a}] ({what}) must be a known int >= 1, got {d!r}")
        return int(d)

    def _weight_array(self, w, i, n):
        return self._weight_value(w, f"weights[{i}] ({n})")

    def _weight_value(self, w, what):
        """A weight's value checked (a floating-point array of the weights' shape: set_weights takes floating-point
        NumPy arrays, tensors, Keras' own get_weights()) and in the layer's dtype."""
        if w is None:
            raise TypeError(f"{what} must be an array of shape {self._wshape}, got None")
        a = ck.bf16_widened(ck.to_ndarray(w, what))
        if a.dtype.kind != "f":
            raise TypeError(f"{what} must be a floating-point array, got dtype {a.dtype}")
        if a.shape != self._wshape:
            raise ValueError(f"{what} must have shape {self._wshape}, got {a.shape}")
        return np.array(a, dtype=self.dtype)

    def __call__(self, inputs, training=None, mask=None):
        """Normalise ``inputs`` (float32/float64, float16, bfloat16, integers and bool computed in float32, as
        Keras); returns y in the layer's dtype. ``training`` and ``mask`` change nothing, as in Keras (a mask is
        Keras' to pass on to the next layer). Keeps the input (a reference) and the statistics for
        :meth:`backward`."""
        x = _computed(inputs)
        fresh = not self.built
        if fresh:
            self.build(x.shape)
        try:
            if not self._takes(x.shape):
                raise ValueError(f"inputs must have the sizes the weights of shape {self._wshape} were built for "
                                 f"(from inputs of {self._ndim} dimensions; group norm keeps that rank), got shape "
                                 f"{x.shape}")
            params = {n: self._weight_value(getattr(self, n), n) for n in self._weight_names()}
            with ForwardStep(self):
                y = self._forward(x, params)
        except Exception:
            if fresh:  # (a call that raises changes nothing: not even the build it started with)
                self._unbuild()
            raise
        return y if y.dtype == self.dtype else y.astype(self.dtype)

    def _takes(self, shape):
        """Whether a built layer takes inputs of this shape: its rank, and the sizes its weights were made for."""
        return len(shape) == self._ndim and self._plan(shape) == self._wshape

    def _unbuild(self):
        for n, _ in self._names:
            setattr(self, n, None)
        self._ndim = self._wshape = None
        self.built = False

    def backward(self, grad_out):
        """Gradient of the last call: returns grad_x (the dtype x was computed in, x's shape) and sets the
        weights' gradients, ``grad_gamma`` / ``grad_beta`` (``grad_scale`` for RMSNormalization), in the layer's
        dtype (None for a weight the layer does not have)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a call first")
        shape, dtype = self._saved[0], self._saved[1]
        _grad_given(grad_out, shape)
        g = ck.bf16_widened(ck.to_ndarray(grad_out, "grad_out"))
        if g.shape != shape:
            raise ValueError(f"grad_out must have the shape of the last call's inputs {shape}, got {g.shape}")
        if g.dtype != dtype and g.dtype.kind == "f":
            g = g.astype(dtype)  # (y came back in the layer's dtype, which may not be the one computed in)
        gx, grads = self._backward(ck.as_data(g, "grad_out"))
        for n, _ in self._names:
            v = grads.get(n) if self._has(n) else None
            setattr(self, "grad_" + n, None if v is None else v.astype(self.dtype))
        return gx

    def get_config(self):
        """The constructor's arguments as a dict (Keras' keys; the initializers as given; dtype the mixed policy's
        name for a layer made with one)."""
        return {"name": self.name, "trainable": self.trainable, "dtype": self._dtype_name(), **self._config()}

    @classmethod
    def from_config(cls, config):
        """A new layer from :meth:`get_config`'s dict or a Keras layer's config (its dtype policy and serialized
        initializers read; its regularizers and constraints must be None). Raises TypeError for other keys."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(cls().get_config()) - set(cls._inert))
        if unknown:
            raise TypeError(f"config has keys {cls.__name__} does not take: {unknown}")
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items() if not k.endswith("_initializer"))
        return f"{type(self).__name__}({args}, dtype={self._dtype_name()}, name={self.name!r})"


def _group_args(groups, axis):
    """GroupNormalization's groups and axis as ints (the constructor's, or the attributes reassigned since)."""
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int >= 1 or -1, got {type(groups).__name__}")
    if groups < 1 and groups != -1:
        raise ValueError(f"groups must be an int >= 1 or -1 (one group a channel), got {groups}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    return int(groups), int(axis)


class _RowNormalization(_KerasNorm):
    """Layer and RMS normalization over the axes ``axis`` of each position of the others (bn_simd's row norm:
    trailing axes as rows, axis 1 of rank 3 and more channels-first, any other set through one transposed copy)."""

    _rms = False
    _inert = _LN_INERT

    def _set_axis(self, axis):
        if isinstance(axis, (list, tuple)):
            if not axis or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axis):
                raise TypeError(f"axis must be an int or a non-empty list of ints, got {axis!r}")
            self.axis = [int(a) for a in axis]
        elif isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int or a non-empty list of ints, got {type(axis).__name__}")
        else:
            self.axis = int(axis)

    def _plan(self, shape):
        self._set_axis(self.axis)  # (the attribute may have been reassigned)
        nd = len(shape)
        given = self.axis if isinstance(self.axis, list) else [self.axis]
        if any(not -nd <= a < nd for a in given):
            raise ValueError(f"axis {self.axis} is out of bounds for input shape {shape}")
        axes = sorted(a % nd for a in given)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis must name each axis once, got {self.axis} for input shape {shape}")
        self._axes = axes
        return tuple(self._size(shape, a, "a normalised axis") for a in axes)

    def _takes(self, shape):
        # (any rank whose normalised axes have the weights' sizes: Keras' layer and RMS norm fix no rank)
        return self._plan(shape) == self._wshape

    def _route(self, nd):
        """(perm, layout, normalized_shape): x's axes put in rows (perm None: as they are), and the row-norm
        call's layout and normalized_shape."""
        axes = self._axes
        if axes == list(range(nd - len(axes), nd)):
            return None, None, self._wshape
        if axes == [1]:
            return None, "NCHW", self._wshape[0]
        return [d for d in range(nd) if d not in axes] + axes, None, self._wshape

    def _forward(self, x, params):
        route = perm, layout, ns = self._route(x.ndim)
        xs = x if perm is None else np.ascontiguousarray(x.transpose(perm))
        w, b = params.get(self._names[0][0]), params.get("beta")
        y, mean, rstd = _core.row_norm(xs, ns, w, b, self.epsilon, layout, None, _threads(), self._rms, 2)
        # (the route kept: a later call of another rank, failed or not, replans the axes)
        self._saved = (x.shape, x.dtype, xs, mean, rstd, w, b, route)
        return y if perm is None else _untransposed(y, perm)

    def _backward(self, g):
        _, _, xs, mean, rstd, w, b, (perm, layout, ns) = self._saved
        gs = g if perm is None else np.ascontiguousarray(g.transpose(perm))
        r = _core.row_norm_backward(gs, xs, mean, rstd, ns, w, b, layout, None, _threads(), self._rms)
        gx = r[0] if perm is None else _untransposed(r[0], perm)
        return gx, dict(zip([n for n, _ in self._names], r[1:]))


class LayerNormalization(_RowNormalization):
    """Layer normalization over the axes ``axis`` of each position of the other axes, as
    ``keras.layers.LayerNormalization`` (Keras 3): y = (x - mean) / sqrt(var + epsilon) * gamma + beta, mean and the
    biased var over ``axis``.

    Parameters
    ----------
    axis : int or list of ints (negative counting from the end), the axes normalised together; the weights are shaped
        by their sizes in increasing axis order (a list of axes given as negative and positive numbers is taken in
        the order of the axes they name). Trailing axes run in place on the rows; axis 1 of an input of rank 3 or more
        (channels first) does too; any other set of axes goes through one transposed copy of the input.
    epsilon : float > 0, added to the variance.
    center, scale : bool, independently: a learnable offset ``beta`` / factor ``gamma`` (None when False).
    beta_initializer, gamma_initializer : as :class:`BatchNormalization`'s; a Constant may also hold nested lists (an
        array) that broadcast to the weights' shape.
    beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint : taken when None only (ValueError).
    rms_scaling : False only: Keras deprecated ``rms_scaling=True`` (it scales by the variance, not the root mean
        square); :class:`RMSNormalization` is the RMS norm.
    trainable, dtype, name : as :class:`BatchNormalization`'s (float32 or float64, or a Keras dtype policy).

    ``layer(inputs)`` normalises (training and inference alike); later calls may have another rank (Keras fixes
    none for this layer) whose normalised axes have the weights' sizes. :meth:`backward` gives the gradients of the
    last call (``grad_gamma``, ``grad_beta``). Inputs are computed in float32 (16-bit, integers, bool) or float64
    and y returned in the layer's dtype, as Keras' compute dtype (except under a mixed policy, where Keras returns a
    16-bit y and this layer float32, and RMSNormalization of integers, which Keras returns as integers). Statistics
    in float64 (bn_simd's layer norm). Raises TypeError / ValueError naming the argument; a call that raises changes
    nothing. A layer holds state: call one layer from one thread at a time.
    """

    _names = (("gamma", "gamma_initializer"), ("beta", "beta_initializer"))

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", *, beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, rms_scaling=False, trainable=True, dtype="float32",
                 name="layer_normalization"):
        self._set_axis(axis)
        if rms_scaling:
            raise ValueError("rms_scaling=True is not supported (Keras deprecated it: it scales by the variance, not "
                             "the root mean square); use bn_simd.keras.RMSNormalization, got rms_scaling=True")
        self._init_affine(center, scale, beta_initializer, gamma_initializer, epsilon, trainable, dtype, name,
                          (beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint))

    def _has(self, n):
        return self.scale if n == "gamma" else self.center

    def _config(self):
        return {"axis": list(self.axis) if isinstance(self.axis, list) else self.axis, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale, "rms_scaling": False,
                "beta_initializer": self.beta_initializer, "gamma_initializer": self.gamma_initializer}


class RMSNormalization(_RowNormalization):
    """RMS normalization over the axes ``axis``, as ``keras.layers.RMSNormalization`` (Keras 3):
    y = x / sqrt(mean(x^2) + epsilon) * scale.

    Parameters
    ----------
    axis : int or list of ints, as :class:`LayerNormalization`'s.
    epsilon : float > 0 (Keras' default 1e-6).
    trainable, dtype, name : as :class:`BatchNormalization`'s.

    The weight ``scale`` (ones) is shaped by the sizes of ``axis``; :meth:`backward` sets ``grad_scale``. As
    :class:`LayerNormalization` otherwise.
    """

    _rms = True
    _inert = ()
    _names = (("scale", None),)

    def __init__(self, axis=-1, epsilon=1e-6, *, trainable=True, dtype="float32", name="rms_normalization"):
        self._set_axis(axis)
        self._init_common(epsilon, trainable, dtype, name, {})

    def _config(self):
        return {"axis": list(self.axis) if isinstance(self.axis, list) else self.axis, "epsilon": self.epsilon}


class GroupNormalization(_KerasNorm):
    """Group normalization, as ``keras.layers.GroupNormalization`` (Keras 3): the channels on ``axis`` split in
    ``groups`` groups of consecutive channels, each (sample, group) normalised over its channels and every other axis
    but the batch axis 0, then y = x̂ * gamma + beta per channel.

    Parameters
    ----------
    groups : int >= 1 dividing the channels, or -1: one group a channel (instance normalization; the layer's groups
        becomes the channels at build, as Keras').
    axis : int, the channel axis (not 0, the batch axis): channels last (-1, Keras' default) and channels first (1)
        run in place; any other axis goes through one transposed copy of the input.
    epsilon, center, scale, beta_initializer, gamma_initializer, the regularizers and constraints, trainable, dtype,
        name : as :class:`LayerNormalization`'s (gamma and beta shaped (C,)).

    Inputs have rank 2 to 8 (the rank built for, as Keras' input spec), a known size on ``axis``. A group of one
    value (a batch of one, one channel a group, no other axis) normalises to beta, as in Keras. :meth:`backward`
    sets ``grad_gamma`` and ``grad_beta``. Statistics in float64 (bn_simd's group norm).
    """

    _inert = _LN_INERT
    _names = (("gamma", "gamma_initializer"), ("beta", "beta_initializer"))
    _has = LayerNormalization._has

    def __init__(self, groups=32, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", *, beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, trainable=True, dtype="float32", name="group_normalization"):
        self.groups, self.axis = _group_args(groups, axis)
        self._groups_given = self.groups  # (-1 becomes C at build; a build undone restores it)
        self._init_affine(center, scale, beta_initializer, gamma_initializer, epsilon, trainable, dtype, name,
                          (beta_regularizer, gamma_regularizer, beta_constraint, gamma_constraint))

    def _plan(self, shape):
        self.groups, self.axis = _group_args(self.groups, self.axis)  # (the attributes may have been reassigned)
        nd = len(shape)
        if nd < 2:
            raise ValueError(f"inputs must have 2 to {ck.MAX_DIMS} dimensions (a batch axis and a channel axis), got "
                             f"shape {shape}")
        if not -nd <= self.axis < nd or self.axis % nd == 0:
            raise ValueError(f"axis {self.axis} must name a channel axis of input shape {shape} (not the batch axis "
                             f"0)")
        C = self._size(shape, self.axis % nd, "the channels")
        G = C if self.groups == -1 else self.groups
        if G > C or C % G:
            raise ValueError(f"groups ({G}) must divide the number of channels ({C}) on axis {self.axis}")
        return (C,)

    def __setstate__(self, state):
        """Unpickling, also a layer pickled before its call's route and groups were kept with its statistics."""
        self.__dict__.update(state)
        if isinstance(self._saved, tuple) and len(self._saved) == 7:
            self._saved = self._saved + (self._route(self._saved[0]), self.groups)

    def build(self, input_shape):
        super().build(input_shape)
        if self.groups == -1:
            self.groups = self._wshape[0]  # (as Keras' build: one group a channel)

    def _unbuild(self):
        super()._unbuild()
        self.groups = self._groups_given

    def _route(self, shape):
        """(perm, layout, the shape of the rank <= 3 view group norm runs on): channels last or first in place
        (the other axes but 0 flattened), any other axis moved last by perm."""
        nd, a = len(shape), self.axis % len(shape)
        perm = None if a in (1, nd - 1) else [d for d in range(nd) if d != a] + [a]
        if perm is not None:
            shape = tuple(shape[d] for d in perm)
        C, S = self._wshape[0], int(np.prod(shape[1:], dtype=np.int64)) // self._wshape[0]
        if nd == 2 or a == nd - 1 or perm is not None:
            return perm, "NHWC", (shape[0], C) if nd == 2 else (shape[0], S, C)
        return perm, "NCHW", (shape[0], C, S)

    def _forward(self, x, params):
        perm, layout, view = self._route(x.shape)
        xs = (x if perm is None else np.ascontiguousarray(x.transpose(perm))).reshape(view)
        w, b = params.get("gamma"), params.get("beta")
        G = self._wshape[0] if self.groups == -1 else self.groups  # (-1 set again after build: one group a channel)
        y, mean, invstd = _core.group_norm(xs, G, w, b, self.epsilon, layout, None, _threads(), 3, False)
        self._saved = (x.shape, x.dtype, xs, mean, invstd, w, b, (perm, layout, view), G)
        return self._back(y, x.shape, perm)

    @staticmethod
    def _back(a, shape, perm):
        """a, computed on the view, in x's shape and axis order."""
        if perm is None:
            return a.reshape(shape)
        return _untransposed(a.reshape(tuple(shape[d] for d in perm)), perm)

    def _backward(self, g):
        from .groups import group_norm_backward
        shape, _, xs, mean, invstd, w, b, (perm, layout, view), G = self._saved  # (the forward's route and groups)
        gs = (g if perm is None else np.ascontiguousarray(g.transpose(perm))).reshape(view)
        gx, gw, gb = group_norm_backward(gs, xs, mean, invstd, G, w, layout=layout)
        return self._back(gx, shape, perm), {"gamma": gw, "beta": gb}

    def _config(self):
        return {"groups": self.groups, "axis": self.axis, "epsilon": self.epsilon, "center": self.center,
                "scale": self.scale, "beta_initializer": self.beta_initializer,
                "gamma_initializer": self.gamma_initializer}
