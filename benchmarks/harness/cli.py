"""The command line and set-up the per-call batch-norm scripts share (benchmarks/epilogue.py, benchmarks/half.py)."""
import argparse

import numpy as np

import bn_simd


def positive_int(text):
    """argparse type: an int >= 1 (a thread count)."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def shape_parser(doc, default_shape):
    """An argument parser with --shape N C H W, --threads and --target (seconds of samples per callable and row)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=list(default_shape))
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--target", type=float, default=1.0, help="seconds of samples per callable and row")
    return ap


def set_threads(threads):
    """bn_simd's and (when installed) PyTorch's thread counts; returns the torch module or None."""
    bn_simd.set_num_threads(threads)
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def data_dtype(name):
    """The NumPy dtype of a data type's name; bfloat16 is ml_dtypes' (ImportError when it is not installed)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
