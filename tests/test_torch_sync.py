"""bn_simd.torch.SyncBatchNorm with P ranks simulated by threads (tests/fake_comm.py): the ranks together give
torch.nn.BatchNorm2d on the concatenated batch (values, gradients of input, weight and bias, running statistics),
float64 gradcheck, exact mode bitwise bn_simd.torch.BatchNorm2d on chunk boundaries, memory formats, eval mode,
errors that every rank sees, and convert. Real processes (gloo): tests/test_sync_procs.py."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import bn_simd.torch as bt  # noqa: E402
from bn_simd import sync  # noqa: E402
from fake_comm import make_comms, run_ok, run_ranks  # noqa: E402

DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def batch(shape, dtype, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def params(C, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5) * torch.where(
        torch.rand(C, generator=g) < 0.5, -1.0, 1.0).double()
    return w.to(dtype), torch.randn(C, generator=g, dtype=torch.float64).to(dtype)


def run_sync(P, steps, g, cuts, mode="exact", memory_format=torch.contiguous_format, **kw):
    """Each rank's bt.SyncBatchNorm over its samples [cuts[r], cuts[r+1]) of each batch in steps (training), then
    backward of sum(y * g) for the last: [(module, y, grad_x)] in rank order."""
    C = steps[0].shape[1]
    w, b = params(C, steps[0].dtype)

    def fn(r, comm):
        m = bt.SyncBatchNorm(C, process_group=comm, mode=mode, dtype=steps[0].dtype, **kw)
        set_params(m, w, b)
        for x in steps:
            piece = x[cuts[r]:cuts[r + 1]].clone(memory_format=memory_format).requires_grad_()
            y = m(piece)
        y.backward(g[cuts[r]:cuts[r + 1]].contiguous(memory_format=memory_format))
        return m, y, piece.grad

    return run_ok(len(cuts) - 1, fn)


def set_params(m, w, b):
    """Copy w and b into module m's affine parameters (those it has)."""
    if m.affine:
        with torch.no_grad():
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.copy_(b)


def one_process(cls, steps, g, memory_format=torch.contiguous_format, **kw):
    C = steps[0].shape[1]
    w, b = params(C, steps[0].dtype)
    m = cls(C, dtype=steps[0].dtype, **kw)
    set_params(m, w, b)
    for x in steps:
        xx = x.clone(memory_format=memory_format).requires_grad_()
        y = m(xx)
    y.backward(g.contiguous(memory_format=memory_format))
    return m, y, xx.grad


def piece_grads(cls, steps, g, cuts, r, memory_format=torch.contiguous_format, **kw):
    """(grad_weight, grad_bias) that rank r's module must hold, as PyTorch's SyncBatchNorm: its own piece's, with the
    whole batch's statistics: one process's gradients for a grad_out that is zero outside the piece."""
    gr = torch.zeros_like(g)
    gr[cuts[r]:cuts[r + 1]] = g[cuts[r]:cuts[r + 1]]
    ref = one_process(cls, steps, gr, memory_format=memory_format, **kw)[0]
    return tuple(None if getattr(ref, n, None) is None else getattr(ref, n).grad for n in ("weight", "bias"))


def tol(dtype, n):
    """Relative tolerance of a result reduced over n values: a few ulp per log2 of the length."""
    eps = float(torch.finfo(dtype).eps)
    return 8 * eps * max(1.0, np.log2(n))


