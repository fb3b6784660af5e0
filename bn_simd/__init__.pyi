# Type stubs of bn_simd's public API (the names of bn_simd.__all__). tests/test_type_stubs.py checks them against the
# run-time signatures with mypy's stubtest, so a signature changed in the .py modules without its stub fails there.
#
# Conventions: data arrays (x, grad_out, out, residual) are ndarrays of a floating dtype (float32/float64; float16 where
# a call takes it), and the result has x's dtype (the TypeVar _F); per-channel arrays (weight, bias, running
# statistics) are any array-like of a float dtype; statistics computed in float64 are typed NDArray[np.float64].
from collections.abc import Iterator, Sequence
from typing import Any, Literal, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from typing_extensions import Self, TypeAlias

__all__ = [
    "get_include", "get_library_dirs", "__version__", "show_config", "Context", "get_isa", "set_isa",
    "get_num_threads", "set_num_threads", "batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_stats",
    "normalize", "backward_reduce", "backward_apply", "update_running_stats", "Moments", "batch_moments",
    "merge_moments", "norm_coefficients", "backward_coefficients", "BatchNorm", "BatchNorm1d", "BatchNorm2d",
    "BatchNorm3d", "group_norm", "group_norm_forward", "group_norm_backward", "instance_norm",
    "instance_norm_forward", "instance_norm_backward", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d", "SyncBatchNorm", "sync_batch_stats", "sync_backward_reduce", "sync_batch_norm_forward",
    "sync_batch_norm_backward", "virtual_batch_norm", "virtual_batch_norm_forward", "virtual_batch_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward", "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "LayerNorm", "RMSNorm", "batch_renorm", "batch_renorm_forward", "batch_renorm_backward", "renorm_corrections",
    "update_renorm_stats", "fold_params", "fold_conv", "fold_linear",
]

__version__: str

_F = TypeVar("_F", bound=np.floating[Any])
_Float: TypeAlias = NDArray[np.floating[Any]]
_F64: TypeAlias = NDArray[np.float64]

# layout=: channels on axis 1 ("NCHW", alias "channels_first") or last ("NHWC", alias "channels_last")
_Layout: TypeAlias = Literal["NCHW", "NHWC", "channels_first", "channels_last"]
# activation= of the fused epilogues (bn_simd/_epilogue.py); names are matched case-insensitively at run time
_Activation: TypeAlias = (
    Literal["relu", "relu6", "silu", "swish", "leaky_relu"]
    | tuple[Literal["leaky_relu"]]
    | tuple[Literal["leaky_relu"], float]
    | tuple[Literal["clamp"], float | None, float | None]
)
_Isa: TypeAlias = Literal["scalar", "avx2", "avx512", "auto"]
_SyncMode: TypeAlias = Literal["exact", "fast"]
_Shape: TypeAlias = int | Sequence[int]
_Mask: TypeAlias = ArrayLike | None
# renorm_clipping: a dict (run time: dict only) with keys among "rmax", "rmin", "dmax", values float or None
_Clipping: TypeAlias = dict[str, Any]
# a communicator: an mpi4py communicator, a torch.distributed process group, an object with allreduce/allgather
# (bn_simd.sync's protocol), or None (the initialised world)
_Comm: TypeAlias = Any

# ---- the C library the wheel carries (bn_simd/_clib.py) --------------------------------------------------------
def get_include() -> str: ...
def get_library_dirs() -> list[str]: ...

# ---- configuration (bn_simd/_config.py) ------------------------------------------------------------------------
def show_config() -> dict[str, Any]: ...
def get_isa() -> str: ...
def set_isa(name: _Isa) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int | None) -> None: ...

class Context:
    isa_setting: _Isa | None
    num_threads: int | None
    cl_strip_bytes: int | None
    slab_bytes: int | None
    def __init__(self, *, isa: _Isa | None = None, num_threads: int | None = None, cl_strip_bytes: int | None = None,
                 slab_bytes: int | None = None) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> Literal[False]: ...

