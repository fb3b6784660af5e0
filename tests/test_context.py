"""Contexts: settings for the calls a thread makes inside `with bn_simd.Context(...)`, beside the default context
that the module-level setters change."""
import threading

import numpy as np
import pytest

import bn_simd
from bn_simd import _core
from conftest import HAVE_OPENMP, SUPPORTED_ISAS, make_input


def _forward_bits(x, layout):
    y, m, s = bn_simd.batch_norm_forward(x, layout=layout)
    return b"".join(a.tobytes() for a in (y, m, s))


def test_a_context_sets_the_isa_and_threads_of_the_calls_inside_it():
    default_isa = bn_simd.get_isa()
    with bn_simd.Context(isa="scalar", num_threads=1) as ctx:
        assert bn_simd.get_isa() == "scalar" and bn_simd.get_num_threads() == 1
        assert bn_simd.show_config()["isa"] == "scalar"
        with bn_simd.Context(num_threads=2):  # nested: its own threads, the default's ISA
            assert bn_simd.get_isa() == default_isa
            assert bn_simd.get_num_threads() == (2 if HAVE_OPENMP else 1)
        assert bn_simd.get_isa() == "scalar"
        assert "scalar" in repr(ctx)
    assert bn_simd.get_isa() == default_isa


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_calls_in_a_context_give_the_bits_of_the_same_global_settings(isa, layout):
    x = make_input((16, 24, 20, 20), layout, np.float32, seed=1, loc=3.0)
    bn_simd.set_isa(isa)
    bn_simd.set_num_threads(1)
    ref = _forward_bits(x, layout)
    bn_simd.set_isa("auto")
    bn_simd.set_num_threads(None)
    with bn_simd.Context(isa=isa, num_threads=1, cl_strip_bytes=4096, slab_bytes=1 << 20):
        assert _forward_bits(x, layout) == ref


def test_set_isa_changes_the_default_not_the_current_context():
    with bn_simd.Context(isa="scalar"):
        bn_simd.set_isa(SUPPORTED_ISAS[-1])
        assert bn_simd.get_isa() == "scalar"
    assert bn_simd.get_isa() == SUPPORTED_ISAS[-1]


@pytest.mark.skipif(len(SUPPORTED_ISAS) < 2, reason="needs two kernel sets")
def test_two_threads_with_different_contexts_at_once_each_get_their_own():
    x = make_input((8, 32, 30, 30), "NHWC", np.float32, seed=2, loc=100.0)
    refs = {}
    for isa in ("scalar", SUPPORTED_ISAS[-1]):
        bn_simd.set_isa(isa)
        refs[isa] = _forward_bits(x, "NHWC")
    bn_simd.set_isa("auto")
    assert refs["scalar"] != refs[SUPPORTED_ISAS[-1]]  # (the sums' order differs: the test can tell them apart)
    errors = []

    def work(isa):
        try:
            with bn_simd.Context(isa=isa, cl_strip_bytes=4096 if isa == "scalar" else None):
                for _ in range(30):
                    if _forward_bits(x, "NHWC") != refs[isa]:
                        errors.append(isa)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(isa,)) for isa in ("scalar", SUPPORTED_ISAS[-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_context_arguments_are_checked():
    with pytest.raises(ValueError, match="isa"):
        bn_simd.Context(isa="neon")
    with pytest.raises(TypeError, match="isa"):
        bn_simd.Context(isa=2)
    with pytest.raises(ValueError, match="num_threads"):
        bn_simd.Context(num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        bn_simd.Context(num_threads=1.5)
    with pytest.raises(ValueError, match="cl_strip_bytes"):
        bn_simd.Context(cl_strip_bytes=100)
    with pytest.raises(ValueError, match="slab_bytes"):
        bn_simd.Context(slab_bytes=-5)
    assert bn_simd.get_isa() == _core.get_isa()


def test_a_huge_byte_budget_is_capped_not_an_overflow():
    with bn_simd.Context(cl_strip_bytes=2**70, slab_bytes=2**70):
        x = np.random.default_rng(1).standard_normal((4, 5, 6), dtype=np.float32)
        np.testing.assert_array_equal(bn_simd.batch_norm(x, training=True), bn_simd.batch_norm(x, training=True))


@pytest.mark.parametrize("bad", ["9999999", 1e6 + 0.5])
def test_a_byte_budget_must_be_an_int(bad):
    with pytest.raises(TypeError):
        bn_simd.Context(cl_strip_bytes=bad)
