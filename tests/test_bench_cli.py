"""The benchmark harness (benchmarks/harness/, run through ``python -m bn_simd bench``) on its smallest case:
the table's columns, the JSON rows, agreement of the implementations' outputs with bn_simd's, and the bar
chart (when matplotlib is installed); group norm and instance norm end to end on tiny shapes, and the NumPy
group-norm baseline against bn_simd; and the message ``bench`` gives where there is no source checkout."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bn_simd
from bn_simd import __main__ as cli
from bn_simd import _baseline, _speed
from bn_simd.__main__ import main

# The checkout's root, for benchmarks.harness when the tests run from elsewhere (appended: the bn_simd under
# test, already imported, stays the one in use).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.harness import cases, impls, measure, report, timing  # noqa: E402

TINY = ["--quick", "--only", "1x8x1x1", "--retries", "0", "--default-malloc"]


@pytest.fixture
def keep_torch_threads():
    """The benchmark sets PyTorch's thread count; put it back afterwards."""
    torch = impls.torch_module()
    before = torch.get_num_threads() if torch is not None else None
    yield
    if torch is not None:
        torch.set_num_threads(before)


def _expected_columns():
    compared = [n for n in ("torch", "torch_out", "onnxruntime") if impls.missing(n) is None]
    ratios = ["vs NumPy"] + [f"vs {impls.IMPL_TITLES[n]}" for n in ("torch", "onnxruntime") if n in compared]
    return (["case", "op", "layout", "bn_simd ms", "NumPy ms"] + [f"{impls.IMPL_TITLES[n]} ms" for n in compared]
            + ["bn_simd GB/s", "% of probe"] + ratios)


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_bench_table_json_and_agreement(tmp_path, capsys, keep_torch_threads):
    path = tmp_path / "rows.json"
    assert main(["bench", *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    columns = _cells(lines[header])
    assert columns == _expected_columns()
    row = dict(zip(columns, _cells(lines[header + 2])))
    assert (row["case"], row["op"], row["layout"]) == ("1×8×1×1", "eval", "NCHW")
    assert float(row["bn_simd ms"]) > 0 and float(row["NumPy ms"]) > 0
    assert re.fullmatch(r"\d+ %", row["% of probe"]) and re.fullmatch(r"[\d.]+×", row["vs NumPy"])
    assert re.search(r"Geometric means of the speed-ups — all \(1\): [\d.]+× vs NumPy.*; eval \(1\): ", out)

    rows = json.loads(path.read_text())["rows"]
    assert [(r["id"], r["mode"]) for r in rows] == [("1x8x1x1-NCHW", "eval")]
    r = rows[0]
    assert r["min_bytes"] == 2 * r["tensor_bytes"] == 2 * 8 * 4
    assert r["probe_ms"] > 0 and r["pct_probe"] > 0
    timed = {n for n, ms in r["ms"].items() if ms}
    assert timed == {"bn_simd", "numpy"} | {n for n in ("torch", "torch_out", "onnxruntime")
                                            if impls.missing(n) is None}
    assert set(r["max_diff"]) == timed - {"bn_simd"}
    assert all(d < 1e-5 for d in r["max_diff"].values()), r["max_diff"]


@pytest.mark.parametrize("case", [cases.Case((4, 24, 5, 7)), cases.Case((4, 24, 5, 7), "NHWC"),
                                  cases.Case((64, 40))], ids=lambda c: c.id)
def test_every_mode_measured_and_agreeing(case):
    rows = measure.measure([case], target_s=0.002, k_min=1, k_max=2)
    assert [r["mode"] for r in rows] == ["forward", "backward", "eval"]
    assert [r["min_bytes"] // r["tensor_bytes"] for r in rows] == [2, 3, 2]
    installed = {n for n in impls.names(case.family) if impls.missing(n) is None}
    for r in rows:
        expected = {n for n in installed if impls.supports(n, case, r["mode"])} - {"bn_simd"}
        assert set(r["max_diff"]) == expected
        assert all(d < 1e-5 for d in r["max_diff"].values()), (r["mode"], r["max_diff"])
        assert all(r["ms"][n] > 0 for n in expected | {"bn_simd"})
    text = report.table(rows)
    for title in ("forward-train", "backward", "eval"):
        assert f"| {case.label} | {title} | {case.layout_label} |" in text
    assert "forward-train (1): " in text and "backward (1): " in text and "eval (1): " in text


def test_plot(tmp_path, capsys, keep_torch_threads):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert main(["bench", *TINY, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--plot", str(tmp_path / "bench.png")])
    assert exc.value.code == 2
    assert "--plot needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


def test_interleaved_medians_samples_every_fn_in_rounds_after_its_setup(monkeypatch):
    monkeypatch.setattr(timing, "_warmed", True)  # (the process's first measurement runs its calls untimed first)
    log = []

    def fn(name):
        return lambda: log.append(name)

    def setup(name):
        return lambda: log.append("set " + name)

    res = timing.interleaved_medians([fn("a"), fn("b")], setups=[setup("a"), setup("b")], target_s=0.001,
                                     k_min=3, k_max=4)
    assert len(res) == 2 and all(t > 0 and 3 <= k <= 4 for t, k in res) and res[0][1] == res[1][1]
    k = res[0][1]
    sets = [i for i, e in enumerate(log) if e.startswith("set ")]
    assert all(log[i + 1] == log[i][4:] for i in sets)  # each set-up is followed by a call of its own fn
    order = [log[i][4:] for i in sets][2:]  # the first two set up the batch-size estimates
    assert sorted(order) == ["a"] * k + ["b"] * k  # one sample of each fn per round
    assert order[:4] == ["a", "b", "b", "a"]  # the order rotates from round to round


def test_scaling_table_and_json(tmp_path, capsys, keep_torch_threads):
    path = tmp_path / "scaling.json"
    assert main(["bench", "--scaling", *TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    assert _cells(lines[header]) == ["case", "op", "layout", "1 thread ms", "2 threads ms", "2 threads ÷ 1"]
    row = _cells(lines[header + 2])
    assert row[:3] == ["1×8×1×1", "eval", "NCHW"] and float(row[3]) > 0 and float(row[4]) > 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["id"], r["mode"], r["threads"]) for r in rows] == [("1x8x1x1-NCHW", "eval", 2)]
    assert rows[0]["speedup"] == pytest.approx(rows[0]["ms"]["1"] / rows[0]["ms"]["2"])
    # the setting is put back after the 1-thread samples (without OpenMP every call runs on one thread)
    assert bn_simd.get_num_threads() == (2 if bn_simd.show_config()["openmp"] else 1)


def test_isa_table_and_json(tmp_path, capsys, keep_torch_threads):
    path = tmp_path / "isas.json"
    active = bn_simd.get_isa()
    isas = bn_simd.show_config()["supported_isas"]
    assert main(["bench", "--isas", *TINY, "--json", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    widest = isas[-1]
    assert _cells(lines[header]) == (["case", "op", "layout"] + [f"{n} ms" for n in isas]
                                     + [f"{n} ÷ {widest}" for n in isas[:-1]])
    row = _cells(lines[header + 2])
    assert row[:3] == ["1×8×1×1", "eval", "NCHW"] and all(float(v) > 0 for v in row[3:3 + len(isas)])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["id"], r["mode"], r["isas"]) for r in rows] == [("1x8x1x1-NCHW", "eval", isas)]
    assert sorted(rows[0]["ms"]) == sorted(isas) and all(v > 0 for v in rows[0]["ms"].values())
    assert bn_simd.get_isa() == active  # the kernel set is put back


def test_isa_table_with_one_kernel_set():
    """A CPU with the scalar kernels only: one time column and no ratio column, header and rows alike."""
    row = {"case": "1×8×1×1", "layout": "NCHW", "family": "batch_norm", "dtype": "float32", "mode": "eval",
           "id": "1x8x1x1-NCHW", "threads": 2, "isas": ["scalar"], "ms": {"scalar": 0.001}}
    lines = [line for line in report.isa_table([row]).splitlines() if line.startswith("|")]
    assert _cells(lines[0]) == ["case", "op", "layout", "scalar ms"]
    assert lines[1] == "|---|---|---|---:|"
    assert _cells(lines[2]) == ["1×8×1×1", "eval", "NCHW", "0.0010"]
    assert "Geometric" not in report.isa_table([row])


def test_isas_refuses_plot(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--isas", *TINY, "--plot", "x.png"])
    assert "not --isas" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [(["--retries", "-1"], "--retries must be >= 0"),
                                           (["--wait-idle", "-5"], "--wait-idle must be >= 0")])
def test_negative_retries_or_wait_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *TINY, *extra])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [(["--threads", "1"], "--threads 2 or more"),
                                           (["--plot", "x.png"], "not --scaling"),
                                           (["--isas"], "separate tables")])
def test_scaling_refuses_options_it_cannot_honour(extra, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--scaling", *TINY, *extra])
    assert message in capsys.readouterr().err


def test_write_readme_replaces_only_the_marked_table(tmp_path):
    path = tmp_path / "README.md"
    start, end = report.MARKS["scaling"]
    path.write_text(f"before\n{start}\nold\n{end}\nafter\n", encoding="utf-8")
    report.write_readme("| new |\n", path=str(path), marks=report.MARKS["scaling"])
    assert path.read_text(encoding="utf-8") == f"before\n{start}\n| new |\n{end}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        report.write_readme("x", path=str(path), marks=report.MARKS["isas"])


def test_a_new_op_family_needs_no_change_to_measuring_or_reports(monkeypatch):
    """An op family is a FAMILIES entry, a workspace and an IMPLEMENTATIONS entry: measure() times it and
    table() gives it a table of its own beside batch norm's."""

    class ScaleWorkspace:
        def __init__(self, case, seed=0):
            self.case, self.layout = case, case.layout
            self.x = np.random.default_rng(seed).standard_normal(case.shape, dtype=case.dtype)
            self.out = np.empty_like(self.x)

    def scale_bn_simd(ws, mode):
        return impls.Runner(lambda: np.multiply(ws.x, 2, out=ws.out), lambda r: r)

    def scale_numpy(ws, mode):
        return impls.Runner(lambda: ws.x * 2, lambda r: r)

    monkeypatch.setitem(cases.FAMILIES, "scale", cases.Family("scale", ("eval",), {"eval": 2}, ScaleWorkspace,
                                                               id_prefix="scale-"))
    monkeypatch.setitem(impls.IMPLEMENTATIONS, "scale", {"bn_simd": impls.Impl(scale_bn_simd),
                                                         "numpy": impls.Impl(scale_numpy)})
    toy = cases.Case((2, 3, 4, 4), modes=("eval",), family="scale", dtype=np.float64)
    assert toy.id == "scale-2x3x4x4-NCHW-float64" and toy.label == "2×3×4×4 float64"
    bn = cases.Case((1, 8, 1, 1), modes=("eval",))
    rows = measure.measure([bn, toy], target_s=0.002, k_min=1, k_max=2)
    assert [(r["family"], r["dtype"], r["mode"]) for r in rows] == [("batch_norm", "float32", "eval"),
                                                                    ("scale", "float64", "eval")]
    assert rows[1]["max_diff"] == {"numpy": 0.0} and rows[1]["min_bytes"] == 2 * 2 * 3 * 4 * 4 * 8
    text = report.table(rows)
    assert "float32, float64" in text.splitlines()[0]
    assert "batch norm:\n\n| case |" in text and "\nscale:\n\n| case |" in text
    assert "| 2×3×4×4 float64 | eval | NCHW |" in text
    assert text.count("Geometric means of the speed-ups") == 2


# ---- group norm and instance norm --------------------------------------------------------------------------

def _group_columns(with_onnxruntime):
    """The columns of a group-norm or instance-norm table: no PyTorch out=, ONNX RT where the cases have it,
    the batch-norm eval yardstick's time and bn_simd's time over it."""
    compared = [n for n in ("torch",) + (("onnxruntime",) if with_onnxruntime else ()) if impls.missing(n) is None]
    return (["case", "op", "layout", "bn_simd ms", "NumPy ms"] + [f"{impls.IMPL_TITLES[n]} ms" for n in compared]
            + ["BN eval ms", "bn_simd GB/s", "% of probe", "vs NumPy"]
            + [f"vs {impls.IMPL_TITLES[n]}" for n in compared] + ["÷ BN eval"])


TINY_GROUPS = [cases.Case((2, 8, 5, 6), "NCHW", family="group_norm", options={"G": 4}),
               cases.Case((2, 8, 5, 6), "NHWC", family="group_norm", options={"G": 4}),
               cases.Case((2, 8, 5, 6), "NCHW", family="instance_norm"),
               cases.Case((2, 8, 5, 6), "NHWC", family="instance_norm")]


def test_group_and_instance_norm_quick_run(tmp_path, capsys, monkeypatch, keep_torch_threads):
    """--quick --only group_norm instance_norm, on tiny cases: a table per family with every mode, the ONNX RT
    column (channels first, forward), the BN eval yardstick and the targets line; JSON rows whose outputs agree."""
    pool = [cases.Case((2, 8, 5, 6))] + TINY_GROUPS  # the batch-norm case must be left out by --only
    monkeypatch.setattr(cases, "QUICK_CASES", pool)
    path = tmp_path / "rows.json"
    assert main(["bench", "--quick", "--only", "group_norm", "instance_norm", "--retries", "0",
                 "--default-malloc", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "group norm:\n\n| case |" in out and "\ninstance norm:\n\n| case |" in out
    assert "batch norm:" not in out
    header = [_cells(line) for line in out.splitlines() if line.startswith("| case |")]
    assert header == [_group_columns(True)] * 2
    for label in ("2×8×5×6 G=4", "2×8×5×6"):
        for op in ("forward-train", "backward", "forward+backward"):
            for layout in ("NCHW", "NHWC"):
                assert f"| {label} | {op} | {layout} |" in out
    assert out.count("bn_simd's time ÷ its batch-norm eval of the same tensor — forward-train ") == 2
    assert "target ≤ 1.2×" in out and "target ≤ 2×" in out

    rows = json.loads(path.read_text())["rows"]
    assert [(r["id"], r["mode"]) for r in rows] == [(c.id, m) for c in TINY_GROUPS for m in cases.GROUP_MODES]
    passes = {"forward": 2, "backward": 3, "forward_backward": 5}
    for r, (case, mode) in zip(rows, [(c, m) for c in TINY_GROUPS for m in cases.GROUP_MODES]):
        assert r["family"] == case.family and r["min_bytes"] == passes[mode] * r["tensor_bytes"]
        expected = {n for n in ("numpy", "torch", "onnxruntime")
                    if impls.missing(n) is None and impls.supports(n, case, mode)}
        assert ("onnxruntime" in expected) == (impls.missing("onnxruntime") is None and mode == "forward"
                                               and case.layout == "NCHW")
        assert set(r["max_diff"]) == expected  # the yardstick is timed, not compared
        assert all(d < 1e-5 for d in r["max_diff"].values()), (r["id"], mode, r["max_diff"])
        assert all(r["ms"][n] > 0 for n in expected | {"bn_simd", "bn_eval"})
        assert r["over_bn_eval"] == pytest.approx(r["ms"]["bn_simd"] / r["ms"]["bn_eval"])


def test_group_cases_carry_their_family_in_the_id():
    """--only group_norm / instance_norm select exactly those families; --quick has one case of each."""
    for family in ("group_norm", "instance_norm"):
        picked = [c for c in cases.CASES if family in c.id]
        assert picked and all(c.family == family for c in picked)
        assert sum(c.family == family for c in cases.QUICK_CASES) == 1
        assert all(set(c.modes) <= set(cases.GROUP_MODES) for c in picked)
    assert all(c.options["G"] == 32 for c in cases.CASES if c.family == "group_norm")
    with pytest.raises(ValueError, match="option"):
        cases.Case((2, 8, 5, 6), family="group_norm")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dims,G", [((3, 12, 5, 7), 4), ((3, 12, 5, 7), 12), ((2, 6, 9), 1), ((2, 8, 3, 4, 5), 2)])
def test_numpy_group_norm_baseline_agrees_with_bn_simd(dims, G, layout, dtype):
    rng = np.random.default_rng(7)
    C = dims[1]
    shape = dims if layout == "NCHW" else (dims[0],) + dims[2:] + (C,)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-0.5, 0.5, C).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    y, mean, invstd = bn_simd.group_norm_forward(x, G, w, b, layout=layout)
    y_np, mean_np, var_np = _baseline.group_norm_forward(x, G, w, b, 1e-5, layout)
    assert y_np.dtype == dtype and mean_np.shape == var_np.shape == (dims[0], G)
    np.testing.assert_allclose(y_np, y, atol=tol * 4, rtol=0)
    np.testing.assert_allclose(mean_np, mean, atol=tol * 4, rtol=tol)
    np.testing.assert_allclose(1 / np.sqrt(var_np + 1e-5), invstd, rtol=tol * 4)
    gx, gw, gb = bn_simd.group_norm_backward(dy, x, mean, invstd, G, w, layout=layout)
    gx_np, gw_np, gb_np = _baseline.group_norm_backward(dy, x, mean, invstd, G, w, layout)
    n = x.size // C
    np.testing.assert_allclose(gx_np, gx, atol=tol * 4, rtol=0)
    np.testing.assert_allclose(gw_np, gw, atol=tol * 4 * np.sqrt(n), rtol=0)
    np.testing.assert_allclose(gb_np, gb, atol=tol * 4 * np.sqrt(n), rtol=0)
    # the float64 reference of float32 data: bn_simd's statistics are float64, so only its output rounding differs
    y64, _, _ = _baseline.group_norm_forward(x, G, w, b, 1e-5, layout, dtype=np.float64)
    np.testing.assert_allclose(y, y64, atol=8 * np.finfo(dtype).eps * np.abs(y64).max(), rtol=0)


def test_numpy_group_norm_baseline_without_affine_is_instance_norm_at_g_equal_c():
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((2, 4, 6, 5)), rng.standard_normal((2, 4, 6, 5))
    y, mean, invstd = bn_simd.instance_norm_forward(x)
    y_np, mean_np, var_np = _baseline.group_norm_forward(x, 4)
    np.testing.assert_allclose(y_np, y, atol=1e-12)
    gx = bn_simd.instance_norm_backward(dy, x, mean, invstd)[0]
    np.testing.assert_allclose(_baseline.group_norm_backward(dy, x, mean, invstd, 4)[0], gx, atol=1e-12)


def test_checkout_root_is_a_folder_with_the_harness(tmp_path, monkeypatch):
    assert cli.checkout_root([str(tmp_path)]) is None
    (tmp_path / "benchmarks" / "harness").mkdir(parents=True)
    (tmp_path / "benchmarks" / "run.py").write_text("")
    assert cli.checkout_root([str(tmp_path / "elsewhere"), str(tmp_path)]) == str(tmp_path)
    monkeypatch.chdir(ROOT)  # the package's parent, or else the current directory
    assert cli.checkout_root() == ROOT


def _installed_copy(tmp_path):
    """A copy of the package under test in a folder of its own, with no benchmarks/ beside it."""
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(bn_simd.__file__), site / "bn_simd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.pyx"))
    env = dict(os.environ, PYTHONPATH=str(site))
    return site, env


def test_installed_package_without_benchmarks(tmp_path):
    """From an installation with no source checkout around it, check still runs and bench says where the
    benchmarks are, with exit status 2."""
    site, env = _installed_copy(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    bench = subprocess.run([sys.executable, "-m", "bn_simd", "bench", "--quick"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 2, bench.stderr
    assert "python benchmarks/run.py" in bench.stderr and "source checkout" in bench.stderr
    check = subprocess.run([sys.executable, "-m", "bn_simd", "check"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all passed" in check.stdout
    if bn_simd.show_config()["openmp"]:
        assert check.stdout.count("1 and 2 threads: the same bits") == 2   # (the threaded paths ran too)
    else:  # (no thread count to compare: said so, not claimed)
        assert "built without OpenMP" in check.stdout and "1 and 2 threads" not in check.stdout
    where = subprocess.run([sys.executable, "-c", "import bn_simd; print(bn_simd.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # the copy was the one run


def test_speed_table_columns():
    lines = []
    rows = _speed.speed_table([((4, 8, 3, 3), "NCHW", ("forward", "eval")), ((16, 3, 3, 8), "NHWC", ("backward",))],
                              budget_s=0.001, out=lines.append)
    assert _cells(lines[0]) == ["case", "layout", "op", "bn_simd ms", "NumPy ms", "bn_simd GB/s", "speed-up"]
    assert [_cells(line)[:3] for line in lines[2:5]] == [["4x8x3x3", "NCHW", "train fwd"], ["4x8x3x3", "NCHW", "eval"],
                                                        ["16x3x3x8", "NHWC", "backward"]]
    assert [r["mode"] for r in rows] == ["forward", "eval", "backward"]
    assert all(r["bn_simd_ms"] > 0 and r["numpy_ms"] > 0 for r in rows)


def test_a_json_path_that_is_a_folder_is_refused_before_timing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--json", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_a_json_file_that_cannot_be_written_is_refused_before_timing(tmp_path, capsys):
    """A file the run could not write at its end (a read-only folder: /proc, a full or read-only mount) is refused
    before anything is timed (it failed with a traceback after the whole run)."""
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--json", "/proc/self/rows.json"])
    assert "cannot be written" in capsys.readouterr().err


def test_the_json_probe_leaves_a_link_and_an_existing_file_as_they_are(tmp_path):
    """The check that --json can be written touches nothing: a dangling link stays a link (the probe followed it,
    created its target and removed the link), an existing file keeps its bytes, and no new file is left behind."""
    link, target, kept, new = tmp_path / "rows.json", tmp_path / "target.json", tmp_path / "kept.json", tmp_path / "n"
    link.symlink_to(target)
    kept.write_text("old")
    for path in (link, kept, new):
        with pytest.raises(SystemExit):  # (refused after the probe: an --only that matches no case; nothing is timed)
            main(["bench", "--quick", "--only", "no-such-case", "--json", str(path)])
    assert link.is_symlink() and not target.exists()
    assert kept.read_text() == "old" and not new.exists()


def test_bench_after_a_double_dash_runs_the_harness(monkeypatch):
    """``python -m bn_simd -- bench`` is the bench command too (argparse's form), not the self-check's banner."""
    seen = []
    monkeypatch.setattr(cli, "bench", lambda argv: seen.append(list(argv)) or 7)
    assert main(["--", "bench"]) == 7 and seen == [[]]
    assert main(["--", "bench", "--quick"]) == 7 and seen[-1] == ["--quick"]
    assert main(["bench", "--quick"]) == 7 and seen[-1] == ["--quick"]


@pytest.mark.parametrize("rel", [1e-4, 1e-5])
def test_self_check_catches_an_eval_off_by_a_few_hundred_ulp(monkeypatch, rel):
    """The self-check's eval bound has no sqrt(n) (eval has no reduction): float32 eval outputs scaled by 1 + 1e-5
    (~84 ulp) or 1 + 1e-4 (~840 ulp) fail it; they passed the bound of the reductions' outputs."""
    from bn_simd import functional as F
    orig = F.batch_norm

    def scaled(x, *a, training=False, **k):
        y = orig(x, *a, training=training, **k)
        return (y * y.dtype.type(1 + rel)).astype(y.dtype) if not training and y.dtype == np.float32 else y

    monkeypatch.setattr(F, "batch_norm", scaled)
    assert cli.self_check(verbose=False) > 0
    monkeypatch.setattr(F, "batch_norm", orig)
    assert cli.self_check(verbose=False) == 0
