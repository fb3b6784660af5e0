"""PyTorch's behaviour in corner cases its own tests exercise (test_nn.py's batch-norm tests), matched here.

Each test states the case, checks bn_simd's behaviour, and, when torch is installed, PyTorch's on the same data.
"""
from collections import OrderedDict

import numpy as np
import pytest

import bn_simd
from conftest import make_input
from fake_comm import make_comms


def _torch():
    return pytest.importorskip("torch")


# ---- an empty batch writes no statistics ------------------------------------------------------------------------

@pytest.mark.parametrize("unbiased", [True, False])
def test_update_running_stats_with_an_empty_batch_writes_nothing(unbiased):
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    mean, var = bn_simd.batch_stats(np.zeros((0, 3), np.float32))     # NaN: no values
    assert np.isnan(mean).all()
    bn_simd.update_running_stats(rm, rv, mean, var, 0, 0.1, unbiased=unbiased)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    # the arguments are still checked
    with pytest.raises(ValueError, match="momentum"):
        bn_simd.update_running_stats(rm, rv, mean, var, 0, 1.5)
    with pytest.raises(ValueError, match="running_var"):
        bn_simd.update_running_stats(rm, np.ones(2), mean, var, 0, 0.1)


def test_update_running_stats_names_the_wrong_argument_and_takes_whole_counts():
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\) to match the 3 channels of running_mean"):
        bn_simd.update_running_stats(rm, rv, np.ones(4), np.ones(3), 8, 0.1)
    for n in (2.5, float("inf"), -1):
        with pytest.raises(ValueError, match="whole number"):
            bn_simd.update_running_stats(rm, rv, np.ones(3), np.ones(3), n, 0.1)
    for n in (True, "5", None, np.ones(1)):  # (not a number: the wrong type)
        with pytest.raises(TypeError, match="whole number"):
            bn_simd.update_running_stats(rm, rv, np.ones(3), np.ones(3), n, 0.1)
    np.testing.assert_array_equal(rm, 0.5)
    bn_simd.update_running_stats(rm, rv, np.ones(3), np.ones(3), np.float64(4.0), 0.5)  # (an integral float)
    np.testing.assert_allclose(rm, 0.75)


def test_empty_batch_leaves_running_stats_as_torch_does():
    torch = _torch()
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    torch.nn.functional.batch_norm(torch.empty(0, 3, 4), rm, rv, training=True)
    ours_m, ours_v = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    bn_simd.batch_norm(np.empty((0, 3, 4), np.float32), ours_m, ours_v, training=True)
    mean, var = bn_simd.batch_stats(np.empty((0, 3, 4), np.float32))
    bn_simd.update_running_stats(ours_m, ours_v, mean, var, 0, 0.1)
    np.testing.assert_array_equal(ours_m, rm.numpy())
    np.testing.assert_array_equal(ours_v, rv.numpy())


# ---- checkpoints from before num_batches_tracked ----------------------------------------------------------------

def _old_checkpoint(layer):
    return {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}


@pytest.mark.parametrize("count", [0, 7])
def test_checkpoint_without_num_batches_tracked_loads_strictly_keeping_the_count(count):
    source = bn_simd.BatchNorm2d(3)
    source(make_input((4, 3, 2, 2), "NCHW", np.float32, seed=1))
    layer = bn_simd.BatchNorm2d(3)
    layer.num_batches_tracked = count
    layer.load_state_dict(_old_checkpoint(source), strict=True)
    np.testing.assert_array_equal(layer.running_mean, source.running_mean)
    assert layer.num_batches_tracked == count       # PyTorch keeps the layer's count (0 for a new layer)


