"""``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` running bn_simd's row kernels.

Each class subclasses its ``torch.nn`` namesake and replaces only its forward, so the constructor
(``normalized_shape, eps, elementwise_affine, bias, device, dtype``), parameters, ``state_dict`` keys (``weight``,
``bias``), ``reset_parameters``, ``repr`` and ``isinstance`` checks are PyTorch's, and state dicts load both ways.
The forward is :mod:`bn_simd.torch.rownorm`'s, which hands what the kernels do not cover to PyTorch's own function.
:func:`bn_simd.torch.convert` swaps exact ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` modules to these, and with
``fuse_activations=True`` one followed by an activation to :class:`LayerNormAct` / :class:`RMSNormAct`.
"""
import torch

from . import _bridge as B
from . import fused as _fused
from . import rownorm as R

_fx_trace = B._fx_trace


def _getstate(self):
    # the cached NumPy views of the parameters (_bridge.module_views) stay out of pickles and deep copies
    state = torch.nn.Module.__getstate__(self)
    state.pop(B.VIEWS_KEY, None)
    return state


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on bn_simd's kernels: input (*, *normalized_shape), float32, float64, float16 or
    bfloat16 on the CPU (others: PyTorch's function); parameters of the input's dtype or float32. Raises as
    :func:`bn_simd.torch.layer_norm` (ValueError for an input whose trailing dims are not normalized_shape)."""
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable

    def forward(self, input):
        if type(input) is not torch.Tensor or _fx_trace._is_fx_tracing_flag:  # (a torch.fx trace: B.fx_call)
            y = B.fx_call(self, input, (input,), {})
            if y is not None:
                return y
        tensors = B.affine(self)
        return R._layer_norm(input, self.normalized_shape, *tensors, self.eps, None,
                             B.module_views(self, input, tensors, self.normalized_shape))


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on bn_simd's kernels: input (*, *normalized_shape), float32, float64, float16 or
    bfloat16 on the CPU (others: PyTorch's function); parameters of the input's dtype or float32; eps None is the
    machine epsilon of the input's dtype (float32's for 16-bit input), as PyTorch. Raises as
    :func:`bn_simd.torch.rms_norm`."""
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable

    def forward(self, x):
        if type(x) is not torch.Tensor or _fx_trace._is_fx_tracing_flag:  # (a torch.fx trace: B.fx_call)
            y = B.fx_call(self, x, (x,), {})
            if y is not None:
                return y
        tensors = B.affine(self, ("weight",))
        return R._rms_norm(x, self.normalized_shape, tensors[0], self.eps, None,
                           B.module_views(self, x, tensors, self.normalized_shape))


class LayerNormAct(LayerNorm):
    """:class:`LayerNorm` followed by an activation, fused: ``forward(input, residual=None)`` returns
    act(layer_norm(input) + residual) in one sweep (``activation=`` and the residual as
    :class:`bn_simd.torch.BatchNormAct1d`'s: of input's shape and dtype, or broadcasting to input's shape).
    Constructor, parameters and state dict are torch.nn.LayerNorm's plus the keyword ``activation``."""
    __init__ = _fused.act_init(torch.nn.LayerNorm)
    extra_repr = _fused.act_repr(torch.nn.LayerNorm)

    @_fused.act_forward(LayerNorm.forward)
    def forward(self, input, residual=None):
        tensors = B.affine(self)
        return R._row_norm_act(input, self.normalized_shape, *tensors, self.eps, False, self.activation, residual,
                               None, B.module_views(self, input, tensors, self.normalized_shape))


class RMSNormAct(RMSNorm):
    """:class:`RMSNorm` followed by an activation, fused: ``forward(input, residual=None)`` returns
    act(rms_norm(input) + residual) in one sweep (as :class:`LayerNormAct`). Constructor, parameters and state dict are
    torch.nn.RMSNorm's plus the keyword ``activation``."""
    __init__ = _fused.act_init(torch.nn.RMSNorm)
    extra_repr = _fused.act_repr(torch.nn.RMSNorm)

    @_fused.act_forward(RMSNorm.forward)
    def forward(self, input, residual=None):
        tensors = B.affine(self, ("weight",))
        return R._row_norm_act(input, self.normalized_shape, tensors[0], None, self.eps, True, self.activation,
                               residual, None, B.module_views(self, input, tensors, self.normalized_shape))


__all__ = ["LayerNorm", "RMSNorm", "LayerNormAct", "RMSNormAct"]
