"""One rank of the multi-process SyncBatchNorm checks (run by tests/test_sync_procs.py).

    mpiexec -n P python tests/sync_worker.py mpi
    python tests/sync_worker.py gloo RANK WORLD_SIZE INIT_FILE      (one process per rank)

Every rank builds the same seeded batch, takes its piece (sizes differ between ranks, one may be empty), runs
SyncBatchNorm for two training steps and a backward in each mode, and compares with one process running
BatchNorm on the whole batch: exact mode bitwise (the pieces end on chunk boundaries), fast mode within a few
float64 ulps of the statistics; under gloo, bn_simd.torch.SyncBatchNorm as well. Exits 0 and prints "ok <rank>"
when every check passed.
"""
import os
import sys

import numpy as np

# the bn_simd to test: the one the calling test imported (BN_SIMD_UNDER_TEST), else this checkout's
sys.path.insert(0, os.environ.get("BN_SIMD_UNDER_TEST") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bn_simd  # noqa: E402
from bn_simd import sync  # noqa: E402

# (nchw shape, layout, dtype): chunks of one sample (16x16 maps) and of 1024 rows (channels-last, 64 channels)
CASES = [((9, 6, 16, 16), "NCHW", np.float32), ((7, 5, 20, 20), "NCHW", np.float64),
         ((3072, 64), "NHWC", np.float32)]


def pieces(N, P, unit):
    """Cut points of N rows between P ranks at multiples of `unit`: unequal sizes, the middle rank empty when
    P == 3."""
    if P == 1:
        return [0, N]
    if P == 2:
        return [0, unit, N]
    return [0, 2 * unit, 2 * unit, N]


def check(comm, rank, P, shape, layout, dtype, mode):
    rng = np.random.default_rng(7)
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    x2 = (rng.standard_normal(shape) * 0.5 - 1).astype(dtype)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    ref = bn_simd.BatchNorm(C, layout=layout, dtype=dtype)
    ref.weight[:], ref.bias[:] = w, b
    ref(x2)
    y_ref = ref(x)
    gx_ref = ref.backward(g)
    unit = sync.chunk_rows(shape, layout, dtype)
    cuts = pieces(shape[0], P, unit)
    a, z = cuts[rank], cuts[rank + 1]
    layer = bn_simd.SyncBatchNorm(C, layout=layout, dtype=dtype, comm=comm, mode=mode)
    layer.weight[:], layer.bias[:] = w, b
    layer(x2[a:z])
    y = layer(x[a:z])
    gx = layer.backward(g[a:z])
    what = f"rank {rank} {mode} {shape} {layout} {np.dtype(dtype).name}"
    if mode == "exact":
        for name, got, want in (("y", y, y_ref[a:z]), ("grad_x", gx, gx_ref[a:z]),
                                ("grad_weight", layer.grad_weight, ref.grad_weight),
                                ("grad_bias", layer.grad_bias, ref.grad_bias),
                                ("running_mean", layer.running_mean, ref.running_mean),
                                ("running_var", layer.running_var, ref.running_var)):
            assert got.tobytes() == want.tobytes(), f"{what}: {name} differs from one process"
    else:
        tol = 64 * np.finfo(dtype).eps
        for name, got, want in (("y", y, y_ref[a:z]), ("grad_x", gx, gx_ref[a:z]),
                                ("running_var", layer.running_var, ref.running_var)):
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max(initial=0))),
                                       err_msg=f"{what}: {name}")
    assert layer.num_batches_tracked == 2, what
    # the functional form gives the same statistics
    mean, var, n = bn_simd.sync_batch_stats(x[a:z], comm, layout=layout, mode=mode)
    assert n == x.size // C, what
    m_ref, v_ref = bn_simd.batch_stats(x, layout=layout)
    if mode == "exact":
        assert mean.tobytes() == m_ref.tobytes() and var.tobytes() == v_ref.tobytes(), what


