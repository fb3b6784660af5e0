# Type stubs of bn_simd.torch (checked against the run-time signatures by tests/test_type_stubs.py). The modules are
# torch.nn's classes with a forward on bn_simd's kernels: their constructors, parameters and buffers are torch.nn's.
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, overload

import torch
from typing_extensions import TypeAlias

__all__ = [
    "batch_norm", "group_norm", "instance_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "SyncBatchNorm", "convert", "BatchNormFunction",
    "GroupNormFunction", "InstanceNormFunction", "SyncBatchNormFunction", "BatchNormAct1d", "BatchNormAct2d",
    "BatchNormAct3d", "BatchNormActFunction", "layer_norm", "rms_norm", "LayerNorm", "RMSNorm", "LayerNormFunction",
    "RMSNormFunction", "fold", "GroupNormActFunction", "RowNormActFunction", "GroupNormAct", "InstanceNormAct1d",
    "InstanceNormAct2d", "InstanceNormAct3d", "LayerNormAct", "RMSNormAct", "InstanceNormActFunction",
]

_M = TypeVar("_M", bound=torch.nn.Module)
_Activation: TypeAlias = (
    Literal["relu", "relu6", "silu", "swish", "leaky_relu"]
    | tuple[Literal["leaky_relu"]]
    | tuple[Literal["leaky_relu"], float]
    | tuple[Literal["clamp"], float | None, float | None]
)
_Mode: TypeAlias = Literal["exact", "fast"]
_Shape: TypeAlias = int | Sequence[int] | torch.Size

# ---- functional: torch.nn.functional's signatures (autograd works through them) --------------------------------
def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, out: torch.Tensor | None = None,
               activation: _Activation | None = None, residual: torch.Tensor | None = None) -> torch.Tensor: ...
def group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, out: torch.Tensor | None = None,
               activation: _Activation | None = None, residual: torch.Tensor | None = None) -> torch.Tensor: ...
def instance_norm(input: torch.Tensor, running_mean: torch.Tensor | None = None,
                  running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5, *, out: torch.Tensor | None = None, activation: _Activation | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor: ...
def layer_norm(input: torch.Tensor, normalized_shape: _Shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, out: torch.Tensor | None = None,
               activation: _Activation | None = None, residual: torch.Tensor | None = None) -> torch.Tensor: ...
def rms_norm(input: torch.Tensor, normalized_shape: _Shape, weight: torch.Tensor | None = None,
             eps: float | None = None, *, out: torch.Tensor | None = None, activation: _Activation | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor: ...

# ---- torch.nn drop-ins ------------------------------------------------------------------------------------------
class BatchNorm1d(torch.nn.BatchNorm1d):
    def forward(self, input: torch.Tensor, activation: _Activation | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
class BatchNorm2d(torch.nn.BatchNorm2d):
    def forward(self, input: torch.Tensor, activation: _Activation | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
class BatchNorm3d(torch.nn.BatchNorm3d):
    def forward(self, input: torch.Tensor, activation: _Activation | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor: ...

# BatchNorm followed by its activation, fused; the constructor is torch.nn.BatchNorm*d's plus activation=
class BatchNormAct1d(BatchNorm1d):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class BatchNormAct2d(BatchNorm2d):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class BatchNormAct3d(BatchNorm3d):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...

class GroupNorm(torch.nn.GroupNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor: ...
class InstanceNorm1d(torch.nn.InstanceNorm1d): ...
class InstanceNorm2d(torch.nn.InstanceNorm2d): ...
class InstanceNorm3d(torch.nn.InstanceNorm3d): ...
class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor: ...
class RMSNorm(torch.nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

# The other normalizations followed by their activation, fused: torch.nn's constructor plus activation=
class GroupNormAct(GroupNorm):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class InstanceNormAct1d(InstanceNorm1d):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class InstanceNormAct2d(InstanceNorm2d):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class InstanceNormAct3d(InstanceNorm3d):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class LayerNormAct(LayerNorm):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
class RMSNormAct(RMSNorm):
    activation: _Activation
    def __init__(self, *args: Any, activation: _Activation = "relu", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...

class SyncBatchNorm(torch.nn.SyncBatchNorm):
    mode: _Mode
    # process_group: a torch.distributed group, or an object of bn_simd.sync's communicator protocol
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any | None = None, device: Any = None,
                 dtype: Any = None, *, mode: _Mode = "exact", **kwargs: Any) -> None: ...
    def forward(self, input: torch.Tensor) -> torch.Tensor: ...
    def extra_repr(self) -> str: ...
    @classmethod
    def convert_sync_batchnorm(cls, module: _M, process_group: Any | None = None, *,  # type: ignore[override]
                               mode: _Mode = "exact") -> _M: ...

# in place; returns model (fuse_activations=True: a torch.fx.GraphModule when the model was traced)
@overload
def convert(model: _M, fuse_activations: Literal[False] = False) -> _M: ...
@overload
def convert(model: torch.nn.Module, fuse_activations: bool) -> torch.nn.Module: ...
# in place; returns model
def fold(model: _M, *, trace: bool = True) -> _M: ...

# ---- the autograd Functions the modules apply (their apply()'s arguments are internal: use the calls above) -------
class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, momentum: float,
                eps: float, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,  # type: ignore[override]
                bias: torch.Tensor | None, eps: float, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class InstanceNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
                views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
                comm: Any, mode: _Mode, shift: Any, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class BatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                residual: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                training: bool, momentum: float, eps: float, act: Any, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class GroupNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                residual: torch.Tensor | None, eps: float, act: Any, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class InstanceNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
                act: Any, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class RowNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                normalized_shape: _Shape, weight: torch.Tensor | None, bias: torch.Tensor | None,
                residual: torch.Tensor | None, eps: float | None, rms: bool, act: Any, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                normalized_shape: _Shape, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor,  # type: ignore[override]
                normalized_shape: _Shape, weight: torch.Tensor | None,
                eps: float | None, views: Any) -> torch.Tensor: ...
    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]: ...