# ---- against PyTorch on the whole batch ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sync.MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cuts", [[0, 3, 7], [0, 2, 2, 7], [0, 1, 2, 7]], ids=str)
def test_ranks_together_are_torch_batchnorm2d_on_the_whole_batch(cuts, dtype, mode):
    shape = (7, 5, 6, 4)
    steps = [batch(shape, dtype, 1, loc=-1.0, scale=0.5), batch(shape, dtype, 2, loc=2.0, scale=3.0)]
    g = batch(shape, dtype, 4)
    ref, y_ref, gx_ref = one_process(torch.nn.BatchNorm2d, steps, g)
    got = run_sync(len(cuts) - 1, steps, g, cuts, mode)
    rt = tol(dtype, 7 * 6 * 4)
    scale_y, scale_g = float(y_ref.detach().abs().max()), float(gx_ref.abs().max())
    torch.testing.assert_close(torch.cat([r[1] for r in got]), y_ref, rtol=rt, atol=rt * scale_y)
    torch.testing.assert_close(torch.cat([r[2] for r in got]), gx_ref, rtol=rt, atol=rt * scale_g)
    for r, (m, _, _) in enumerate(got):
        for name, want in zip(("weight", "bias"), piece_grads(torch.nn.BatchNorm2d, steps, g, cuts, r)):
            scale = float(getattr(ref, name).grad.abs().max())  # (the whole batch's, which a piece's sums cancel in)
            torch.testing.assert_close(getattr(m, name).grad, want, rtol=rt, atol=rt * scale)
        torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=rt, atol=rt)
        torch.testing.assert_close(m.running_var, ref.running_var, rtol=rt, atol=rt)
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 2


@pytest.mark.parametrize("kw", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                dict(bias=False)], ids=str)
def test_module_options_follow_torch(kw):
    shape = (6, 3, 5, 5)
    steps = [batch(shape, torch.float64, s, loc=s) for s in (1, 2, 3)]
    g = batch(shape, torch.float64, 4)
    ref, y_ref, gx_ref = one_process(torch.nn.BatchNorm2d, steps, g, **kw)
    got = run_sync(2, steps, g, [0, 4, 6], **kw)
    torch.testing.assert_close(torch.cat([r[1] for r in got]), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[2] for r in got]), gx_ref, rtol=1e-11, atol=1e-11)
    for r, (m, _, _) in enumerate(got):
        grads = dict(zip(("weight", "bias"), piece_grads(torch.nn.BatchNorm2d, steps, g, [0, 4, 6], r, **kw)))
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(m, name), getattr(ref, name)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
                if isinstance(a, torch.nn.Parameter):
                    torch.testing.assert_close(a.grad, grads[name], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rank", [3, 4, 5], ids=lambda r: f"rank{r}")
def test_channels_last_is_read_in_place_and_kept(rank):
    shape = {3: (8, 6, 10), 4: (8, 6, 5, 4), 5: (8, 6, 2, 3, 4)}[rank]
    fmt = {3: torch.contiguous_format, 4: torch.channels_last, 5: torch.channels_last_3d}[rank]
    steps = [batch(shape, torch.float64, 1, loc=1.0)]
    g = batch(shape, torch.float64, 2)
    ref, y_ref, gx_ref = one_process(torch.nn.BatchNorm1d if rank == 3 else
                                     torch.nn.BatchNorm2d if rank == 4 else torch.nn.BatchNorm3d, steps, g)
    got = run_sync(2, steps, g, [0, 5, 8], memory_format=fmt)
    for _, y, gx in got:
        if rank > 3:
            assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(torch.cat([r[1] for r in got]), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[2] for r in got]), gx_ref, rtol=1e-11, atol=1e-11)


