"""bn_simd for PyTorch users: functional calls, autograd and ``torch.nn`` drop-ins on bn_simd's kernels.

Needs PyTorch (an optional dependency: ``import bn_simd`` never imports it; this module does).

    >>> import torch, bn_simd.torch as bt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU())
    >>> model = bt.convert(model)      # every torch.nn BatchNorm*/GroupNorm/InstanceNorm*/LayerNorm/RMSNorm, in place
    >>> model = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.ReLU()), fuse_activations=True)
    >>> x = torch.randn(8, 64, 14, 14)
    >>> rm, rv, w, b = torch.zeros(64), torch.ones(64), torch.ones(64), torch.zeros(64)
    >>> y = bt.batch_norm(x, rm, rv, w, b, training=True)   # torch.nn.functional's signature; autograd works
    >>> layer = bt.BatchNorm2d(64)                      # torch.nn.BatchNorm2d's constructor and state dict
    >>> layer = bt.GroupNormAct(32, 256, activation="silu")  # GroupNorm -> SiLU in one sweep; layer(x, residual)

``bt.SyncBatchNorm(64, process_group=pg)`` is torch.nn.SyncBatchNorm for CPU tensors over a gloo process group.

What runs on the kernels: float32, float64, float16 and bfloat16 CPU tensors (16-bit ones with parameters of their
dtype or float32, PyTorch's mixed rule; float32 math, one rounding of each output; bfloat16 without ml_dtypes),
contiguous or channels-last (``torch.channels_last``, ``torch.channels_last_3d``), read and written in place (the
output keeps the input's memory format); other strides are copied once. Everything else (other dtypes and devices,
tracing and compiling, forward-mode AD) is PyTorch's own implementation, so a converted model still runs anywhere.
Gradients of input, weight and bias are PyTorch's (checked with ``torch.autograd.gradcheck``); second derivatives
(``create_graph=True``) are not supported.
"""
try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover  (the tests of this module skip without torch)
    raise ImportError("bn_simd.torch needs PyTorch (pip install torch); the rest of bn_simd does not") from e

from .functional import batch_norm, group_norm, instance_norm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
                      GroupNorm, GroupNormAct, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, InstanceNormAct1d,
                      InstanceNormAct2d, InstanceNormAct3d, convert)
from .fused import BatchNormActFunction, GroupNormActFunction, InstanceNormActFunction
from ._autograd import BatchNormFunction, GroupNormFunction, InstanceNormFunction
from .sync import SyncBatchNorm, SyncBatchNormFunction
from .rownorm import LayerNormFunction, RMSNormFunction, RowNormActFunction, layer_norm, rms_norm
from .rownorm_modules import LayerNorm, LayerNormAct, RMSNorm, RMSNormAct

__all__ = ["batch_norm", "group_norm", "instance_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "SyncBatchNorm", "convert", "BatchNormFunction",
           "GroupNormFunction", "InstanceNormFunction", "SyncBatchNormFunction",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormActFunction",
           "layer_norm", "rms_norm", "LayerNorm", "RMSNorm", "LayerNormFunction", "RMSNormFunction",
           "GroupNormActFunction", "RowNormActFunction", "GroupNormAct", "InstanceNormAct1d", "InstanceNormAct2d",
           "InstanceNormAct3d", "LayerNormAct", "RMSNormAct", "InstanceNormActFunction"]
from .fold import fold  # noqa: E402  (BN folding: bn_simd/torch/fold.py)
__all__ += ["fold"]
