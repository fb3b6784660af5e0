"""Every op of the registry (tests/ops.py) in every registry-driven suite: a suite's case list that filters an op out
(a layout or shape it does not take, an entry name it lacks) would otherwise drop it without a skip message, as RMS
norm was dropped from seven suites while it had only the NHWC layout."""
import pytest
from _pytest.mark.structures import ParameterSet

import ops
import test_errors
import test_half_registry
import test_hostile
import test_layouts
import test_out
import test_parity

LISTS = {f"{m.__name__}.{name}": getattr(m, name) for m, names in (
    (test_layouts, ("LAYOUT_CASES", "UNUSUAL", "HALF_LAYOUTS")),
    (test_out, ("OUT_CASES", "BAD_OUT_CASES", "OVERLAP_CASES")),
    (test_errors, ("RANK_CASES", "DTYPE_CASES")),
    (test_hostile, ("REGISTRY_REFUSALS", "POISONS", "KINKS", "HALF_REFUSALS", "HALF_POISONS")),
    (test_parity, ("PARALLEL",)),
    (test_half_registry, ("CASES", "THREAD_CASES"))) for name in names}


@pytest.mark.parametrize("name", LISTS)
def test_every_registered_op_is_in_every_registry_suite(name):
    cases = LISTS[name]
    found = {(c.values if isinstance(c, ParameterSet) else c)[0].name for c in cases}
    assert found == {op.name for op in ops.OPS}, f"{name} lacks {sorted({op.name for op in ops.OPS} - found)}"