def test_gradcheck_float64():
    """torch.autograd.gradcheck through the synchronized Function (one rank of a protocol communicator, which always
    synchronises), and the 2-rank gradients against central differences of the whole batch's loss."""
    [comm] = make_comms(1)
    w, b = params(3, torch.float64)
    x = batch((4, 3, 3, 2), torch.float64, 1, loc=1.0).requires_grad_()
    w.requires_grad_(), b.requires_grad_()
    for mode in sync.MODES:
        def f(x, w, b):
            # (the views share w's and b's memory, which gradcheck perturbs in place)
            views = (None, None, w.detach().numpy(), b.detach().numpy())
            return bt.SyncBatchNormFunction.apply(x, w, b, None, None, 0.0, 1e-5, comm, mode, np.zeros(3), views)
        assert torch.autograd.gradcheck(f, (x, w, b))
    assert len(comm.calls) > 0

    # two ranks: d(sum of every rank's sum(y * g)) / dx by central differences on the whole batch
    shape = (5, 2, 3, 2)
    x0, g = batch(shape, torch.float64, 5), batch(shape, torch.float64, 6)
    got = run_sync(2, [x0], g, [0, 2, 5], track_running_stats=False)
    gx = torch.cat([r[2] for r in got])
    ref = torch.nn.BatchNorm2d(2, dtype=torch.float64, track_running_stats=False)
    wr, br = params(2, torch.float64)
    with torch.no_grad():
        ref.weight.copy_(wr), ref.bias.copy_(br)
    h = 1e-6
    flat, num = x0.clone().reshape(-1), torch.empty(x0.numel(), dtype=torch.float64)
    with torch.no_grad():
        for i in range(flat.numel()):
            up, dn = flat.clone(), flat.clone()
            up[i] += h
            dn[i] -= h
            num[i] = ((ref(up.reshape(shape)) * g).sum() - (ref(dn.reshape(shape)) * g).sum()) / (2 * h)
    torch.testing.assert_close(gx.reshape(-1), num, rtol=1e-6, atol=1e-7)


# ---- exact mode: bitwise one process ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,fmt", [((10, 6, 16, 16), torch.contiguous_format),
                                       ((12, 64, 16, 16), torch.channels_last),
                                       ((12, 1, 32, 64), torch.contiguous_format)], ids=str)
@pytest.mark.parametrize("P", [2, 3])
def test_exact_mode_on_chunk_boundaries_is_bt_batchnorm2d_bitwise(shape, fmt, dtype, P):
    layout = "NCHW" if fmt is torch.contiguous_format else "NHWC"
    nd = DTYPES[dtype]
    nhwc = (shape[0], shape[2], shape[3], shape[1])
    unit = sync.chunk_rows(shape if layout == "NCHW" else nhwc, layout, nd)
    if unit is None:  # one channel: the chunks are runs of the flat batch
        run = sync._chunks(1, 1, int(np.prod(shape)), np.dtype(nd).itemsize)[0][3]
        unit = run // int(np.prod(shape[1:]))
    elif layout == "NHWC":  # rows of the (N H W, C) matrix -> samples
        assert unit % (shape[2] * shape[3]) == 0
        unit //= shape[2] * shape[3]
    assert 0 < unit and 2 * unit < shape[0]
    cuts = {2: [0, unit, shape[0]], 3: [0, 2 * unit, 2 * unit, shape[0]]}[P]
    steps = [batch(shape, dtype, 1, loc=3.0, scale=2.0), batch(shape, dtype, 2, loc=-1.0)]
    g = batch(shape, dtype, 4)
    ref, y_ref, gx_ref = one_process(bt.BatchNorm2d, steps, g, memory_format=fmt)
    got = run_sync(P, steps, g, cuts, "exact", memory_format=fmt)

    def same(a, b, what):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert a.detach().contiguous().numpy().tobytes() == b.detach().contiguous().numpy().tobytes(), what

    same(torch.cat([r[1] for r in got]), y_ref, "y")
    same(torch.cat([r[2] for r in got]), gx_ref, "grad_x")
    for r, (m, _, _) in enumerate(got):
        gw, gb = piece_grads(bt.BatchNorm2d, steps, g, cuts, r, memory_format=fmt)
        same(m.weight.grad, gw, "grad_weight")  # (the piece's own, as PyTorch's SyncBatchNorm)
        same(m.bias.grad, gb, "grad_bias")
        same(m.running_mean, ref.running_mean, "running_mean")
        same(m.running_var, ref.running_var, "running_var")


# ---- eval, no job, errors --------------------------------------------------------------------------------------