# ---- batch norm, functional (bn_simd/functional.py) ------------------------------------------------------------
def batch_norm(x: NDArray[_F], running_mean: ArrayLike | None = None, running_var: ArrayLike | None = None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
               unbiased_running_var: bool = True, axis: int | None = None, mask: _Mask = None,
               activation: _Activation | None = None, residual: NDArray[Any] | None = None) -> NDArray[_F]: ...

# (y, save_mean, save_invstd); with an activation or a residual also save_stats = (mean, var) in float64
@overload
def batch_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                       eps: float = 1e-5, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                       axis: int | None = None, mask: _Mask = None, activation: None = None,
                       residual: None = None) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def batch_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                       eps: float = 1e-5, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                       axis: int | None = None, mask: None = None, activation: _Activation,
                       residual: NDArray[Any] | None = None
                       ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
@overload
def batch_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                       eps: float = 1e-5, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                       axis: int | None = None, mask: None = None, activation: _Activation | None = None,
                       residual: NDArray[Any]
                       ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...

# (grad_x, grad_weight, grad_bias); through an epilogue also grad_residual (None without a residual)
@overload
def batch_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], save_mean: ArrayLike | None,
                        save_invstd: ArrayLike | None, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                        out: NDArray[_F] | None = None, training: bool = True, axis: int | None = None,
                        mask: _Mask = None, activation: None = None, residual: None = None,
                        bias: ArrayLike | None = None, eps: float = 1e-5,
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: None = None
                        ) -> tuple[NDArray[_F], _Float, _Float]: ...
@overload
def batch_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], save_mean: ArrayLike | None,
                        save_invstd: ArrayLike | None, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                        out: NDArray[_F] | None = None, training: bool = True, axis: int | None = None,
                        mask: None = None, activation: _Activation, residual: NDArray[Any] | None = None,
                        bias: ArrayLike | None = None, eps: float = 1e-5,
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: NDArray[_F] | None = None
                        ) -> tuple[NDArray[_F], _Float, _Float, NDArray[_F] | None]: ...
@overload
def batch_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], save_mean: ArrayLike | None,
                        save_invstd: ArrayLike | None, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                        out: NDArray[_F] | None = None, training: bool = True, axis: int | None = None,
                        mask: None = None, activation: _Activation | None = None, residual: NDArray[Any],
                        bias: ArrayLike | None = None, eps: float = 1e-5,
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: NDArray[_F] | None = None
                        ) -> tuple[NDArray[_F], _Float, _Float, NDArray[_F] | None]: ...

def batch_stats(x: NDArray[np.floating[Any]], *, layout: _Layout = "NCHW", axis: int | None = None,
                mask: _Mask = None) -> tuple[_F64, _F64]: ...
def normalize(x: NDArray[_F], mean: ArrayLike, var: ArrayLike, weight: ArrayLike | None = None,
              bias: ArrayLike | None = None, *, eps: float = 1e-5, layout: _Layout = "NCHW",
              out: NDArray[_F] | None = None, axis: int | None = None) -> NDArray[_F]: ...
def backward_reduce(grad_out: NDArray[np.floating[Any]], x: NDArray[np.floating[Any]], mean: ArrayLike, *,
                    layout: _Layout = "NCHW", axis: int | None = None) -> tuple[_F64, _F64]: ...
def backward_apply(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike, a: ArrayLike, b: ArrayLike, d: ArrayLike,
                   *, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                   axis: int | None = None) -> NDArray[_F]: ...
def update_running_stats(running_mean: _Float, running_var: _Float, mean: ArrayLike, var: ArrayLike, n: int,
                         momentum: float, *, unbiased: bool = True) -> None: ...

class Moments:
    count: _F64
    shift: _F64
    residual: _F64
    m2: _F64
    def __init__(self, count: ArrayLike, shift: ArrayLike, residual: ArrayLike, m2: ArrayLike) -> None: ...
    @property
    def num_channels(self) -> int: ...
    def __iter__(self) -> Iterator[_F64]: ...

