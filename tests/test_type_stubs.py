"""The type stubs (bn_simd/__init__.pyi, bn_simd/keras.pyi, bn_simd/torch/__init__.pyi, and the py.typed marker).

- mypy's stubtest imports bn_simd and compares every stub with the run-time object it describes (names, parameter
  kinds, names and defaults, classes and their methods, __all__): a signature changed in the .py modules without
  its stub fails here. The stubs are checked from a copy holding only the .pyi files (the package's .py modules are
  not written for mypy and would be type-checked beside them otherwise); tests/stubtest_allowlist.txt lists the
  modules that have no stubs of their own.
- mypy --strict type-checks a snippet that uses the API as documented (with assert_type on the results whose type
  depends on the arguments: the dtype follows x, batch_norm_forward's arity follows activation/residual), and
  reports each deliberate error of a second snippet (a misspelt layout, a str eps, an unknown activation, ...).

bn_simd.torch's stubs are checked with torch's own types skipped (torch.* as Any: mypy takes ~30 s to read torch);
the names, kinds and defaults of its signatures are still compared. ``--runslow`` checks them against torch's types.
Skipped without mypy (``pip install mypy``).
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy")

import bn_simd  # noqa: E402

PKG = os.path.dirname(os.path.abspath(bn_simd.__file__))
ROOT = os.path.dirname(PKG)  # the directory bn_simd is imported from
HERE = os.path.dirname(os.path.abspath(__file__))
STUBS = ["__init__.pyi", "keras.pyi", os.path.join("torch", "__init__.pyi")]

# torch.* skipped: its classes are then Any, and an autograd Function's metaclass cannot be compared
_SKIP_TORCH = """
[mypy-torch,torch.*]
follow_imports = skip
follow_imports_for_stubs = True
"""
_SKIP_TORCH_ALLOW = "bn_simd\\.torch\\.\\w+Function\n"


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _mypy_config(path, cache, extra=""):
    with open(path, "w") as f:
        f.write(f"[mypy]\ncache_dir = {cache}\n{extra}")
    return str(path)


def _run(args, cwd, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("MYPYPATH", None)
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=600)
    return r.returncode, r.stdout


def test_the_package_carries_its_stubs_and_marker():
    for name in STUBS + ["py.typed"]:
        assert os.path.isfile(os.path.join(PKG, name)), name
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    with open(os.path.join(os.path.dirname(HERE), "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert {"*.pyi", "py.typed"} <= set(data["bn_simd"]) and "*.pyi" in data["bn_simd.torch"]


@pytest.mark.parametrize("torch_types", [
    pytest.param(False, id="torch-skipped"),
    pytest.param(True, id="torch-typed", marks=pytest.mark.slow),
])
def test_stubtest_finds_the_stubs_and_the_runtime_agree(tmp_path, torch_types):
    if torch_types and not _have_torch():
        pytest.skip("torch is not installed")
    tree = tmp_path / "stubs"
    for name in STUBS:
        if name.startswith("torch") and not _have_torch():
            continue  # (bn_simd.torch cannot be imported: stubtest reports the module as missing, allowed below)
        os.makedirs(tree / "bn_simd" / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(PKG, name), tree / "bn_simd" / name)
    allow = tmp_path / "allowlist.txt"
    with open(os.path.join(HERE, "stubtest_allowlist.txt")) as f:
        text = f.read()
    if not torch_types and _have_torch():
        text += _SKIP_TORCH_ALLOW
    if not _have_torch():
        text += "bn_simd\\.torch(\\..*)?\n"
    allow.write_text(text)
    config = _mypy_config(tmp_path / "mypy.ini", tmp_path / "cache",
                          f"mypy_path = {tree}\n" + ("" if torch_types else _SKIP_TORCH))
    rc, out = _run(["-m", "mypy.stubtest", "bn_simd", "--mypy-config-file", config, "--allowlist", str(allow),
                    "--concise"], cwd=str(tmp_path))
    assert rc == 0, out


GOOD = """
    from typing import Any, assert_type

    import numpy as np
    from numpy.typing import NDArray

    import bn_simd
    from bn_simd.keras import BatchNormalization

    F32 = NDArray[np.float32]
    F64 = NDArray[np.float64]
    x: F32 = np.zeros((4, 3, 5, 5), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)

    y = bn_simd.batch_norm(x, rm, rv, training=True, layout="channels_first", activation="relu", residual=x)
    assert_type(y, F32)
    assert_type(bn_simd.batch_norm(x.astype(np.float64), rm, rv, axis=1, activation=("clamp", 0.0, None)), F64)
    y3, mean, invstd = bn_simd.batch_norm_forward(x, mask=np.ones((4, 5, 5), bool))
    assert_type(mean, F32)
    y4, _, _, stats = bn_simd.batch_norm_forward(x, activation=("leaky_relu", 0.2))
    assert_type(stats, tuple[F64, F64])
    gx, gw, gb = bn_simd.batch_norm_backward(y3, x, mean, invstd, out=x)
    assert_type(gx, F32)
    gx4, gw4, gb4, gres = bn_simd.batch_norm_backward(y4, x, None, None, activation="silu", save_stats=stats)
    assert_type(gres, F32 | None)
    m, v = bn_simd.batch_stats(x, layout="NHWC")
    assert_type(bn_simd.merge_moments(bn_simd.batch_moments(x), bn_simd.batch_moments(x)), tuple[F64, F64])
    assert_type(bn_simd.group_norm(x, 3, eps=1e-3, layout="NCHW"), F32)
    yl, lmean, rstd = bn_simd.layer_norm_forward(x, (5, 5))
    gxl, gwl, gbl = bn_simd.layer_norm_backward(yl, x, lmean, rstd, (5, 5))
    assert_type(gwl, NDArray[np.floating[Any]] | None)
    assert_type(bn_simd.rms_norm(x, 5), F32)
    mean_s, var_s, n = bn_simd.sync_batch_stats(x, object(), mode="fast")
    assert_type(n, int)
    w2, b2 = bn_simd.fold_conv(np.ones((8, 3, 3, 3), np.float32), None, rm, rv, weight_layout="HWIO",
                               position="before")
    assert_type(w2, F32)

    layer = bn_simd.BatchNorm2d(3, layout="NHWC", activation="relu6", momentum=None).eval()
    assert_type(layer, bn_simd.BatchNorm2d)
    out: F32 = layer(x, residual=x)
    layer.train()
    gin: F32 = layer.backward(out)
    layer.load_state_dict(layer.state_dict(), strict=False)
    rmean: NDArray[np.floating[Any]] | None = layer.running_mean
    inorm = bn_simd.InstanceNorm2d(3, affine=True)
    assert_type(inorm(x, out=x), F32)
    ln = bn_simd.LayerNorm((5, 5), elementwise_affine=False, layout=None)
    ln.backward(ln(x))
    params: list[NDArray[np.floating[Any]]] = bn_simd.RMSNorm(5, eps=None).parameters()
    sbn = bn_simd.SyncBatchNorm(3, comm=None, mode="exact")
    sbn.mode = "fast"
    with bn_simd.Context(num_threads=1, isa="auto") as ctx:
        assert_type(ctx, bn_simd.Context)
    bn_simd.set_num_threads(None)
    config: dict[str, Any] = bn_simd.show_config()

    k = BatchNormalization(axis=1, renorm=True, renorm_clipping={"rmax": 3.0})
    ky = k(x, training=True)
    kg = k.backward(ky)
    weights: list[NDArray[np.floating[Any]]] = k.get_weights()