class _Silent:
    """A communicator that must not be used."""

    def allreduce(self, buf):
        raise AssertionError("eval mode communicated")

    allgather = allreduce


def test_eval_uses_running_statistics_and_communicates_nothing():
    m = bt.SyncBatchNorm(4, process_group=_Silent(), dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        for t in (m, ref):
            t.running_mean.copy_(torch.arange(4.0))
            t.running_var.copy_(torch.arange(1.0, 5.0))
    m.eval(), ref.eval()
    x = batch((3, 4, 2, 2), torch.float64, 1).requires_grad_()
    y = m(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-15, atol=1e-15)
    y.sum().backward()
    # PyTorch's SyncBatchNorm in eval mode without running statistics uses the local batch's, unsynchronised
    m2 = bt.SyncBatchNorm(4, process_group=_Silent(), dtype=torch.float64, track_running_stats=False).eval()
    torch.testing.assert_close(m2(x), torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-14,
                               atol=1e-14)


def test_without_a_distributed_job_it_is_batchnorm():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    x = batch((5, 3, 4, 4), torch.float32, 1)
    m, ref = bt.SyncBatchNorm(3), bt.BatchNorm2d(3)
    assert m(x).detach().numpy().tobytes() == ref(x).detach().numpy().tobytes()
    assert m.running_var.numpy().tobytes() == ref.running_var.numpy().tobytes()
    assert int(m.num_batches_tracked) == 1
    # 16-bit input too: the kernels' BatchNorm2d
    xh = x.to(torch.bfloat16)
    mh, refh = bt.SyncBatchNorm(3, dtype=torch.bfloat16), bt.BatchNorm2d(3, dtype=torch.bfloat16)
    assert torch.equal(mh(xh).view(torch.int16), refh(xh).view(torch.int16))
    # inputs the kernels do not cover: PyTorch's own
    mm = bt.SyncBatchNorm(3, device="meta")
    assert mm(torch.empty(5, 3, 4, device="meta")).device.type == "meta"


def test_one_value_per_channel_over_all_ranks_raises_and_changes_nothing():
    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm)
        x = torch.ones((1 if r == 0 else 0, 3))
        try:
            m(x)
        finally:
            assert int(m.num_batches_tracked) == 0 and not m.running_mean.any() and (m.running_var == 1).all()

    _, errors = run_ranks(2, fn)
    assert all(isinstance(e, ValueError) and "more than 1 value" in str(e) for e in errors), errors


def test_a_refused_input_raises_on_every_rank_and_changes_nothing():
    def fn(r, comm):
        m = bt.SyncBatchNorm(4, process_group=comm)
        x = torch.ones((3, 4 if r else 5, 8))
        try:
            m(x)
        finally:
            assert int(m.num_batches_tracked) == 0 and not m.running_mean.any()

    _, errors = run_ranks(2, fn)
    assert all(isinstance(e, (ValueError, RuntimeError)) for e in errors), errors


