"""``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` running bn_simd's row kernels.

Each class subclasses its ``torch.nn`` namesake and replaces only its forward, so the constructor
(``normalized_shape, eps, elementwise_affine, bias, device, dtype``), parameters, ``state_dict`` keys (``weight``,
``bias``), ``reset_parameters``, ``repr`` and ``isinstance`` checks are PyTorch's, and state dicts load both ways.
The forward is :mod:`bn_simd.torch.rownorm`'s, which hands what the kernels do not cover to PyTorch's own function.
:func:`bn_simd.torch.convert` swaps exact ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` modules to these.
"""
import torch

from . import _bridge as B
from . import rownorm as R


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

    def forward(self, input):
        params = self._parameters
        tensors = (params.get("weight"), params.get("bias"))
        return R._layer_norm(input, self.normalized_shape, *tensors, self.eps, None,
                             B.module_views(self, input, tensors))


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on bn_simd's kernels: input (*, *normalized_shape), float32, float64, float16 or
    bfloat16 on the CPU (others: PyTorch's function); parameters of the input's dtype or float32; eps None is the
    machine epsilon of the input's dtype (float32's for 16-bit input), as PyTorch. Raises as
    :func:`bn_simd.torch.rms_norm`."""
    __getstate__ = _getstate

    def forward(self, x):
        tensors = (self._parameters.get("weight"),)
        return R._rms_norm(x, self.normalized_shape, tensors[0], self.eps, None, B.module_views(self, x, tensors))


__all__ = ["LayerNorm", "RMSNorm"]
