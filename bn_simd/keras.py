"""A batch-normalization layer with the semantics and names of Keras 3's ``keras.layers.BatchNormalization``.

For Keras users moving a model's normalisation to NumPy arrays: the same arguments and defaults (axis=-1,
momentum=0.99, epsilon=1e-3), the same moving-statistics update (``moving = moving * momentum + batch * (1 -
momentum)``, the biased batch variance), the same masking, weights in Keras' order, and a backward for training
loops of one's own. Keras itself is not needed (nor imported).

    >>> import numpy as np
    >>> from bn_simd.keras import BatchNormalization
    >>> layer = BatchNormalization()                        # channels last, like Keras
    >>> x = np.random.default_rng(0).standard_normal((8, 5, 5, 3), dtype=np.float32)
    >>> y = layer(x, training=True)                         # batch statistics; moving statistics updated
    >>> gx = layer.backward(np.ones_like(y))                # sets layer.grad_gamma, layer.grad_beta
    >>> gamma, beta, moving_mean, moving_variance = layer.get_weights()
"""
import numbers

import numpy as np

from . import _args as ck
from . import _core, _masked
from .functional import _threads

_KERAS_INERT = {  # Keras arguments this layer leaves out, taken by from_config when they hold Keras' default
    "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None,
    "synchronized": False,
}


def _constant(spec, name):
    """The constant an initializer stands for: "zeros"/"ones" (Keras' names, any case), a real number, or Keras'
    serialized Zeros / Ones / Constant; None for a callable (called at build time)."""
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
        return 0.0 if cls == "Zeros" else 1.0 if cls == "Ones" else float((spec.get("config") or {}).get("value", 0.0))
    raise ValueError(f"{name} must be 'zeros', 'ones', a number, a serialized Keras Zeros/Ones/Constant or a "
                     f"callable (shape, dtype) -> array, got {spec!r}")


def _dtype(dtype):
    """The layer's dtype: float32 or float64 (a Keras dtype policy's serialized form is read for its name)."""
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name", dtype)
    return ck.check_dtype(dtype)


