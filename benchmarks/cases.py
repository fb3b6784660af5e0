"""The pytest-benchmark suite's parameters (``test_bench.py``): the harness's cases, every (case, mode,
implementation) an implementation supports, and the number of rounds per case."""
from benchmarks.harness import impls
from benchmarks.harness.cases import CASES, Case

PARAMS = [(case, mode, name) for case in CASES for mode in case.modes for name in impls.names(case.family)
          if impls.supports(name, case, mode)]

# small arrays on which test_agreement compares the implementations' outputs, in every mode of their family
SMALL = ([Case((4, 24, 5, 7), "NCHW"), Case((4, 24, 5, 7), "NHWC"), Case((64, 40))]
         + [Case((4, 24, 5, 7), layout, family="group_norm", options={"G": 6}) for layout in ("NCHW", "NHWC")]
         + [Case((4, 24, 5, 7), layout, family="instance_norm") for layout in ("NCHW", "NHWC")]
         + [Case((3, 5, 40), "last", family=fam) for fam in ("layer_norm", "rms_norm")])
AGREEMENT = [(case, mode) for case in SMALL for mode in case.modes]


def rounds_for(case):
    """(rounds, iterations per round) for pytest-benchmark: few rounds for the ~100 MB tensors."""
    if case.nbytes >= 40e6:
        return 5, 1
    if case.nbytes >= 4e6:
        return 10, 1
    if case.nbytes >= 100e3:
        return 50, 1
    return 100, 20
