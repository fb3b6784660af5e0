"""``torch.nn.SyncBatchNorm`` on CPU tensors: bn_simd's synchronized batch norm (:mod:`bn_simd.sync`) as a module.

PyTorch's own SyncBatchNorm refuses CPU tensors in a distributed job; this subclass runs the statistics exchange and
the synchronized backward of :mod:`bn_simd.sync` over the module's ``process_group`` (a ``torch.distributed`` group
with a CPU backend such as gloo, None for the default group, or any object implementing bn_simd.sync's communicator
protocol). The maths is sync.py's functional steps (stats -> merge -> normalise; reduce -> exchange -> apply); the
tensors reach them through the zero-copy bridge (_bridge), so channels-last input gives channels-last output.
"""
import numpy as np
import torch

from .. import _args
from .. import functional as NF
from .. import sync as S
from . import _bridge as B
from . import modules as M

_RANKS_2_TO_5 = (2, 3, 4, 5)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the statistics of the batch that every rank's piece x forms
    (concatenated in rank order); running statistics, when given, updated in place with the whole batch's mean and
    unbiased variance. The backward exchanges the channel sums so that every rank gets its piece of grad_x (of the
    whole batch's statistics), and grad_weight, grad_bias of its own piece, as PyTorch's SyncBatchNorm (data-parallel
    training averages them over the ranks, as every other parameter's).

    apply(x, weight, bias, running_mean, running_var, momentum, eps, comm, mode, shift, views): comm a bn_simd.sync
    protocol object, mode "exact" / "fast", shift fast mode's float64 (C,) shift (overwritten with the batch mean),
    views the ndarrays of (running_mean, running_var, weight, bias). Every rank must call forward and backward
    together.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, comm, mode, shift, views):
        x, layout, xa = B.dense(x)
        xw = _wide(x)
        if xw is not x:
            xa = B.array(xw, layout)
        rm, rv, w, b = views
        mean, var, n = S.sync_batch_stats(xa, comm, layout=layout, mode=mode, shift=shift)
        S._check_count(n, tuple(x.shape))
        y = torch.empty_like(xw)
        NF.normalize(xa, mean, var, w, b, eps=eps, layout=layout, out=B.array(y, layout))
        y = y.to(x.dtype)  # (16-bit x: the float32 result rounded once)
        if rm is not None and n > 0:
            NF.update_running_stats(rm, rv, mean, var, n, momentum, unbiased=True)
            torch.autograd.graph.increment_version([running_mean, running_var])
        if n > 0 and np.all(np.isfinite(mean)):
            shift[:] = mean  # (the same on every rank: the next call's exchange is relative to it)
        ctx.save_for_backward(x, weight)
        ctx.param_dtype = (weight if weight is not None else bias if bias is not None else x).dtype
        ctx.stats = (mean, 1.0 / np.sqrt(var + eps), layout, comm, mode)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        mean, invstd, layout, comm, mode = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        try:
            x, weight = ctx.saved_tensors  # (raises when a saved tensor was changed in place since the forward)
            # (grad_x computed whatever autograd asks: every rank must take part in the same exchanges)
            xw = _wide(x)
            grad_x = B.empty_in(xw, layout)
            # (a 16-bit weight widened exactly: the parameter gradients come back in float32, rounded once to the
            # parameter's dtype by grad_as)
            ga, xa = B.array(_wide(grad_y), layout), B.array(xw, layout)
        except Exception as e:
            # this rank takes part in the exchange as a failure: the others raise instead of waiting for it
            S._exchange_grad(comm, None, None, mean, mean.shape[0], layout, mode, "SyncBatchNorm.backward",
                             failed=S._Failed(e))
            raise
        own = []  # (this rank's sums: PyTorch's SyncBatchNorm gives each rank the parameter gradients of its piece)
        sdy, sdyx, n = S._exchange_grad(comm, ga, xa, mean, mean.shape[0], layout, mode, "SyncBatchNorm.backward",
                                        own=own)
        S._apply_grad(ga, xa, mean, invstd, B.vec(None if weight is None else _wide(weight)), sdy, sdyx, n, layout,
                      B.out_array(grad_x, layout))
        gw, gb = (own[1] * invstd, own[0]) if n > 0 else (np.zeros_like(own[1]), np.zeros_like(own[0]))
        pd = ctx.param_dtype
        gw = B.grad_as(gw, pd) if need_w else None
        gb = B.grad_as(gb, pd) if need_b else None
        return (grad_x.to(x.dtype) if need_x else None, gw, gb) + (None,) * 8


def _wide(t):
    """t, or a float32 copy of a float16/bfloat16 t (memory format kept): the exchanges of bn_simd.sync carry the
    moments of float32/float64 data, so synchronised 16-bit data is widened once (exactly) and its results rounded
    once."""
    return t.float() if t.dtype in B.HALF else t


def _non_member(process_group):
    """process_group is what torch.distributed.new_group returns on a rank outside the group (an int sentinel)."""
    dist = torch.distributed
    return dist.is_available() and type(process_group) is int and \
        process_group == dist.GroupMember.NON_GROUP_MEMBER


def _communicator(process_group):
    """The protocol object of a sync call, or None when PyTorch's rules do not synchronise: no process group
    given and torch.distributed not initialised, a group of one process, or a rank outside the group (PyTorch's
    world size -1 there)."""
    if _non_member(process_group):
        return None
    if process_group is not None and not isinstance(process_group, _process_group_type()):
        return S.as_communicator(process_group)  # (a protocol object: always synchronised)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(process_group) <= 1:
        return None
    return S.TorchCommunicator(process_group)


def _process_group_type():
    dist = torch.distributed
    return dist.ProcessGroup if dist.is_available() else ()


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, on bn_simd's synchronized batch norm.

    Constructor as PyTorch's (num_features, eps, momentum, affine, track_running_stats, process_group, device,
    dtype, bias) plus keyword ``mode``: "exact" (per-chunk moments merged in the whole batch's chunk order: bitwise
    one process when the pieces end on chunk boundaries, see :func:`bn_simd.sync.chunk_rows`) or "fast" (an
    allgather of 4 values, then one allreduce of 2 C + 1 float64 each way). ``process_group``: a
    ``torch.distributed`` process group with a CPU backend (gloo), None (the default group), or an object
    implementing :mod:`bn_simd.sync`'s communicator protocol; on a rank outside the group (``new_group``'s sentinel
    there) the module normalises that rank's batch alone, as PyTorch's.

    Input (N, C, *spatial) of rank 2..5, float32/float64 on the CPU, contiguous or channels-last (read in place; the
    output keeps the input's memory format); float16/bfloat16 input (parameters of its dtype or float32) is widened to a
    float32 copy for a synchronised call, its y and grad_x rounded once to its dtype. In training mode, when
    torch.distributed is initialised with more than one process in the group (or process_group is a protocol object),
    every rank must call forward and backward together: each gets its piece of y and grad_x, and the statistics and
    running statistics (unbiased variance, ``momentum`` or the cumulative average when None) of one process
    normalising the pieces concatenated in rank order; pieces may differ in size, including 0. grad_weight and
    grad_bias are each rank's own piece's, as PyTorch's (their sum over the ranks is one process's; DDP averages
    them). (PyTorch's DistributedDataParallel refuses CPU models holding a SyncBatchNorm, this subclass included:
    average the gradients with ``torch.distributed.all_reduce`` instead.) Otherwise
    (eval mode, which never synchronises, as in PyTorch; no distributed job) it is :class:`bn_simd.torch.BatchNorm2d`'s
    forward, and inputs the kernels do not cover (other dtypes and devices, graph capture) go to PyTorch's own
    SyncBatchNorm.

    Raises ValueError for input of rank < 2, zero channels, one value per channel over all ranks when training, or
    a bad mode, TypeError for input the kernels do not cover with a protocol object as process_group; a rank
    whose input is refused raises its own error and the others RuntimeError. A call that raises
    changes nothing (num_batches_tracked included). Second derivatives are not supported.
    """

    mode = "exact"  # (the class default also serves modules converted in place from torch.nn.SyncBatchNorm)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, mode="exact", **kwargs):
        S._check_mode(mode)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         **kwargs)
        if process_group is not None and not isinstance(process_group, _process_group_type()) and \
                not _non_member(process_group):
            S.as_communicator(process_group)  # (refuse a wrong type now, not at the first call)
        self.mode = mode

    def __setattr__(self, name, value):
        if name == "mode":
            S._check_mode(value)
        super().__setattr__(name, value)

    def extra_repr(self):
        return super().extra_repr() + f", mode={self.mode!r}"

    @B.fx_leaf
    def forward(self, input):
        comm = _communicator(self.process_group) if self.training else None
        if comm is None:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return M._batch_norm_forward(self, input)
        buffers = self._buffers
        track = self.track_running_stats
        rm, rv = (buffers.get("running_mean"), buffers.get("running_var")) if track else (None, None)
        counter = buffers.get("num_batches_tracked")
        counting = track and counter is not None
        try:
            tensors = (rm, rv, *B.affine(self))
            views = self._sync_views(input, tensors)
            if views is not None:
                if rm is None:
                    factor = 0.0
                elif self.momentum is None:  # the cumulative average: this batch weighs 1 / (batches seen with it)
                    factor = 1.0 / (int(counter) + 1) if counting else 0.0
                else:
                    factor = self.momentum
                shift = self.__dict__.get("_bn_simd_shift")
                if not isinstance(shift, np.ndarray) or shift.shape != (self.num_features,):
                    shift = self.__dict__["_bn_simd_shift"] = np.zeros(self.num_features)
        except Exception as e:
            # this rank's call is refused: it still takes part in the statistics' exchange, as a failure, so that
            # the other ranks raise RuntimeError instead of waiting for it (bn_simd.sync's protocol)
            S._exchange_stats(comm, S._Failed(e), self.num_features, "NCHW", self.mode, None, "SyncBatchNorm")
            raise
        if views is None:  # (not a CPU tensor: PyTorch's own, on the device its backend serves)
            return super().forward(input)
        def call():
            return SyncBatchNormFunction.apply(input, tensors[2], tensors[3], rm, rv, factor, self.eps, comm,
                                               self.mode, shift, views)
        return B.counted(counter, call, (rm, rv)) if counting else call()

    def _check_channels(self, input):
        """On the paths this module serves: the exchange's length is the channels', so every rank's must be
        num_features (a rank of another count in fast mode sent another length, and the collective aborted)."""
        if input.shape[1] != self.num_features:
            raise ValueError(f"input must have num_features = {self.num_features} channels (axis 1), got shape "
                             f"{tuple(input.shape)}")

    def _check_state(self, tensors):
        """The checks the synchronised call's normalise and update make after the exchange, made before it (a rank
        refused there would leave the others a step ahead): the parameters' and running statistics' shapes, and a
        momentum the update takes."""
        C = self.num_features
        for name, t in zip(("running_mean", "running_var", "weight", "bias"), tensors):
            if t is not None and tuple(t.shape) != (C,):
                raise ValueError(f"{name} must have shape ({C},) (num_features), got {tuple(t.shape)}")
        if tensors[0] is not None:
            _args.check_momentum(self.momentum, True)
        _args.check_eps(self.eps)

    def _sync_views(self, input, tensors):
        """The checks of a synchronised call on this rank: the ndarrays of tensors, or None for input PyTorch's own
        SyncBatchNorm serves (not on the CPU, with a torch.distributed group); raises TypeError / ValueError for input
        that no implementation would synchronise here."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if B.input_supported(input, _RANKS_2_TO_5, self.eps):
            views = B.stats_views(self, input, tensors)
            if views is None and B.channels_supported(input, zip(("running_mean", "running_var", "weight", "bias"),
                                                                 tensors)):
                views = tuple(B.vec(t) for t in tensors)
            if views is not None:
                self._check_channels(input)
                self._check_state(tensors)
                # (running statistics sharing memory: the update after the exchange would refuse them, one rank alone)
                _args.stats_distinct((("running_mean", views[0]), ("running_var", views[1])))
                return views
        if isinstance(self.process_group, _process_group_type()) or self.process_group is None or \
                _non_member(self.process_group):
            if not input.is_cpu or torch.jit.is_tracing() or torch.compiler.is_compiling():
                return None  # (graph capture records PyTorch's operator, which says what it takes)
        self._check_channels(input)
        if not B.eps_supported(self.eps):  # (the kernels' own check names it)
            _args.check_eps(self.eps)
        # (PyTorch's forward would normalise this rank alone over a protocol object, and refuses CPU tensors in a
        # distributed job)
        raise TypeError(f"input must be a float32, float64, float16 or bfloat16 CPU tensor (with weight, bias and "
                        f"running statistics of its dtype, or float32 for 16-bit input) to be synchronised, got "
                        f"{input.dtype} on {input.device}")

    __getstate__ = M._getstate
    __prepare_scriptable__ = B.not_scriptable

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, *, mode="exact"):
        """PyTorch's ``convert_sync_batchnorm`` (every ``torch.nn`` batch norm of module replaced by a SyncBatchNorm
        sharing its parameters and buffers), the new modules being this class with ``mode``; returns the module.
        Raises ValueError, changing nothing, for a model holding fused batch norms (``convert(...,
        fuse_activations=True)``): convert to SyncBatchNorm first."""
        S._check_mode(mode)
        fused = [name for name, m in module.named_modules()
                 if isinstance(m, (M.BatchNormAct1d, M.BatchNormAct2d, M.BatchNormAct3d))]
        if fused:  # (PyTorch's conversion would make them plain SyncBatchNorm: their activation silently dropped)
            raise ValueError(f"convert_sync_batchnorm: {fused[0] or 'the module'} is a fused batch norm + activation "
                             f"(bn_simd.torch.BatchNormAct*), which SyncBatchNorm cannot replace; convert before "
                             f"fusing: convert(convert_sync_batchnorm(model), fuse_activations=True) leaves the "
                             f"synchronised ones unfused")
        out = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        for m in out.modules():
            if type(m) is torch.nn.SyncBatchNorm:
                m.__class__ = cls
                m.mode = mode
        return out


# bn_simd.torch.convert swaps torch.nn.SyncBatchNorm for this class too (process_group and state kept)
M.SWAPS[torch.nn.SyncBatchNorm] = SyncBatchNorm