def batch_moments(x: NDArray[np.floating[Any]], *, layout: _Layout = "NCHW", axis: int | None = None,
                  mask: _Mask = None) -> Moments: ...
# merge_moments(m1, m2, ...) or merge_moments([m1, m2, ...])
def merge_moments(*parts: Moments | Sequence[Moments]) -> tuple[_F64, _F64]: ...
# (m, a, b, exact)
def norm_coefficients(mean: ArrayLike, var: ArrayLike, weight: ArrayLike | None = None,
                      bias: ArrayLike | None = None, *, eps: float = 1e-5,
                      dtype: DTypeLike = ...) -> tuple[_Float, _Float, _Float, bool]: ...
# (m, a, b, d, grad_weight, grad_bias)
def backward_coefficients(sum_dy: ArrayLike, sum_dyxm: ArrayLike, mean: ArrayLike, invstd: ArrayLike, n: int,
                          weight: ArrayLike | None = None, *, training: bool = True, dtype: DTypeLike = ...
                          ) -> tuple[_Float, _Float, _Float, _Float, _F64, _F64]: ...

# ---- group and instance norm (bn_simd/groups.py) ---------------------------------------------------------------
def group_norm(x: NDArray[_F], num_groups: int, weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               eps: float = 1e-5, *, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
               activation: _Activation | None = None, residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
# (y, mean, invstd); with an activation or a residual also save_stats = (mean, var) in float64, (N, num_groups)
@overload
def group_norm_forward(x: NDArray[_F], num_groups: int, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, *, eps: float = 1e-5, layout: _Layout = "NCHW",
                       out: NDArray[_F] | None = None, activation: None = None,
                       residual: None = None) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def group_norm_forward(x: NDArray[_F], num_groups: int, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, *, eps: float = 1e-5, layout: _Layout = "NCHW",
                       out: NDArray[_F] | None = None, activation: _Activation,
                       residual: NDArray[Any] | None = None
                       ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
@overload
def group_norm_forward(x: NDArray[_F], num_groups: int, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, *, eps: float = 1e-5, layout: _Layout = "NCHW",
                       out: NDArray[_F] | None = None, activation: _Activation | None = None,
                       residual: NDArray[Any]
                       ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
# (grad_x, grad_weight, grad_bias); through an epilogue also grad_residual (None without a residual)
@overload
def group_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, invstd: ArrayLike | None,
                        num_groups: int, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                        out: NDArray[_F] | None = None, activation: None = None, residual: None = None,
                        bias: ArrayLike | None = None, eps: float = 1e-5,
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: None = None
                        ) -> tuple[NDArray[_F], _Float, _Float]: ...
@overload
def group_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, invstd: ArrayLike | None,
                        num_groups: int, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                        out: NDArray[_F] | None = None, activation: _Activation,
                        residual: NDArray[Any] | None = None, bias: ArrayLike | None = None, eps: float = 1e-5,
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: NDArray[_F] | None = None
                        ) -> tuple[NDArray[_F], _Float, _Float, NDArray[_F] | None]: ...
@overload
def group_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, invstd: ArrayLike | None,
                        num_groups: int, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                        out: NDArray[_F] | None = None, activation: _Activation | None = None,
                        residual: NDArray[Any], bias: ArrayLike | None = None, eps: float = 1e-5,
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: NDArray[_F] | None = None
                        ) -> tuple[NDArray[_F], _Float, _Float, NDArray[_F] | None]: ...
def instance_norm(x: NDArray[_F], running_mean: ArrayLike | None = None, running_var: ArrayLike | None = None,
                  weight: ArrayLike | None = None, bias: ArrayLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, layout: _Layout = "NCHW",
                  out: NDArray[_F] | None = None, activation: _Activation | None = None,
                  residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
@overload
def instance_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                          eps: float = 1e-5, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                          activation: None = None, residual: None = None
                          ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def instance_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                          eps: float = 1e-5, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                          activation: _Activation, residual: NDArray[Any] | None = None
                          ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
@overload
def instance_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                          eps: float = 1e-5, layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                          activation: _Activation | None = None, residual: NDArray[Any]
                          ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
@overload
def instance_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, invstd: ArrayLike | None,
                           weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                           out: NDArray[_F] | None = None, activation: None = None, residual: None = None,
                           bias: ArrayLike | None = None, eps: float = 1e-5,
                           save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                           grad_residual_out: None = None
                           ) -> tuple[NDArray[_F], _Float, _Float]: ...
