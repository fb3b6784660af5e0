"""The benchmark harness of bn_simd (a source checkout's tooling, not part of the installed package).

    cases.py    what is timed: Case (op family, shape, layout, dtype, modes), the op families and their
                workspaces (the arrays of a case), the case lists (full, --quick, --scaling)
    impls.py    who is timed: per family, the bn_simd / NumPy / PyTorch / ONNX Runtime callables (and the
                BN-eval yardstick of group and instance norm); the optional libraries, thread settings, the
                copy probe, agreement of outputs
    timing.py   how: interleaved medians, CPU time of other processes, waiting for idle CPUs
    machine.py  glibc's malloc thresholds, the CPU description
    measure.py  rows of the comparison, of thread scaling and of kernel sets
    report.py   markdown tables, the bar chart, the tables' place in benchmarks/README.md

The op families are batch norm, group norm and instance norm. The command line is benchmarks/run.py.
Adding an op family (LayerNorm, ...) means a Family and its workspace in cases.py, its cases, and its
IMPLEMENTATIONS entry in impls.py; timing and reports take it as it is.
"""
