"""LayerNorm and RMSNorm layers in the style of ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (bn_simd.rownorm's
calls with parameters, a backward and PyTorch's state-dict keys)."""
import numbers

import numpy as np

from . import _args as ck
from . import _core
from . import _epilogue as _epi
from .functional import _threads
from .layers import (ForwardStep, _no_residual, _refill, _state_copy, assign_state, check_keys, detached_values,
                     forward_copy, restore_route, train_mode)


def _shape_arg(normalized_shape):
    """normalized_shape as a tuple of ints >= 0 (an int is a 1-tuple), as PyTorch's layers keep it (a size 0 too, as
    theirs: rows of no value, whose statistics are mean 0 and rstd NaN)."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        t = (int(normalized_shape),)
    else:
        try:
            t = tuple(normalized_shape)
        except TypeError:
            raise TypeError(f"normalized_shape must be an int or a tuple of ints, got "
                            f"{type(normalized_shape).__name__}") from None
    if not t:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    for d in t:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}")
        if not 0 <= d < 2**31:
            raise ValueError(f"normalized_shape must have sizes >= 0 and < 2**31, got {normalized_shape!r}")
    return tuple(int(d) for d in t)


class _RowNorm:
    """What LayerNorm and RMSNorm share: the parameters, modes, backward bookkeeping and state."""

    _rms = False

    def _init(self, normalized_shape, eps, elementwise_affine, bias, dtype, layout, activation):
        _epi.parse(activation)
        self.activation = activation
        self.normalized_shape = _shape_arg(normalized_shape)
        self.dtype = ck.check_dtype(dtype)
        self.layout = None if layout is None else ck.check_layout(layout)
        if self.layout is not None and len(self.normalized_shape) != 1:  # (either layout names one channel axis)
            raise ValueError(f"normalized_shape must be the number of channels C with layout={layout!r}, got "
                             f"{normalized_shape!r}")
        self.eps = eps if eps is None and self._rms else ck.check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        shape = self.normalized_shape
        self.weight = np.ones(shape, self.dtype) if self.elementwise_affine else None
        self.bias = np.zeros(shape, self.dtype) if self.elementwise_affine and bias else None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self.training = True
        self._saved = self._fwd_weight = self._fwd_route = None  # (the last forward's state; its weight, copied)

    def reset_parameters(self):
        """weight to ones, bias to zeros."""
        if self.weight is not None:
            _refill(self, "weight", 1)
        if self.bias is not None:
            _refill(self, "bias", 0)

    def _reading(self):
        ns = self.normalized_shape  # (a tuple: a list reassigned may change later)
        return self.layout, ns if type(ns) is tuple else _shape_arg(ns)

    def __setstate__(self, state):
        restore_route(self, state)

    def train(self, mode=True):
        """Sets ``training`` (the layer computes the same either way; kept for PyTorch's interface); returns self."""
        self.training = train_mode(mode)
        return self

    def eval(self):
        """``train(False)``; returns self."""
        return self.train(False)

    def parameters(self):
        """The learnable arrays (weight, then bias), as ``torch.nn.Module.parameters`` lists them."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def forward(self, x, *, out=None, residual=None):
        """Normalise x (float32 or float64, trailing dims ``normalized_shape``; channels-first: (N, C, *spatial));
        returns y (``out`` if given, which may be x). Keeps what :meth:`backward` needs. residual: an array like x
        added before the layer's activation, y = act(norm(x) + residual) (the layer keeps a reference to it)."""
        x = ck.as_data(x, "x", half=True)  # (an array before the copy below: x may be a tensor or a list)
        saved_x = x.copy() if out is not None and np.may_share_memory(out, x) else x
        act = _epi.parse(self.activation)
        w, b = forward_copy(self.weight), forward_copy(self.bias)  # (before the call: out may be their memory)
        with ForwardStep(self):
            if act != _epi.NONE or residual is not None:
                y, mean, rstd = _core.row_forward_epi(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                                      self.layout, out, _threads(), self._rms, act, residual, 2)
                self._saved = ("epilogue", saved_x, mean, rstd, act, residual, w, b)
                return y
            y, mean, rstd = _core.row_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.layout,
                                           out, _threads(), self._rms, 2)
            self._saved = (saved_x, mean, rstd)  # (the float64 statistics: the backward gets them unrounded)
            self._fwd_weight = w
        return y

    __call__ = forward

    def backward(self, grad_out, *, out=None, grad_residual_out=None):
        """Gradient of the last forward call: returns grad_x and sets ``grad_weight`` / ``grad_bias`` (in the
        parameters' dtype and shape; None for a parameter the layer does not have), and ``grad_residual`` after a
        forward with a residual (into ``grad_residual_out`` when given, as :func:`bn_simd.batch_norm_backward`'s)."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        lay, shape = self._fwd_route  # (the forward's: ForwardStep)
        if isinstance(self._saved[0], str):  # (a forward with an epilogue: through it)
            _, x, mean, rstd, act, residual, w, b = self._saved
            if residual is None:
                _no_residual(grad_residual_out)
            r = _core.row_backward_epi(grad_out, x, mean, rstd, shape, w, b, lay, out, _threads(), self._rms, act,
                                       residual, grad_residual_out)
            self.grad_weight = r[1]
            self.grad_bias = None if self._rms else r[2]
            self.grad_residual = r[-1]
            return r[0]
        _no_residual(grad_residual_out)
        self.grad_residual = None
        x, mean, rstd = self._saved
        r = _core.row_norm_backward(grad_out, x, mean, rstd, shape, self._fwd_weight, self.bias, lay, out, _threads(),
                                    self._rms)
        self.grad_weight = r[1]
        self.grad_bias = None if self._rms else r[2]
        return r[0]

    def _state_keys(self):
        return [k for k in ("weight", "bias") if getattr(self, k) is not None]

    def state_dict(self):
        """Copies of the parameters under PyTorch's keys (weight, and bias for LayerNorm)."""
        return {k: _state_copy(self, k) for k in self._state_keys()}

    def load_state_dict(self, state_dict, strict=True):
        """Load a dict from :meth:`state_dict` or from the PyTorch layer's (tensors are converted). Every entry is
        checked (shape normalized_shape, a floating dtype: float16 and bfloat16 too, as the other layers take) before
        anything is assigned; strict=True also rejects missing and unexpected keys. Values are copied into the layer's
        own arrays, in its dtype (as PyTorch's)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = detached_values(state_dict)
        keys = self._state_keys()
        if strict:
            check_keys(keys, state_dict)
        shape = self._reading()[1]  # (a tuple, whatever normalized_shape was reassigned as)
        staged = {}
        for k in keys:
            if k not in state_dict:
                continue
            v = state_dict[k]
            if v is None:
                raise TypeError(f"state_dict[{k!r}] must be an array of shape {shape}, got None")
            a = ck.to_ndarray(v, k)
            # (the float check of the other layers' loaders: bfloat16, whose dtype kind is "V", too)
            ck.per_channel(a.reshape(-1), f"state_dict[{k!r}]", a.size)
            if a.shape != shape:
                raise ValueError(f"state_dict[{k!r}] must have shape {shape}, got {a.shape}")
            staged[k] = np.array(a, dtype=self.dtype)
        assign_state(self, staged)


class LayerNorm(_RowNorm):
    """Layer normalization over the trailing dims ``normalized_shape`` (``torch.nn.LayerNorm``).

    Parameters
    ----------
    normalized_shape : int or tuple of ints, the trailing dims of the input normalised together.
    eps : float > 0.
    elementwise_affine : bool, learnable ``weight`` (ones) of shape normalized_shape.
    bias : bool, with elementwise_affine, a learnable ``bias`` (zeros) too.
    dtype : float32 or float64, the parameters' dtype.
    layout : None, or "NCHW" / "channels_first": normalise over the channels (axis 1) of (N, C, *spatial) input
        (ConvNeXt's LayerNorm2d), normalized_shape = C.

    activation : None, "relu", "relu6", ("leaky_relu", slope), ("clamp", lo, hi) or "silu" (as
        :class:`bn_simd.BatchNorm`'s): the layer returns act(layer_norm(x) + residual), fused into the normalise sweep;
        ``layer(x, residual=r)`` adds r (x's shape and dtype) first; ``backward`` differentiates through both and then
        also sets ``grad_residual``.

    ``layer(x)`` normalises (training and eval alike); ``backward(grad_out)`` returns grad_x and sets ``grad_weight`` /
    ``grad_bias``, with the forward's weight (copied) and x (a reference: changing x in place before ``backward``
    changes the gradients). ``state_dict`` keys: weight, bias, as PyTorch's. Raises TypeError / ValueError naming the
    argument for wrong arguments.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32,
                 layout=None, activation=None):
        self._init(normalized_shape, eps, elementwise_affine, bias, dtype, layout, activation)

    def __repr__(self):
        lay = "" if self.layout is None else f", layout={self.layout!r}"
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                f"{'' if self.bias is not None or not self.elementwise_affine else ', bias=False'}{lay}, "
                f"dtype={self.dtype.name}{act})")


class RMSNorm(_RowNorm):
    """RMS normalization over the trailing dims ``normalized_shape`` (``torch.nn.RMSNorm``):
    y = x / sqrt(mean(x^2) + eps) * weight.

    Parameters
    ----------
    normalized_shape : int or tuple of ints.
    eps : float > 0, or None: the machine epsilon of the input's dtype (float32's for 16-bit input; as PyTorch).
    elementwise_affine : bool, a learnable ``weight`` (ones) of shape normalized_shape.
    dtype : float32 or float64, the parameters' dtype.
    layout : None, or "NCHW" / "channels_first": over the channels (axis 1) of (N, C, *spatial) input, as
        :class:`LayerNorm`'s.

    activation : as :class:`LayerNorm`'s (``layer(x, residual=r)``, ``grad_residual`` too).

    ``layer(x)``, ``backward(grad_out)`` (sets ``grad_weight``), ``state_dict`` (key weight) as :class:`LayerNorm`.
    """

    _rms = True

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32, layout=None,
                 activation=None):
        self._init(normalized_shape, eps, elementwise_affine, False, dtype, layout, activation)

    def __repr__(self):
        lay = "" if self.layout is None else f", layout={self.layout!r}"
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                f"{lay}, dtype={self.dtype.name}{act})")