@overload
def instance_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, invstd: ArrayLike | None,
                           weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                           out: NDArray[_F] | None = None, activation: _Activation,
                           residual: NDArray[Any] | None = None, bias: ArrayLike | None = None, eps: float = 1e-5,
                           save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                           grad_residual_out: NDArray[_F] | None = None
                           ) -> tuple[NDArray[_F], _Float, _Float, NDArray[_F] | None]: ...
@overload
def instance_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, invstd: ArrayLike | None,
                           weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                           out: NDArray[_F] | None = None, activation: _Activation | None = None,
                           residual: NDArray[Any], bias: ArrayLike | None = None, eps: float = 1e-5,
                           save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                           grad_residual_out: NDArray[_F] | None = None
                           ) -> tuple[NDArray[_F], _Float, _Float, NDArray[_F] | None]: ...

# ---- layer and RMS norm (bn_simd/rownorm.py) -------------------------------------------------------------------
# layout: None (the trailing dims) or channels-first over axis 1 (ConvNeXt's LayerNorm2d)
_RowLayout: TypeAlias = _Layout | None

def layer_norm(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *, out: NDArray[_F] | None = None,
               layout: _RowLayout = None, activation: _Activation | None = None,
               residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
# (y, mean, rstd); with an activation or a residual also save_stats = (mean, rstd) in float64
@overload
def layer_norm_forward(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, *, eps: float = 1e-5, out: NDArray[_F] | None = None,
                       layout: _RowLayout = None, activation: None = None,
                       residual: None = None) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F]]: ...
@overload
def layer_norm_forward(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, *, eps: float = 1e-5, out: NDArray[_F] | None = None,
                       layout: _RowLayout = None, activation: _Activation, residual: NDArray[Any] | None = None
                       ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
@overload
def layer_norm_forward(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None,
                       bias: ArrayLike | None = None, *, eps: float = 1e-5, out: NDArray[_F] | None = None,
                       layout: _RowLayout = None, activation: _Activation | None = None, residual: NDArray[Any]
                       ) -> tuple[NDArray[_F], NDArray[_F], NDArray[_F], tuple[_F64, _F64]]: ...
# (grad_x, grad_weight, grad_bias): a parameter's gradient is None when the parameter is; through an epilogue also
# grad_residual (None without a residual)
@overload
def layer_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, rstd: ArrayLike | None,
                        normalized_shape: _Shape, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                        out: NDArray[_F] | None = None, layout: _RowLayout = None, activation: None = None,
                        residual: None = None, save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: None = None
                        ) -> tuple[NDArray[_F], _Float | None, _Float | None]: ...
@overload
def layer_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, rstd: ArrayLike | None,
                        normalized_shape: _Shape, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                        out: NDArray[_F] | None = None, layout: _RowLayout = None, activation: _Activation,
                        residual: NDArray[Any] | None = None, save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: NDArray[_F] | None = None
                        ) -> tuple[NDArray[_F], _Float | None, _Float | None, NDArray[_F] | None]: ...
@overload
def layer_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike | None, rstd: ArrayLike | None,
                        normalized_shape: _Shape, weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                        out: NDArray[_F] | None = None, layout: _RowLayout = None,
                        activation: _Activation | None = None, residual: NDArray[Any],
                        save_stats: tuple[ArrayLike, ArrayLike] | None = None,
                        grad_residual_out: NDArray[_F] | None = None
                        ) -> tuple[NDArray[_F], _Float | None, _Float | None, NDArray[_F] | None]: ...