def test_an_empty_rank_gets_an_empty_piece_and_zero_parameter_gradients():
    shape = (6, 3, 4)
    steps, g = [batch(shape, torch.float64, 1)], batch(shape, torch.float64, 2)
    ref, _, _ = one_process(torch.nn.BatchNorm1d, steps, g)
    got = run_sync(3, steps, g, [0, 0, 6, 6], mode="fast")
    for r, (m, y, gx) in enumerate(got):
        want = ref.weight.grad if r == 1 else torch.zeros(3, dtype=torch.float64)  # (the piece's own)
        torch.testing.assert_close(m.weight.grad, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-14, atol=1e-14)
    assert got[0][1].shape == (0, 3, 4) and got[0][2].shape == (0, 3, 4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        bt.SyncBatchNorm(3, mode="approximate")
    m = bt.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="mode"):
        m.mode = "slow"
    assert m.mode == "exact"
    with pytest.raises(TypeError, match="comm"):
        bt.SyncBatchNorm(3, process_group=object())
    with pytest.raises(ValueError, match="2D"):
        m(torch.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        m(torch.ones(3, 0))
    # what the kernels do not cover cannot be synchronised over a protocol object: refused, not normalised alone
    # (the rank still takes part in the exchange, as a failure: the others raise instead of waiting)
    [comm] = make_comms(1)
    m = bt.SyncBatchNorm(3, process_group=comm, device="meta")
    with pytest.raises(TypeError, match="meta"):
        m(torch.ones(4, 3, device="meta"))
    assert len(comm.calls) == 1


def test_a_rank_whose_input_is_refused_takes_part_and_the_others_raise():
    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm, dtype=torch.float64)
        x = torch.randn(4, 3, 5, dtype=torch.float64)
        return m(x.float() if r == 1 else x)  # (rank 1: float32 input for float64 parameters)

    results, errors = run_ranks(2, fn)
    assert isinstance(errors[1], TypeError) and "must have the dtype of input" in str(errors[1])
    assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0])

    def fn3(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm)
        return m(torch.randn(4, 3, 5) if r == 0 else torch.randn(5))  # (rank 1: 1-D input)

    results, errors = run_ranks(2, fn3)
    assert isinstance(errors[1], ValueError) and isinstance(errors[0], RuntimeError)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_rank_with_another_channel_count_is_refused_there_and_the_others_raise(mode):
    """The exchange's length is the channels': a rank whose input has other channels than num_features is refused by
    its own checks (fast mode sent 2 C + 1 values of its C and the collective failed: gloo aborted the process), and
    the others raise RuntimeError."""
    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm, mode=mode)
        return m(torch.randn(2, 4 if r == 1 else 3, 5))

    _, errors = run_ranks(2, fn)
    assert isinstance(errors[1], ValueError) and "num_features = 3 channels" in str(errors[1])
    assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0])


def test_parameter_gradients_without_an_input_gradient():
    shape = (6, 3, 4)
    x, g = batch(shape, torch.float64, 1, loc=2.0), batch(shape, torch.float64, 2)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    (ref(x) * g).sum().backward()

    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm, dtype=torch.float64)
        (m(x[3 * r:3 * r + 3]) * g[3 * r:3 * r + 3]).sum().backward()
        return m

    ms = run_ok(2, fn)
    for name in ("weight", "bias"):  # (each rank's own piece's: their sum is one process's)
        total = getattr(ms[0], name).grad + getattr(ms[1], name).grad
        torch.testing.assert_close(total, getattr(ref, name).grad, rtol=1e-12, atol=1e-12)


# ---- convert -----------------------------------------------------------------------------------------------------

def test_convert_swaps_torch_syncbatchnorm_keeping_state_and_group():
    comm = make_comms(1)[0]
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.SyncBatchNorm(3, process_group=comm),
                                torch.nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].weight.fill_(2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    assert bt.convert(model) is model
    assert type(model[1]) is bt.SyncBatchNorm and type(model[2]) is bt.BatchNorm2d
    assert model[1].weight is weight and model[1].process_group is comm and model[1].mode == "exact"
    assert model[1].state_dict().keys() == {k[2:] for k in state if k.startswith("1.")}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    x = batch((4, 2, 3, 3), torch.float32, 1)
    model(x)  # (synchronised over the one-rank communicator)
    assert comm.calls and int(model[1].num_batches_tracked) == 1


def test_convert_sync_batchnorm_gives_this_class():
    comm = make_comms(1)[0]
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    out = bt.SyncBatchNorm.convert_sync_batchnorm(model, comm, mode="fast")
    assert type(out[0]) is bt.SyncBatchNorm and type(out[1][0]) is bt.SyncBatchNorm
    assert out[0].mode == "fast" and out[0].process_group is comm
    assert "mode='fast'" in repr(out[0])


def test_convert_sync_batchnorm_refuses_a_fused_model_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    fused = bt.convert(model, fuse_activations=True)
    with pytest.raises(ValueError, match="fused"):
        bt.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert any(isinstance(m, bt.BatchNormAct2d) for m in fused.modules())
    synced = bt.convert(bt.SyncBatchNorm.convert_sync_batchnorm(model), fuse_activations=True)  # (the order to use)
    assert any(isinstance(m, bt.SyncBatchNorm) for m in synced.modules())


def test_a_rank_failing_in_its_backward_takes_part_and_the_others_raise():
    """A saved input changed in place after the forward fails autograd's check on that rank: it still takes part in
    the backward's exchange, so the other ranks raise instead of waiting for it."""
    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm, dtype=torch.float64)
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        h = x * 1.0
        y = m(h)
        if r == 1:
            with torch.no_grad():
                h.add_(1.0)
        y.sum().backward()

    for mode_comms in (make_comms(2),):
        results, errors = run_ranks(2, fn, mode_comms)
        assert isinstance(errors[1], RuntimeError) and "inplace" in str(errors[1])
        assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0])