def check_torch_module(group, rank, P):
    """bn_simd.torch.SyncBatchNorm over the gloo group (and over the default group, process_group=None): each rank's
    piece of a channels-last batch; y, grad_x, parameter gradients and running statistics against one process's
    bn_simd.torch.BatchNorm2d on the whole batch (exact mode bitwise: pieces of whole chunks, 4 samples of 16x16
    with 64 channels), and torch.nn.BatchNorm2d within float32 rounding (fast mode)."""
    import torch
    import bn_simd.torch as bt
    shape, fmt = (12, 64, 16, 16), torch.channels_last
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen) * 2 + 3).contiguous(memory_format=fmt)
    g = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    cuts = pieces(shape[0], P, 4)
    a, z = cuts[rank], cuts[rank + 1]
    for mode, pg, cls in (("exact", group, bt.BatchNorm2d), ("fast", None, torch.nn.BatchNorm2d)):
        ref = cls(64)
        xr = x.clone(memory_format=fmt).requires_grad_()
        y_ref = ref(xr)
        y_ref.backward(g)
        # the parameter gradients of this rank's piece, as PyTorch's SyncBatchNorm gives: one process's for a
        # grad_out that is zero outside the piece
        piece = cls(64)
        g_piece = torch.zeros_like(g)
        g_piece[a:z] = g[a:z]
        piece(x.clone(memory_format=fmt)).backward(g_piece)
        m = bt.SyncBatchNorm(64, process_group=pg, mode=mode)
        xp = x[a:z].clone(memory_format=fmt).requires_grad_()
        y = m(xp)
        y.backward(g[a:z].clone(memory_format=fmt))
        assert y.is_contiguous(memory_format=fmt), f"rank {rank} {mode}: y not channels-last"
        pairs = (("y", y, y_ref[a:z]), ("grad_x", xp.grad, xr.grad[a:z]), ("grad_weight", m.weight.grad,
                 piece.weight.grad), ("grad_bias", m.bias.grad, piece.bias.grad),
                 ("running_mean", m.running_mean, ref.running_mean), ("running_var", m.running_var, ref.running_var))
        for name, got, want in pairs:
            got, want = got.detach().contiguous().numpy(), want.detach().contiguous().numpy()
            what = f"rank {rank} torch module {mode}: {name}"
            if mode == "exact":
                assert got.tobytes() == want.tobytes(), what
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())),
                                           err_msg=what)


def main():
    backend = sys.argv[1]
    if backend == "mpi":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, P = comm.Get_rank(), comm.Get_size()
        default = sync.as_communicator(None)
        assert isinstance(default, sync.MPICommunicator), "comm=None under MPI"
    else:
        import torch.distributed as dist
        rank, P, init_file = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=P)
        comm = dist.group.WORLD
        assert isinstance(sync.as_communicator(None), sync.TorchCommunicator), "comm=None under torch.distributed"
    for shape, layout, dtype in CASES:
        for mode in ("exact", "fast"):
            check(comm, rank, P, shape, layout, dtype, mode)
            check(None, rank, P, shape, layout, dtype, mode)
    # a rank's refused input: its own error there, RuntimeError on the others, nobody left waiting
    layer = bn_simd.SyncBatchNorm(4, comm=comm)
    x = np.ones((3, 4 if rank else 5, 8), np.float32)
    try:
        layer(x)
    except ValueError:
        assert rank == 0
    except RuntimeError:
        assert rank != 0
    else:
        raise AssertionError("a refused input went unnoticed")
    assert layer.num_batches_tracked == 0 and not layer.running_mean.any()
    if backend == "mpi" and P >= 2:
        # an inter-communicator's collectives deliver the other group's buffers: refused, not statistics of half
        inter = comm.Split(rank % 2, rank).Create_intercomm(0, comm, 1 - rank % 2, tag=7)
        for call in (lambda: bn_simd.sync_batch_stats(np.ones((2, 3), np.float32), inter),
                     lambda: bn_simd.SyncBatchNorm(3, comm=inter, mode="fast")(np.ones((2, 3), np.float32))):
            try:
                call()
            except TypeError as e:
                assert "intra-communicator" in str(e), e
            else:
                raise AssertionError("an inter-communicator was taken")
        inter.Free()
    if backend != "mpi":
        check_torch_module(comm, rank, P)
        dist.destroy_process_group()
    print(f"ok {rank}", flush=True)


if __name__ == "__main__":
    main()
