"""A KeyboardInterrupt during a layer's forward leaves the layer whole.

The kernels run without the GIL, so Python raises a Ctrl-C that arrived during one as the kernel returns: after the
running statistics moved. The layers then hold the count that goes with those statistics (PyTorch's BatchNorm counts
before its work, so its count moved too) and no earlier forward's saved state for backward to use. The interrupt is
simulated here: the kernel's wrapper runs it, then raises KeyboardInterrupt, as Python does at that point. A signal
handler's exception (a timeout's TimeoutError) arrives at the same point and is taken as an interrupt wherever the
statistics moved. A refused argument (an Exception before any of them moved) still changes nothing.
"""
import numpy as np
import pytest

import bn_simd
from bn_simd import _core, sync
from fake_comm import run_ok

RNG = np.random.default_rng(7)
# (what arrives as a kernel returns: a Ctrl-C, or the exception of a SIGALRM handler timing the call out)
RAISED = [KeyboardInterrupt, TimeoutError]


def interrupt_after(monkeypatch, owner, name, raised=KeyboardInterrupt):
    """owner.name runs, then raises raised; returns a list that counts the calls that ran."""
    real = getattr(owner, name)
    ran = []

    def call(*args, **kwargs):
        real(*args, **kwargs)
        ran.append(name)
        raise raised

    monkeypatch.setattr(owner, name, call)
    return ran


def trained(layer, x):
    """layer after one ordinary training call (so that it holds an earlier forward's state)."""
    layer(x)
    assert layer._saved is not None
    return layer


@pytest.mark.parametrize("raised", RAISED)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["plain", "relu", "mask", "renorm", "virtual"])
def test_batch_norm_layer_counts_the_batch_whose_statistics_moved(monkeypatch, kind, momentum, raised):
    x = RNG.standard_normal((8, 4, 5, 5)).astype(np.float32)
    kw = {"activation": "relu"} if kind == "relu" else {"renorm": True} if kind == "renorm" else \
        {"virtual_batch_size": 4} if kind == "virtual" else {}
    layer = trained(bn_simd.BatchNorm2d(4, momentum=momentum, **kw), x)
    before = layer.running_mean.copy(), layer.running_var.copy()
    if kind in ("renorm", "virtual"):
        from bn_simd import renorm
        monkeypatch.setattr(renorm, "layer_forward", _raising_after(renorm.layer_forward, raised))
    else:
        interrupt_after(monkeypatch, _core, "batch_norm_epi" if kind == "relu" else "batch_norm", raised)
        if kind == "mask":
            from bn_simd import _masked
            interrupt_after(monkeypatch, _masked, "forward", raised)
    call_kw = {"mask": np.ones((8, 5, 5), bool)} if kind == "mask" else {}
    with pytest.raises(raised):
        layer(x + 1, **call_kw)
    assert not np.array_equal(layer.running_mean, before[0])  # the statistics moved ...
    assert layer.num_batches_tracked == 2  # ... and the count with them
    assert layer._saved is None
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones_like(x))


def _raising_after(real, raised=KeyboardInterrupt):
    def call(*args, **kwargs):
        real(*args, **kwargs)
        raise raised
    return call


def test_a_refused_argument_still_changes_nothing():
    x = RNG.standard_normal((8, 4, 5, 5)).astype(np.float32)
    layer = trained(bn_simd.BatchNorm2d(4, momentum=None), x)
    saved, stats = layer._saved, (layer.running_mean.copy(), layer.running_var.copy())
    with pytest.raises(ValueError):
        layer(x, out=np.empty((8, 4, 5, 4), np.float32))
    assert layer._saved is saved and layer.num_batches_tracked == 1
    assert np.array_equal(layer.running_mean, stats[0]) and np.array_equal(layer.running_var, stats[1])