def test_a_rank_given_no_tensor_takes_part_and_the_others_raise():
    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm)
        return m(torch.randn(4, 3, 5) if r == 0 else [[1.0, 2.0, 3.0]])

    results, errors = run_ranks(2, fn)
    assert errors[1] is not None and isinstance(errors[0], RuntimeError)


@pytest.mark.parametrize("mode", sync.MODES)
def test_an_all_empty_batch_gives_zero_parameter_gradients(mode):
    def fn(r, comm):
        m = bt.SyncBatchNorm(3, process_group=comm, mode=mode)
        x = torch.zeros(0, 3, 4, requires_grad=True)
        m(x).sum().backward()
        return m.weight.grad, m.bias.grad

    for gw, gb in run_ok(2, fn):
        assert torch.equal(gw, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("what", ["momentum", "weight", "running_mean", "running_var", "num_features"])
def test_a_module_refused_on_one_rank_raises_there_before_the_exchange(what, mode):
    """momentum and the parameters' and running statistics' shapes are checked before the statistics' exchange (a
    rank refused after it left the others a step ahead, their collectives then out of step), and the num_features
    of another rank (fast mode's allreduce length) is found by the exchange's first step; nothing changes."""
    def fn(r, comm):
        m = bt.SyncBatchNorm(3 + (what == "num_features" and r == 1), process_group=comm, mode=mode)
        if r == 1 and what == "momentum":
            m.momentum = 2.0
        if r == 1 and what == "weight":
            m.weight = torch.nn.Parameter(torch.ones(4))
        if r == 1 and what == "running_mean":
            m.running_mean = torch.zeros(4)
        if r == 1 and what == "running_var":   # (the same memory as running_mean: refused by the update)
            m.running_var = m.running_mean
        x = torch.randn(4, m.num_features, 5)
        try:
            return m(x)
        finally:
            assert int(m.num_batches_tracked) == 0 and not m.running_mean.any()
            assert (m.running_var == (0 if what == "running_var" and r == 1 else 1)).all()

    _, errors = run_ranks(2, fn)
    if what == "num_features":
        for e in errors:
            assert isinstance(e, ValueError) and "different channel counts [3, 4]" in str(e)
        return
    assert isinstance(errors[1], ValueError) and what in str(errors[1])
    assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0])


def test_a_rank_outside_its_process_group_normalises_alone():
    """torch.distributed.new_group returns an int sentinel on the ranks outside the group: PyTorch's SyncBatchNorm is
    built with it and normalises such a rank's batch alone (world size -1); so does this one."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    outside = dist.GroupMember.NON_GROUP_MEMBER
    torch.manual_seed(9)
    x = torch.randn(4, 3, 5)
    for m in (bt.SyncBatchNorm(3, process_group=outside),
              bt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3), outside)):
        ref = torch.nn.BatchNorm1d(3)
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m.running_var, ref.running_var)
