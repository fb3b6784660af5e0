# Type stubs of bn_simd.keras (checked against the run-time signatures by tests/test_type_stubs.py).
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, type_check_only

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from typing_extensions import Self, TypeAlias

_Float: TypeAlias = NDArray[np.floating[Any]]
# renorm_clipping: a dict (run time: dict only) with keys among "rmax", "rmin", "dmax", values float or None
_Clipping: TypeAlias = dict[str, Any]
# "zeros", "ones", a number, a serialized Keras Zeros/Ones/Constant (a dict), or a callable (shape, dtype) -> array
_Initializer: TypeAlias = str | float | dict[str, Any] | Callable[[tuple[int, ...], str], ArrayLike]

# a keras.DTypePolicy (read for its name; Keras is not imported by bn_simd.keras)
@type_check_only
class _DTypePolicy(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def variable_dtype(self) -> str: ...

# weights, get_weights and set_weights of every layer here, in Keras' order
class _KerasWeights:
    built: bool
    @property
    def weights(self) -> list[_Float]: ...
    @property
    def trainable_weights(self) -> list[_Float]: ...
    @property
    def non_trainable_weights(self) -> list[_Float]: ...
    def get_weights(self) -> list[_Float]: ...
    def set_weights(self, weights: Sequence[ArrayLike]) -> None: ...

class BatchNormalization(_KerasWeights):
    axis: int
    momentum: float
    epsilon: float
    center: bool
    scale: bool
    beta_initializer: _Initializer
    gamma_initializer: _Initializer
    moving_mean_initializer: _Initializer
    moving_variance_initializer: _Initializer
    renorm: bool
    renorm_clipping: dict[str, float | None] | None
    renorm_momentum: float
    virtual_batch_size: int | None
    trainable: bool
    dtype: np.dtype[Any]
    name: str
    built: bool
    # the weights (None before build, and gamma / beta without scale / center; the last three with renorm only)
    gamma: _Float | None
    beta: _Float | None
    moving_mean: _Float | None
    moving_variance: _Float | None
    moving_stddev: _Float | None
    renorm_mean: _Float | None
    renorm_stddev: _Float | None
    # set by backward
    grad_gamma: _Float | None
    grad_beta: _Float | None
    def __init__(self, axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, beta_initializer: _Initializer = "zeros", gamma_initializer: _Initializer = "ones",
                 moving_mean_initializer: _Initializer = "zeros", moving_variance_initializer: _Initializer = "ones", *,
                 beta_regularizer: None = None, gamma_regularizer: None = None, beta_constraint: None = None,
                 gamma_constraint: None = None, renorm: bool = False, renorm_clipping: _Clipping | None = None,
                 renorm_momentum: float = 0.99, synchronized: Literal[False] = False,
                 virtual_batch_size: int | None = None, trainable: bool = True,
                 dtype: DTypeLike | dict[str, Any] | _DTypePolicy = "float32",
                 name: str = "batch_normalization") -> None: ...
    def build(self, input_shape: Sequence[int | None]) -> None: ...
    @property
    def num_features(self) -> int | None: ...
    def get_config(self) -> dict[str, Any]: ...
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self: ...
    # inputs: float32/float64 (float16, bfloat16, integer and bool computed in float32); y in the layer's dtype
    def __call__(self, inputs: ArrayLike, training: bool = False, mask: ArrayLike | None = None) -> _Float: ...
    def backward(self, grad_out: ArrayLike) -> _Float: ...

class _KerasNorm(_KerasWeights):
    epsilon: float
    trainable: bool
    dtype: np.dtype[Any]
    name: str
    built: bool
    def build(self, input_shape: Sequence[int | None]) -> None: ...
    def get_config(self) -> dict[str, Any]: ...
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Self: ...
    # inputs: float32/float64 (float16, bfloat16, integer and bool computed in float32); y in the layer's dtype;
    # training and mask change nothing (as in Keras)
    def __call__(self, inputs: ArrayLike, training: bool | None = None, mask: ArrayLike | None = None) -> _Float: ...
    def backward(self, grad_out: ArrayLike) -> _Float: ...

# center / scale, their initializers, and the weights they make (None before build, and without scale / center;
# layer norm's shaped by the sizes of axis, group norm's (C,)), with their gradients set by backward
@type_check_only
class _GammaBeta:
    center: bool
    scale: bool
    beta_initializer: _Initializer
    gamma_initializer: _Initializer
    gamma: _Float | None
    beta: _Float | None
    grad_gamma: _Float | None
    grad_beta: _Float | None

class _RowNormalization(_KerasNorm):
    axis: int | list[int]

class LayerNormalization(_RowNormalization, _GammaBeta):
    def __init__(self, axis: int | Sequence[int] = -1, epsilon: float = 1e-3, center: bool = True, scale: bool = True,
                 beta_initializer: _Initializer = "zeros", gamma_initializer: _Initializer = "ones", *,
                 beta_regularizer: None = None, gamma_regularizer: None = None, beta_constraint: None = None,
                 gamma_constraint: None = None, rms_scaling: Literal[False] = False, trainable: bool = True,
                 dtype: DTypeLike | dict[str, Any] | _DTypePolicy = "float32",
                 name: str = "layer_normalization") -> None: ...

class RMSNormalization(_RowNormalization):
    scale: _Float | None
    grad_scale: _Float | None
    def __init__(self, axis: int | Sequence[int] = -1, epsilon: float = 1e-6, *, trainable: bool = True,
                 dtype: DTypeLike | dict[str, Any] | _DTypePolicy = "float32",
                 name: str = "rms_normalization") -> None: ...

class GroupNormalization(_KerasNorm, _GammaBeta):
    groups: int
    axis: int
    def __init__(self, groups: int = 32, axis: int = -1, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, beta_initializer: _Initializer = "zeros", gamma_initializer: _Initializer = "ones",
                 *, beta_regularizer: None = None, gamma_regularizer: None = None, beta_constraint: None = None,
                 gamma_constraint: None = None, trainable: bool = True,
                 dtype: DTypeLike | dict[str, Any] | _DTypePolicy = "float32",
                 name: str = "group_normalization") -> None: ...