def test_checkpoint_without_num_batches_tracked_matches_torch():
    torch = _torch()
    for count in (0, 7):
        t = torch.nn.BatchNorm2d(3)
        t.num_batches_tracked.fill_(count)
        sd = {k: v for k, v in torch.nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"}
        t.load_state_dict(sd, strict=True)
        ours = bn_simd.BatchNorm2d(3)
        ours.num_batches_tracked = count
        ours.load_state_dict(sd, strict=True)
        assert ours.num_batches_tracked == int(t.num_batches_tracked)


def test_current_version_checkpoint_missing_num_batches_tracked_is_refused_as_in_torch():
    """A dict whose version metadata says 2 (PyTorch's current layers) must have the counter, strict or not."""
    sd = OrderedDict(_old_checkpoint(bn_simd.BatchNorm2d(3)))
    sd._metadata = {"": {"version": 2}}
    layer = bn_simd.BatchNorm2d(3)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict(sd, strict=True)
    layer.load_state_dict(sd, strict=False)
    sd._metadata = {"": {"version": 1}}
    layer.load_state_dict(sd, strict=True)


def test_torch_state_dict_with_version_metadata_round_trips():
    torch = _torch()
    t = torch.nn.BatchNorm2d(3)
    t(torch.randn(4, 3, 2, 2))
    sd = t.state_dict()                               # carries _metadata version 2
    layer = bn_simd.BatchNorm2d(3)
    layer.load_state_dict(sd)
    assert layer.num_batches_tracked == 1
    del sd["num_batches_tracked"]
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        torch.nn.BatchNorm2d(3).load_state_dict(sd)


def test_non_strict_load_of_nothing_keeps_the_count():
    # PyTorch's test_batchnorm_load_state_dict: the counter survives loading an empty dict non-strictly
    layer = bn_simd.BatchNorm2d(3)
    assert layer.state_dict()["num_batches_tracked"] == 0
    layer.num_batches_tracked = 10
    layer.load_state_dict(OrderedDict(), strict=False)
    assert layer.state_dict()["num_batches_tracked"] == 10


# ---- track_running_stats switched after construction --------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_eval_uses_the_statistics_the_layer_holds_after_tracking_is_switched_off(layout):
    layer = bn_simd.BatchNorm2d(3, layout=layout, dtype=np.float64)
    layer.running_mean[:] = [5.0, -1.0, 0.5]
    layer.running_var[:] = [4.0, 0.25, 1.0]
    layer.track_running_stats = False
    layer.eval()
    x = make_input((4, 3, 2, 2), layout, np.float64, seed=2)
    np.testing.assert_array_equal(layer(x), bn_simd.batch_norm(x, layer.running_mean, layer.running_var,
                                                               layer.weight, layer.bias, layout=layout))


def test_training_after_tracking_is_switched_off_updates_nothing():
    # PyTorch's test_batchnorm_buffer_update_when_stats_are_not_tracked
    layer = bn_simd.BatchNorm1d(4)
    layer.track_running_stats = False
    layer(make_input((32, 4), "NCHW", np.float32, seed=3))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_switched_tracking_matches_torch():
    torch = _torch()
    x = make_input((6, 3, 2, 2), "NCHW", np.float32, seed=4)
    t = torch.nn.BatchNorm2d(3)
    ours = bn_simd.BatchNorm2d(3)
    t(torch.tensor(x))
    ours(x)
    t.track_running_stats = ours.track_running_stats = False
    held = ours.running_mean.copy()
    x2 = make_input((6, 3, 2, 2), "NCHW", np.float32, seed=5, loc=3.0)
    np.testing.assert_allclose(ours(x2), t(torch.tensor(x2)).detach().numpy(), atol=2e-6)    # training: batch
    np.testing.assert_array_equal(ours.running_mean, held)
    np.testing.assert_allclose(ours.running_mean, t.running_mean.numpy(), rtol=1e-6)
    assert ours.num_batches_tracked == int(t.num_batches_tracked)
    t.eval()
    ours.eval()
    np.testing.assert_allclose(ours(x2), t(torch.tensor(x2)).detach().numpy(), atol=2e-6)    # eval: held stats
    assert set(ours.state_dict()) == set(t.state_dict())


def test_tracking_switched_on_without_statistics_uses_batch_statistics_as_torch():
    torch = _torch()
    x = make_input((6, 3), "NCHW", np.float32, seed=6)
    t = torch.nn.BatchNorm1d(3, track_running_stats=False)
    ours = bn_simd.BatchNorm1d(3, track_running_stats=False)
    t.track_running_stats = ours.track_running_stats = True
    for mode in (True, False):
        t.train(mode)
        ours.train(mode)
        np.testing.assert_allclose(ours(x), t(torch.tensor(x)).detach().numpy(), atol=2e-6)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    assert set(ours.state_dict()) == set(t.state_dict())


# ---- momentum is checked only where it is used ------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [-1.2, 2.0, float("nan")])
def test_momentum_outside_0_1_is_ignored_where_unused(momentum):
    x = make_input((3, 2, 5), "NCHW", np.float64, seed=7)
    rm, rv = np.array([0.5, -0.5]), np.array([2.0, 0.5])
    # PyTorch's test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad calls eval with -1.2
    y = bn_simd.batch_norm(x, rm, rv, training=False, momentum=momentum)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, rm, rv, training=False))
    bn_simd.batch_norm(x, None, None, training=True, momentum=momentum)      # no running statistics to update
    y = bn_simd.instance_norm(x, rm, rv, use_input_stats=False, momentum=momentum)
    layer = bn_simd.BatchNorm1d(2, dtype=np.float64).eval()
    layer.momentum = momentum
    layer(x)
    layer.train()
    with pytest.raises(ValueError, match="momentum"):
        layer(x)
    assert layer.num_batches_tracked == 0
    with pytest.raises(ValueError, match="momentum"):
        bn_simd.batch_norm(x, rm, rv, training=True, momentum=momentum)
    np.testing.assert_array_equal(rm, [0.5, -0.5])