class BatchNormalization:
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
        "ones", a number, a serialized Keras Zeros/Ones/Constant, or a callable (shape, dtype) -> array.
    trainable : bool. False freezes the layer: it then runs in inference mode even when called with
        training=True, as in Keras.
    dtype : float32 (Keras' default) or float64: the weights' dtype and the output's.
    name : str.

    The weights are made at the first call (or :meth:`build`), shaped (C,) with C = input_shape[axis]; later
    inputs must have the same rank and C. ``layer(x, training=False, mask=None)``: x float32 or float64, computed
    in x's dtype with float64 statistics (float16, integer and bool inputs in float32, as Keras does), returned in
    the layer's dtype. training=True uses the batch's mean and
    biased variance (those of the entries where ``mask`` is nonzero when a mask is given: x's shape without the
    channel axis, or a shape broadcasting to it) and updates ``moving_mean`` / ``moving_variance`` in place; every
    entry is normalised. :meth:`backward` gives the gradients of the last call.

    As Keras: one value per channel (a batch of one row) gives variance 0, and a mask that leaves a batch no entry
    gives mean 0 and variance 0 (moving statistics updated with them). Unlike Keras: an empty batch leaves the
    moving statistics as they were (Keras writes NaN), and a mask must broadcast to x's shape without its channel
    axis wherever that axis is (Keras inserts it last).

    Raises TypeError for wrong types or dtypes and ValueError for wrong shapes or values, naming the argument; a
    call that raises changes nothing. A layer holds state: call one layer from one thread at a time.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones", *,
                 trainable=True, dtype="float32", name="batch_normalization"):
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.axis = ck.check_axis(axis)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum must be a real number in [0, 1], got {type(momentum).__name__}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (Keras' meaning: the moving statistics' share), got "
                             f"{momentum!r}")
        self.momentum = float(momentum)
        self.epsilon = ck.check_eps(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        for arg in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                    "moving_variance_initializer"):
            _constant(getattr(self, arg), arg)
        self.trainable = bool(trainable)
        self.dtype = _dtype(dtype)
        self.name = str(name)
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.grad_gamma = self.grad_beta = None
        self.built = False
        self._ndim = None
        self._saved = None

    # ---- weights -------------------------------------------------------------------------------------------
    def build(self, input_shape):
        """Make the weights for inputs of shape ``input_shape`` (rank 1 to 8; C = input_shape[axis])."""
        shape = tuple(input_shape)
        nd = len(shape)
        if not 1 <= nd <= ck.MAX_DIMS:
            raise ValueError(f"input_shape must have 1 to {ck.MAX_DIMS} dimensions, got {shape}")
        if not -nd <= self.axis < nd:
            raise ValueError(f"axis {self.axis} is out of bounds for input shape {shape}")
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
        self.gamma = self.beta = None
        for attr, v in made.items():
            setattr(self, attr, v)
        self._ndim = nd
        self.built = True

    def _initial(self, spec, name, C):
        value = _constant(spec, name)
        if value is not None:
            return np.full(C, value, self.dtype)
        a = ck.to_ndarray(spec((C,), self.dtype.name), name)
        if a.dtype.kind not in "fiu" or a.shape != (C,):
            raise ValueError(f"{name} must return an array of shape ({C},) of numbers, got {a.dtype} {a.shape}")
        return np.array(a, dtype=self.dtype)

    @property
    def num_features(self):
        """C, the number of channels (None before the weights are made)."""
        return None if self.moving_mean is None else self.moving_mean.shape[0]

    def _weight_names(self):
        return (["gamma"] if self.scale else []) + (["beta"] if self.center else []) + ["moving_mean",
                                                                                          "moving_variance"]

    @property
    def weights(self):
        """The weight arrays themselves in Keras' order: gamma (scale), beta (center), moving_mean,
        moving_variance; [] before build."""
        return [getattr(self, k) for k in self._weight_names()] if self.built else []

    @property
    def trainable_weights(self):
        return [w for k, w in zip(self._weight_names(), self.weights) if self.trainable and k in ("gamma", "beta")]

    @property
    def non_trainable_weights(self):
        return [w for w in self.weights if not any(w is t for t in self.trainable_weights)]

    def get_weights(self):
        """Copies of the weights in Keras' order: [gamma, beta, moving_mean, moving_variance], without gamma when
        scale=False and beta when center=False; [] before build."""
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        """Set the weights from a list in :meth:`get_weights`' order (NumPy arrays, tensors, Keras' own
        ``get_weights()``), copied into the layer's dtype. Every entry is checked before any is assigned."""
        names = self._weight_names()
        if not self.built:
            raise ValueError(f"set_weights needs the weights made first: call the layer or build(input_shape), "
                             f"got a list of {len(weights)} for a layer without weights")
        if len(weights) != len(names):
            raise ValueError(f"weights must be a list of {len(names)} arrays ({', '.join(names)}), got "
                             f"{len(weights)}")
        C = self.num_features
        staged = [np.array(ck.per_channel(w, n, C), dtype=self.dtype) for n, w in zip(names, weights)]
        for n, w in zip(names, staged):
            setattr(self, n, w)

    # ---- configuration -------------------------------------------------------------------------------------
    def get_config(self):
        """The constructor's arguments as a dict (Keras' keys; the initializers as given)."""
        return {"name": self.name, "trainable": self.trainable, "dtype": self.dtype.name, "axis": self.axis,
                "momentum": self.momentum, "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
                "beta_initializer": self.beta_initializer, "gamma_initializer": self.gamma_initializer,
                "moving_mean_initializer": self.moving_mean_initializer,
                "moving_variance_initializer": self.moving_variance_initializer}

    @classmethod
    def from_config(cls, config):
        """A new layer from :meth:`get_config`'s dict, or from a Keras config with these arguments (Keras' dtype
        policy and serialized Zeros/Ones/Constant initializers are read; its regularizers, constraints and
        ``synchronized`` must hold their defaults, None and False). Raises TypeError for other keys."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        config = dict(config)
        for k, default in _KERAS_INERT.items():
            if k in config:
                v = config.pop(k)
                if v is not default and v != default:
                    raise ValueError(f"{k}={v!r} is not supported by bn_simd.keras.BatchNormalization (only "
                                     f"{default!r})")
        unknown = sorted(set(config) - set(cls(**{}).get_config()))
        if unknown:
            raise TypeError(f"config has keys BatchNormalization does not take: {unknown}")
        return cls(**config)

    # ---- forward / backward --------------------------------------------------------------------------------
    def _input(self, x):
        if not isinstance(x, np.ndarray) or x.dtype not in ck.SUPPORTED_DTYPES:
            a = ck.to_ndarray(x, "x")
            # Keras computes in result_type(x.dtype, float32): float16, integers and bool in float32
            if a.dtype.kind in "biu" or (a.dtype.kind == "f" and a.dtype.itemsize < 4):
                x = a.astype(np.float32)
        a = ck.as_data(x, "x")
        if not self.built:
            self.build(a.shape)
        if a.ndim != self._ndim or a.shape[self.axis] != self.num_features:
            raise ValueError(f"x must have {self._ndim} dimensions and {self.num_features} channels on axis "
                             f"{self.axis} (the shape the layer was built for), got shape {a.shape}")
        return a

    def _check_state(self, C):
        for k in self._weight_names():
            ck.per_channel(getattr(self, k), k, C, inplace=k.startswith("moving"))

    def __call__(self, x, training=False, mask=None):
        """Normalise x (float32/float64, the built rank, C channels on ``axis``); returns y in the layer's dtype.

        training=True (and trainable): the batch statistics (of the unmasked entries when ``mask`` is given),
        moving statistics updated in place; otherwise the moving statistics (a mask is checked and unused)."""
        x = self._input(x)
        C = self.num_features
        self._check_state(C)
        lay = ck.axis_layout(self.axis)
        nt = _threads()
        pos = None
        if training and self.trainable:
            share = 1.0 - self.momentum  # bn_simd's momentum: running = (1 - m) running + m batch
            if mask is not None:
                x, view, pos, n, every = _masked.prepare(x, lay, mask)
                if every:
                    pos = None
            else:
                n = x.size // C
            if pos is None and n >= 2:
                y, mean, invstd = _core.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                                                   True, share, self.epsilon, lay, None, False, nt, True)
            else:
                if pos is None:  # one value per channel: mean x, variance 0 (Keras' moments)
                    mean, var = _core.batch_stats(x, lay, nt)
                elif n == 0:  # no entry selected: Keras' masked moments, 0 / (0 + its epsilon), are 0 and 0
                    mean, var = np.zeros(C), np.zeros(C)
                else:
                    mean, var = _masked.stats(x, lay, view, pos, False, nt)
                y = _core.normalize(x, mean, var, self.gamma, self.beta, self.epsilon, lay, None, nt)
                if x.size:  # (n matters only to an unbiased update; a count of 0 would update nothing)
                    _core.update_running_stats(self.moving_mean, self.moving_variance, mean, var, max(n, 1), share,
                                               False)
                invstd = 1.0 / np.sqrt(var + self.epsilon)
            self._saved = (x, mean, invstd, True, pos)
        else:
            if mask is not None:
                _masked.prepare(x, lay, mask)
            y, mean, invstd = _core.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta,
                                               False, 0.0, self.epsilon, lay, None, False, nt, True)
            self._saved = (x, mean, invstd, False, None)
        return y if y.dtype == self.dtype else y.astype(self.dtype)

    def backward(self, grad_out):
        """Gradient of the last call: returns grad_x (the dtype x was computed in) and sets ``grad_gamma`` (scale) and ``grad_beta``
        (center) in the layer's dtype.

        After a call with batch statistics the gradient runs through them (the unmasked entries' when masked),
        as Keras' autograd does; after an inference call the moving statistics are constants."""
        if self._saved is None:
            raise RuntimeError("backward() needs a call first")
        x, mean, invstd, batch, pos = self._saved
        g = ck.to_ndarray(grad_out, "grad_out")
        if g.dtype != x.dtype and g.dtype.kind == "f" and g.shape == x.shape:
            g = g.astype(x.dtype)  # (y came back in the layer's dtype, which may not be the one computed in)
        lay = ck.axis_layout(self.axis)
        if pos is not None:
            ax = self.axis % x.ndim
            mask = pos.reshape(x.shape[:ax] + x.shape[ax + 1:])  # (the positions the forward selected)
            gx, gw, gb = _masked.backward(g, x, mean, invstd, self.gamma, lay, None, mask, _threads())
        else:
            gx, gw, gb = _core.batch_norm_backward(g, x, mean, invstd, self.gamma, lay, None, batch, _threads())
        self.grad_gamma = gw.astype(self.dtype) if self.scale else None
        self.grad_beta = gb.astype(self.dtype) if self.center else None
        return gx

    def __repr__(self):
        return (f"BatchNormalization(axis={self.axis}, momentum={self.momentum}, epsilon={self.epsilon}, "
                f"center={self.center}, scale={self.scale}, dtype={self.dtype.name}, name={self.name!r})")