def rms_norm(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None, eps: float | None = None, *,
             out: NDArray[_F] | None = None, layout: _RowLayout = None, activation: _Activation | None = None,
             residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
# (y, rstd); with an activation or a residual also save_stats = (rstd,) in float64
@overload
def rms_norm_forward(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None, *,
                     eps: float | None = None, out: NDArray[_F] | None = None, layout: _RowLayout = None,
                     activation: None = None,
                     residual: None = None) -> tuple[NDArray[_F], NDArray[_F]]: ...
@overload
def rms_norm_forward(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None, *,
                     eps: float | None = None, out: NDArray[_F] | None = None, layout: _RowLayout = None,
                     activation: _Activation,
                     residual: NDArray[Any] | None = None) -> tuple[NDArray[_F], NDArray[_F], tuple[_F64]]: ...
@overload
def rms_norm_forward(x: NDArray[_F], normalized_shape: _Shape, weight: ArrayLike | None = None, *,
                     eps: float | None = None, out: NDArray[_F] | None = None, layout: _RowLayout = None,
                     activation: _Activation | None = None,
                     residual: NDArray[Any]) -> tuple[NDArray[_F], NDArray[_F], tuple[_F64]]: ...
# (grad_x, grad_weight), grad_weight None when weight is; through an epilogue also grad_residual
@overload
def rms_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], rstd: ArrayLike | None, normalized_shape: _Shape,
                      weight: ArrayLike | None = None, *, out: NDArray[_F] | None = None,
                      layout: _RowLayout = None, activation: None = None,
                      residual: None = None, save_stats: tuple[ArrayLike] | None = None,
                      grad_residual_out: None = None
                      ) -> tuple[NDArray[_F], _Float | None]: ...
@overload
def rms_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], rstd: ArrayLike | None, normalized_shape: _Shape,
                      weight: ArrayLike | None = None, *, out: NDArray[_F] | None = None,
                      layout: _RowLayout = None, activation: _Activation,
                      residual: NDArray[Any] | None = None, save_stats: tuple[ArrayLike] | None = None,
                      grad_residual_out: NDArray[_F] | None = None
                      ) -> tuple[NDArray[_F], _Float | None, NDArray[_F] | None]: ...
@overload
def rms_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], rstd: ArrayLike | None, normalized_shape: _Shape,
                      weight: ArrayLike | None = None, *, out: NDArray[_F] | None = None,
                      layout: _RowLayout = None, activation: _Activation | None = None, residual: NDArray[Any],
                      save_stats: tuple[ArrayLike] | None = None,
                      grad_residual_out: NDArray[_F] | None = None
                      ) -> tuple[NDArray[_F], _Float | None, NDArray[_F] | None]: ...

# ---- layers (bn_simd/layers.py, bn_simd/rownorm_layers.py, bn_simd/sync.py) ------------------------------------
class _Layer:
    training: bool
    def train(self, mode: bool = True) -> Self: ...
    def eval(self) -> Self: ...
    # values: ndarrays, tensors or other array-likes (also Keras' weight names)
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None: ...

