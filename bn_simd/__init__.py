"""bn_simd: batch, group, instance, layer and RMS normalization for NumPy arrays on CPUs.

C kernels (AVX2/FMA, AVX-512 and portable scalar, chosen at run time), OpenMP threads, the GIL released
around every kernel, and PyTorch's semantics:

    >>> import numpy as np, bn_simd
    >>> x = np.random.default_rng(0).standard_normal((8, 16, 32, 32), dtype=np.float32)
    >>> rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    >>> y = bn_simd.batch_norm(x, rm, rv, training=True)          # updates rm, rv in place
    >>> layer = bn_simd.BatchNorm2d(16)                             # or BatchNorm(16, layout="NHWC")
    >>> y = layer(x); gx = layer.backward(np.ones_like(y))

See ``bn_simd.show_config()`` for the kernels and threads in use.
"""
from ._clib import get_include, get_library_dirs
from ._config import Context, __version__, get_isa, get_num_threads, set_isa, set_num_threads, show_config
from .functional import (Moments, backward_apply, backward_coefficients, backward_reduce, batch_moments, batch_norm,
                         batch_norm_backward, batch_norm_forward, batch_stats, merge_moments, norm_coefficients,
                         normalize, update_running_stats)
from .fold import fold_conv, fold_linear, fold_params
from .groups import (group_norm, group_norm_backward, group_norm_forward, instance_norm, instance_norm_backward,
                     instance_norm_forward)
from .layers import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
                     InstanceNorm3d)
from .rownorm import (layer_norm, layer_norm_backward, layer_norm_forward, rms_norm, rms_norm_backward,
                      rms_norm_forward)
from .rownorm_layers import LayerNorm, RMSNorm
from .renorm import batch_renorm, batch_renorm_backward, batch_renorm_forward, renorm_corrections, update_renorm_stats
from .sync import (SyncBatchNorm, sync_backward_reduce, sync_batch_norm_backward, sync_batch_norm_forward,
                   sync_batch_stats)
from .virtual import virtual_batch_norm, virtual_batch_norm_backward, virtual_batch_norm_forward

__all__ = [
    "get_include", "get_library_dirs",
    "__version__", "show_config", "Context", "get_isa", "set_isa", "get_num_threads", "set_num_threads",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "batch_stats", "normalize", "backward_reduce", "backward_apply", "update_running_stats",
    "Moments", "batch_moments", "merge_moments", "norm_coefficients", "backward_coefficients",
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "SyncBatchNorm", "sync_batch_stats", "sync_backward_reduce", "sync_batch_norm_forward", "sync_batch_norm_backward",
    "virtual_batch_norm", "virtual_batch_norm_forward", "virtual_batch_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward", "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "LayerNorm", "RMSNorm",
    "batch_renorm", "batch_renorm_forward", "batch_renorm_backward", "renorm_corrections", "update_renorm_stats",
    "fold_params", "fold_conv", "fold_linear",
]