@pytest.mark.parametrize("make, owner, name, shape", [
    (lambda: bn_simd.InstanceNorm2d(4, track_running_stats=True), _core, "instance_norm", (3, 4, 5, 5)),
    (lambda: bn_simd.InstanceNorm2d(4, activation="relu"), _core, "instance_norm", (3, 4, 5, 5)),
    (lambda: bn_simd.GroupNorm(2, 4), _core, "group_norm", (3, 4, 5, 5)),
    (lambda: bn_simd.GroupNorm(2, 4, activation="silu"), _core, "group_forward_epi", (3, 4, 5, 5)),
    (lambda: bn_simd.LayerNorm(6), _core, "row_norm", (3, 5, 6)),
    (lambda: bn_simd.RMSNorm(6, activation="relu"), _core, "row_forward_epi", (3, 5, 6)),
])
def test_other_layers_keep_no_earlier_state_for_backward(monkeypatch, make, owner, name, shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    layer = trained(make(), x)
    interrupt_after(monkeypatch, owner, name)
    with pytest.raises(KeyboardInterrupt):
        layer(x)
    assert layer._saved is None
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones_like(x))


@pytest.mark.parametrize("raised", RAISED)
def test_keras_layer_keeps_no_earlier_state_for_backward(monkeypatch, raised):
    from bn_simd.keras import BatchNormalization
    x = RNG.standard_normal((8, 5, 3)).astype(np.float32)
    layer = BatchNormalization()
    layer(x, training=True)
    interrupt_after(monkeypatch, _core, "batch_norm", raised)
    with pytest.raises(raised):
        layer(x, training=True)
    assert layer._saved is None
    with pytest.raises(RuntimeError):
        layer.backward(np.ones_like(x))


def _sync_interrupted(x, interrupt, raised=KeyboardInterrupt):
    """Two ranks' SyncBatchNorm (momentum=None), each after one ordinary training call, then interrupt() (which sets
    the interrupt up), then a second call on its half of x, interrupted: per rank, (running_mean unmoved by it,
    num_batches_tracked, _saved)."""
    from fake_comm import make_comms
    comms = make_comms(2)
    layers = [bn_simd.SyncBatchNorm(3, comm=comms[r], momentum=None) for r in range(2)]
    run_ok(2, lambda r, comm: layers[r](x[2 * r:2 * r + 2] - 1), comms)
    before = [layer.running_mean.copy() for layer in layers]
    interrupt()

    def rank(r, comm):
        with pytest.raises(raised):
            layers[r](x[2 * r:2 * r + 2])
        return np.array_equal(layers[r].running_mean, before[r]), layers[r].num_batches_tracked, layers[r]._saved
    return run_ok(2, rank, comms)


def test_sync_batch_norm_interrupted_in_its_normalise_moves_nothing(monkeypatch):
    # (its normalise and update are two calls: an interrupt during the normalise is raised before the update; the
    # earlier call's saved state is dropped)
    x = RNG.standard_normal((4, 3, 5, 5)).astype(np.float32)
    ran = []
    assert _sync_interrupted(x, lambda: ran.append(interrupt_after(monkeypatch, sync.F, "normalize"))) == [
        (True, 1, None)] * 2
    assert ran[0] == ["normalize"] * 2


@pytest.mark.parametrize("raised", RAISED)
def test_torch_module_counts_the_batch_whose_statistics_moved(monkeypatch, raised):
    torch = pytest.importorskip("torch")
    import bn_simd.torch as bt
    from bn_simd.torch import functional as TF
    m = bt.BatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5)
    m(x)
    rm = m.running_mean.clone()
    interrupt_after(monkeypatch, TF, "_batch_norm", raised)
    with pytest.raises(raised):
        m(x)
    assert not torch.equal(m.running_mean, rm) and int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("raised", RAISED)