def test_momentum_type_is_checked_everywhere_as_in_torch():
    x = make_input((3, 2), "NCHW", np.float64, seed=8)
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(TypeError, match="momentum"):
        bn_simd.batch_norm(x, rm, rv, training=False, momentum="0.1")
    layer = bn_simd.BatchNorm1d(2).eval()
    layer.momentum = "0.1"
    with pytest.raises(TypeError, match="momentum"):
        layer(x)


def test_eval_momentum_matches_torch():
    torch = _torch()
    x = make_input((3, 2, 5), "NCHW", np.float32, seed=9)
    rm, rv = np.array([0.5, -0.5], np.float32), np.array([2.0, 0.5], np.float32)
    t = torch.nn.functional.batch_norm(torch.tensor(x), torch.tensor(rm), torch.tensor(rv), training=False,
                                       momentum=-1.2)
    np.testing.assert_allclose(bn_simd.batch_norm(x, rm, rv, momentum=-1.2), t.numpy(), atol=2e-6)


def test_a_training_call_counts_the_batch_without_running_statistics():
    """PyTorch counts a training batch whenever tracking is on, also when running_mean / running_var were set to None
    (it counts before it looks at them); the layers (SyncBatchNorm too) counted only when they held statistics."""
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    layers = [bn_simd.BatchNorm2d(3), bn_simd.BatchNorm2d(3, momentum=None),
              bn_simd.SyncBatchNorm(3, comm=make_comms(1)[0])]
    for layer in layers:
        layer.running_mean = layer.running_var = None
        layer(x)
        layer(x)
        assert layer.num_batches_tracked == 2, type(layer).__name__
        layer.eval()
        layer(x)
        assert layer.num_batches_tracked == 2
    untracked = bn_simd.BatchNorm2d(3, track_running_stats=False)
    untracked(x)
    assert untracked.num_batches_tracked is None
    torch = pytest.importorskip("torch")
    t = torch.nn.BatchNorm2d(3)
    t.running_mean = t.running_var = None
    t(torch.from_numpy(x))
    t(torch.from_numpy(x))
    assert int(t.num_batches_tracked) == 2