class BatchNorm(_Layer):
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    layout: Literal["NCHW", "NHWC"]
    axis: int | None
    dtype: np.dtype[Any]
    unbiased_running_var: bool
    activation: _Activation | None
    weight: _Float | None
    bias: _Float | None
    running_mean: _Float | None
    running_var: _Float | None
    num_batches_tracked: int | None
    grad_weight: _Float | None
    grad_bias: _Float | None
    grad_residual: _Float | None
    virtual_batch_size: int | None
    renorm: bool
    renorm_clipping: dict[str, float | None] | None
    renorm_momentum: float
    # present with renorm=True
    running_std: _Float
    renorm_mean: _Float
    renorm_std: _Float
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, layout: _Layout = "NCHW", dtype: DTypeLike = ...,
                 unbiased_running_var: bool = True, axis: int | None = None, bias: bool = True,
                 virtual_batch_size: int | None = None, renorm: bool = False,
                 renorm_clipping: _Clipping | None = None, renorm_momentum: float = 0.01,
                 activation: _Activation | None = None) -> None: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def forward(self, x: NDArray[_F], *, out: NDArray[_F] | None = None, mask: _Mask = None,
                residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def __call__(self, x: NDArray[_F], *, out: NDArray[_F] | None = None, mask: _Mask = None,
                 residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def backward(self, grad_out: NDArray[_F], *, out: NDArray[_F] | None = None,
                 grad_residual_out: NDArray[_F] | None = None) -> NDArray[_F]: ...
    def state_dict(self) -> dict[str, NDArray[Any]]: ...

class BatchNorm1d(BatchNorm): ...
class BatchNorm2d(BatchNorm): ...
class BatchNorm3d(BatchNorm): ...

class _InstanceNorm(BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, *, layout: _Layout = "NCHW", dtype: DTypeLike = ...,
                 activation: _Activation | None = None, bias: bool = True) -> None: ...
    # (no mask: the signature narrows BatchNorm's)
    def forward(self, x: NDArray[_F], *, out: NDArray[_F] | None = None,  # type: ignore[override]
                residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def __call__(self, x: NDArray[_F], *, out: NDArray[_F] | None = None,  # type: ignore[override]
                 residual: NDArray[Any] | None = None) -> NDArray[_F]: ...

class InstanceNorm1d(_InstanceNorm): ...
class InstanceNorm2d(_InstanceNorm): ...
class InstanceNorm3d(_InstanceNorm): ...

class GroupNorm(_Layer):
    num_groups: int
    num_channels: int
    eps: float
    affine: bool
    layout: Literal["NCHW", "NHWC"]
    dtype: np.dtype[Any]
    weight: _Float | None
    bias: _Float | None
    grad_weight: _Float | None
    grad_bias: _Float | None
    grad_residual: _Float | None
    activation: _Activation | None
    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 layout: _Layout = "NCHW", dtype: DTypeLike = ..., activation: _Activation | None = None,
                 bias: bool = True) -> None: ...
    def reset_parameters(self) -> None: ...
    def forward(self, x: NDArray[_F], *, out: NDArray[_F] | None = None,
                residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def __call__(self, x: NDArray[_F], *, out: NDArray[_F] | None = None,
                 residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def backward(self, grad_out: NDArray[_F], *, out: NDArray[_F] | None = None,
                 grad_residual_out: NDArray[_F] | None = None) -> NDArray[_F]: ...
    def state_dict(self) -> dict[str, NDArray[Any]]: ...

class _RowNorm:
    normalized_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    layout: Literal["NCHW", "NHWC"] | None
    eps: float | None
    elementwise_affine: bool
    weight: _Float | None
    bias: _Float | None
    grad_weight: _Float | None
    grad_bias: _Float | None
    grad_residual: _Float | None
    activation: _Activation | None
    training: bool
    def reset_parameters(self) -> None: ...
    def train(self, mode: bool = True) -> Self: ...
    def eval(self) -> Self: ...
    def parameters(self) -> list[_Float]: ...
    def forward(self, x: NDArray[_F], *, out: NDArray[_F] | None = None,
                residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def __call__(self, x: NDArray[_F], *, out: NDArray[_F] | None = None,
                 residual: NDArray[Any] | None = None) -> NDArray[_F]: ...
    def backward(self, grad_out: NDArray[_F], *, out: NDArray[_F] | None = None,
                 grad_residual_out: NDArray[_F] | None = None) -> NDArray[_F]: ...
    def state_dict(self) -> dict[str, NDArray[Any]]: ...
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None: ...

class LayerNorm(_RowNorm):
    eps: float
    def __init__(self, normalized_shape: _Shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, dtype: DTypeLike = ..., layout: _RowLayout = None,
                 activation: _Activation | None = None) -> None: ...

class RMSNorm(_RowNorm):
    def __init__(self, normalized_shape: _Shape, eps: float | None = None, elementwise_affine: bool = True, *,
                 dtype: DTypeLike = ..., layout: _RowLayout = None,
                 activation: _Activation | None = None) -> None: ...

class SyncBatchNorm(BatchNorm):
    comm: _Comm
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, comm: _Comm = None, layout: _Layout = "NCHW",
                 dtype: DTypeLike = ..., mode: _SyncMode = "exact", unbiased_running_var: bool = True,
                 bias: bool = True) -> None: ...
    @property
    def mode(self) -> _SyncMode: ...
    @mode.setter
    def mode(self, value: _SyncMode) -> None: ...
    # (no mask, no residual: the signature narrows BatchNorm's)
    def forward(self, x: NDArray[_F], *, out: NDArray[_F] | None = None) -> NDArray[_F]: ...  # type: ignore[override]
    def __call__(self, x: NDArray[_F], *, out: NDArray[_F] | None = None) -> NDArray[_F]: ...  # type: ignore[override]
    # the same kind of container (a layer, or a list, tuple or dict of them, nested) with its BatchNorms converted
    @classmethod
    def convert_sync_batchnorm(cls, layer_or_layers: Any, comm: _Comm = None, *, mode: _SyncMode = "exact") -> Any: ...

# ---- SyncBatchNorm's functional steps (bn_simd/sync.py) ---------------------------------------------------------
# (mean, var, n)
def sync_batch_stats(x: NDArray[np.floating[Any]], comm: _Comm = None, *, layout: _Layout = "NCHW",
                     mode: _SyncMode = "exact", shift: ArrayLike | None = None) -> tuple[_F64, _F64, int]: ...
# (sum_dy, sum_dyxm, n)
def sync_backward_reduce(grad_out: NDArray[np.floating[Any]], x: NDArray[np.floating[Any]], mean: ArrayLike,
                         comm: _Comm = None, *, layout: _Layout = "NCHW", mode: _SyncMode = "exact"
                         ) -> tuple[_F64, _F64, int]: ...
# (y, mean, invstd, n)
def sync_batch_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None,
                            comm: _Comm = None, *, eps: float = 1e-5, layout: _Layout = "NCHW",
                            mode: _SyncMode = "exact", out: NDArray[_F] | None = None, shift: ArrayLike | None = None
                            ) -> tuple[NDArray[_F], _F64, _F64, int]: ...
# (grad_x, grad_weight, grad_bias)
def sync_batch_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], mean: ArrayLike, invstd: ArrayLike,
                             weight: ArrayLike | None = None, comm: _Comm = None, *, layout: _Layout = "NCHW",
                             mode: _SyncMode = "exact", out: NDArray[_F] | None = None
                             ) -> tuple[NDArray[_F], _Float, _Float]: ...

# ---- ghost batch norm (bn_simd/virtual.py) ---------------------------------------------------------------------
def virtual_batch_norm(x: NDArray[_F], running_mean: ArrayLike | None = None, running_var: ArrayLike | None = None,
                       weight: ArrayLike | None = None, bias: ArrayLike | None = None, training: bool = False,
                       momentum: float = 0.1, eps: float = 1e-5, *, virtual_batch_size: int | None,
                       layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                       unbiased_running_var: bool = True) -> NDArray[_F]: ...
# (y, save_mean, save_invstd), the statistics float64 (G, C)
def virtual_batch_norm_forward(x: NDArray[_F], weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                               virtual_batch_size: int | None, eps: float = 1e-5, layout: _Layout = "NCHW",
                               out: NDArray[_F] | None = None) -> tuple[NDArray[_F], _F64, _F64]: ...
def virtual_batch_norm_backward(grad_out: NDArray[_F], x: NDArray[_F], save_mean: ArrayLike, save_invstd: ArrayLike,
                                weight: ArrayLike | None = None, *, virtual_batch_size: int | None,
                                layout: _Layout = "NCHW", out: NDArray[_F] | None = None
                                ) -> tuple[NDArray[_F], _Float, _Float]: ...

# ---- batch renormalization (bn_simd/renorm.py) ----------------------------------------------------------------
def batch_renorm(x: NDArray[_F], running_mean: _Float, running_var: _Float, weight: ArrayLike | None = None,
                 bias: ArrayLike | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                 running_std: _Float, renorm_mean: _Float, renorm_std: _Float,
                 renorm_clipping: _Clipping | None = None, renorm_momentum: float = 0.01,
                 layout: _Layout = "NCHW", out: NDArray[_F] | None = None, unbiased_running_var: bool = True,
                 virtual_batch_size: int | None = None) -> NDArray[_F]: ...
# (y, save_mean, save_invstd, r, d)
def batch_renorm_forward(x: NDArray[_F], renorm_mean: ArrayLike, renorm_std: ArrayLike,
                         weight: ArrayLike | None = None, bias: ArrayLike | None = None, *, rmax: float | None = None,
                         rmin: float | None = None, dmax: float | None = None, eps: float = 1e-5,
                         layout: _Layout = "NCHW", out: NDArray[_F] | None = None,
                         virtual_batch_size: int | None = None) -> tuple[NDArray[_F], _F64, _F64, _F64, _F64]: ...
# (grad_x, grad_weight, grad_bias)
def batch_renorm_backward(grad_out: NDArray[_F], x: NDArray[_F], save_mean: ArrayLike, save_invstd: ArrayLike,
                          r: ArrayLike, d: ArrayLike, weight: ArrayLike | None = None, *, layout: _Layout = "NCHW",
                          out: NDArray[_F] | None = None, virtual_batch_size: int | None = None
                          ) -> tuple[NDArray[_F], _Float, _Float]: ...
# (r, d)
def renorm_corrections(mean: ArrayLike, var: ArrayLike, renorm_mean: ArrayLike, renorm_std: ArrayLike, *,
                       eps: float = 1e-5, rmax: float = ..., rmin: float = 0.0, dmax: float = ...
                       ) -> tuple[_F64, _F64]: ...
def update_renorm_stats(running_mean: _Float, running_var: _Float, running_std: _Float, renorm_mean: _Float,
                        renorm_std: _Float, save_mean: ArrayLike, save_invstd: ArrayLike, n: int, *,
                        momentum: float = 0.1, renorm_momentum: float = 0.01, eps: float = 1e-5,
                        unbiased: bool = True) -> None: ...

# ---- folding an eval-mode batch norm (bn_simd/fold.py) ----------------------------------------------------------
# (scale, shift)
def fold_params(running_mean: ArrayLike, running_var: ArrayLike, weight: ArrayLike | None = None,
                bias: ArrayLike | None = None, eps: float = 1e-5, *, dtype: DTypeLike | None = None
                ) -> tuple[_Float, _Float]: ...
# a 2-d conv's weight layouts and their 1-d and 3-d forms
_ConvLayout: TypeAlias = Literal["OIHW", "OIW", "OIDHW", "HWIO", "WIO", "DHWIO", "OHWI", "OWI", "ODHWI"]

# (w2, b2) in conv_weight's dtype
def fold_conv(conv_weight: NDArray[_F], conv_bias: ArrayLike | None, running_mean: ArrayLike, running_var: ArrayLike,
              weight: ArrayLike | None = None, bias: ArrayLike | None = None, eps: float = 1e-5, *,
              weight_layout: _ConvLayout = "OIHW",
              position: Literal["after", "before"] = "after", groups: int = 1) -> tuple[NDArray[_F], NDArray[_F]]: ...
# (W2, b2) in W's dtype
def fold_linear(W: NDArray[_F], b: ArrayLike | None, running_mean: ArrayLike, running_var: ArrayLike,
                weight: ArrayLike | None = None, bias: ArrayLike | None = None, eps: float = 1e-5, *,
                weight_layout: Literal["OI", "IO"] = "OI",
                position: Literal["after", "before"] = "after") -> tuple[NDArray[_F], NDArray[_F]]: ...