def test_sync_batch_norm_counts_before_its_update_and_drops_its_state_before_the_exchange(monkeypatch, raised):
    x = RNG.standard_normal((4, 3, 5, 5)).astype(np.float32)
    ran = []
    assert _sync_interrupted(x, lambda: ran.append(interrupt_after(monkeypatch, sync.F, "update_running_stats",
                                                                   raised)), raised) == [
        (False, 2, None)] * 2  # (statistics and count moved together)
    assert ran[0] == ["update_running_stats"] * 2
    monkeypatch.undo()

    def exchange_interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def rank2(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm)
        layer(x[2 * r:2 * r + 2])
        monkeypatch.setattr(sync, "_exchange_stats", exchange_interrupted)
        with pytest.raises(KeyboardInterrupt):
            layer(x[2 * r:2 * r + 2] + 1)
        with pytest.raises(RuntimeError, match="forward"):
            layer.backward(np.ones((2, 3, 5, 5), np.float32))
        return layer.num_batches_tracked

    assert run_ok(2, rank2) == [1, 1]


@pytest.mark.parametrize("at", [1, 3, 5])
def test_renorm_statistics_move_together(at):
    """A Ctrl-C between two of renorm's five writes (running mean, var, std, renorm mean, std) left some moved and the
    others not (running_var no longer running_std² - eps). A trace function raises it before write `at`, as a SIGINT
    landing between two bytecodes of that loop does; all five then move (the count with them), and it is raised."""
    import sys
    from bn_simd import renorm
    layer = bn_simd.BatchNorm2d(4, renorm=True)
    x = RNG.standard_normal((8, 4, 5, 5)).astype(np.float32) * 2 + 1
    names = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")
    before = {n: getattr(layer, n).copy() for n in names}
    code = renorm.update_renorm_stats.__code__
    lines = open(code.co_filename).readlines()
    writes = []

    def local(frame, event, arg):
        if event == "line" and lines[frame.f_lineno - 1].strip() == "a[...] = v":
            writes.append(frame.f_lineno)
            if len(writes) == at:
                raise KeyboardInterrupt
        return local

    old = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        with pytest.raises(KeyboardInterrupt):
            layer(x)
    finally:
        sys.settrace(old)
    assert len(writes) >= at
    assert all(not np.array_equal(getattr(layer, n), before[n]) for n in names)
    assert layer.num_batches_tracked == 1 and layer._saved is None


@pytest.mark.parametrize("raised", RAISED)
def test_an_exception_as_the_forward_step_ends_keeps_the_route_with_the_saved_state(monkeypatch, raised):
    """Raised at ForwardStep's exit (a signal landing just after the work), the saved state is the new forward's and
    so is its route: the route was written on a clean exit only, and backward read the new statistics with the earlier
    forward's layout (a gradient of another normalisation)."""
    from bn_simd import layers
    x = RNG.standard_normal((4, 4, 4, 4)).astype(np.float32)
    ref = bn_simd.BatchNorm2d(4, layout="NHWC").eval()
    ref.running_mean[:] = 0.5
    layer = bn_simd.BatchNorm2d(4).eval()
    layer.running_mean[:] = 0.5
    layer(x)
    layer.layout = "NHWC"
    real_exit = layers.ForwardStep.__exit__

    def exit_raising(self, kind, exc, tb):
        real_exit(self, kind, exc, tb)
        if kind is None:
            raise raised
    monkeypatch.setattr(layers.ForwardStep, "__exit__", exit_raising)
    with pytest.raises(raised):
        layer(x)
    monkeypatch.undo()
    ref(x)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(g), ref.backward(g))


def test_renorm_statistics_of_float16_move_silently_under_errstate_raise():
    x = RNG.standard_normal((8, 2)) * 3000
    rm, rv, rs, m2, s2 = (np.zeros(2, np.float16), np.ones(2, np.float16), np.ones(2, np.float16),
                          np.zeros(2, np.float16), np.ones(2, np.float16))
    with np.errstate(all="raise"):
        bn_simd.batch_renorm(x, rm, rv, training=True, running_std=rs, renorm_mean=m2, renorm_std=s2)
    # (the variance overflows float16 in a channel: rounded to inf, as a float16 store rounds, not raised after the
    # mean had moved and before the other four)
    assert np.isinf(rv).any() and np.all(rm != 0) and np.all(rs != 1) and np.all(m2 != 0) and np.all(s2 != 1)