"""

# line of the snippet -> what mypy must say there
BAD = {
    'bn_simd.batch_norm(x, layout="NCWH")': 'Argument "layout"',
    'bn_simd.batch_norm(x, eps="1e-5")': 'Argument "eps"',
    'bn_simd.batch_norm(x, activation="gelu")': 'Argument "activation"',
    'bn_simd.group_norm(x, 2.5)': 'Argument 2 to "group_norm"',
    'y, mean, invstd = bn_simd.batch_norm_forward(x, activation="relu")': "Too many values to unpack",
    'bn_simd.batch_norm_forward(x, activation="relu", mask=x)': "No overload variant",
    'bn_simd.BatchNorm2d(3, layout="CHWN")': 'Argument "layout"',
    'bn_simd.Context(isa="sse2")': 'Argument "isa"',
    'bn_simd.fold_linear(w, None, x, x, weight_layout="OIHW")': 'Argument "weight_layout"',
    'bn_simd.SyncBatchNorm(3, mode="slow")': 'Argument "mode"',
    'z: NDArray[np.float64] = bn_simd.normalize(x, x, x)': 'to "normalize" has incompatible type',  # (y is x's dtype)
    'BatchNormalization(momentum="0.99")': 'Argument "momentum"',
}


def test_mypy_strict_accepts_typed_use_and_reports_each_error(tmp_path):
    good = tmp_path / "good_use.py"
    good.write_text(textwrap.dedent(GOOD))
    head = ["import numpy as np", "from numpy.typing import NDArray", "import bn_simd",
            "from bn_simd.keras import BatchNormalization",
            "x: NDArray[np.float32] = np.zeros((4, 3), np.float32)", "w = np.ones((3, 3), np.float32)"]
    bad = tmp_path / "bad_use.py"
    bad.write_text("\n".join(head + list(BAD)) + "\n")
    config = _mypy_config(tmp_path / "mypy.ini", tmp_path / "cache", f"mypy_path = {ROOT}\n")
    rc, out = _run(["-m", "mypy", "--strict", "--config-file", config, "--no-error-summary", "--hide-error-context",
                    good.name, bad.name], cwd=str(tmp_path))
    lines = out.splitlines()
    good_errors = [ln for ln in lines if ln.startswith(f"{good.name}:")]
    assert not good_errors, "\n".join(good_errors)
    for i, (code, said) in enumerate(BAD.items(), start=len(head) + 1):
        at = [ln for ln in lines if ln.startswith(f"{bad.name}:{i}:") and ": error:" in ln]
        assert any(said in ln for ln in at), f"line {i} {code!r}: expected {said!r}, mypy said {at}\n{out}"
    assert rc == 1, out
