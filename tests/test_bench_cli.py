"""``python -m bn_simd bench`` on its smallest case: the table's columns, the JSON rows, agreement of the
implementations' outputs with bn_simd's, and the bar chart (when matplotlib is installed)."""
import json
import re

import pytest

import bn_simd
from bn_simd import _bench
from bn_simd.__main__ import main

TINY = ["--quick", "--only", "1x8x1x1", "--retries", "0", "--default-malloc"]


@pytest.fixture
def keep_torch_threads():
    """The benchmark sets PyTorch's thread count; put it back afterwards."""
    torch = _bench._torch()
    before = torch.get_num_threads() if torch is not None else None
    yield
    if torch is not None:
        torch.set_num_threads(before)


def _expected_columns():
    compared = [n for n in ("torch", "torch_out", "onnxruntime") if _bench.missing(n) is None]
    ratios = ["vs NumPy"] + [f"vs {_bench.IMPL_TITLES[n]}" for n in ("torch", "onnxruntime") if n in compared]
    return (["case", "op", "layout", "bn_simd ms", "NumPy ms"] + [f"{_bench.IMPL_TITLES[n]} ms" for n in compared]
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
    assert [(r["id"], r["op"]) for r in rows] == [("1x8x1x1-NCHW", "eval")]
    r = rows[0]
    assert r["min_bytes"] == 2 * r["tensor_bytes"] == 2 * 8 * 4
    assert r["probe_ms"] > 0 and r["pct_probe"] > 0
    timed = {n for n, ms in r["ms"].items() if ms}
    assert timed == {"bn_simd", "numpy"} | {n for n in ("torch", "torch_out", "onnxruntime")
                                            if _bench.missing(n) is None}
    assert set(r["max_diff"]) == timed - {"bn_simd"}
    assert all(d < 1e-5 for d in r["max_diff"].values()), r["max_diff"]


@pytest.mark.parametrize("case", [_bench.Case((4, 24, 5, 7)), _bench.Case((4, 24, 5, 7), "NHWC"),
                                  _bench.Case((64, 40))], ids=lambda c: c.id)
def test_every_op_measured_and_agreeing(case):
    rows = _bench.measure([case], target_s=0.002, k_min=1, k_max=2)
    assert [r["op"] for r in rows] == ["forward", "backward", "eval"]
    assert [r["min_bytes"] // r["tensor_bytes"] for r in rows] == [2, 3, 2]
    installed = {n for n in _bench.IMPLEMENTATIONS if _bench.missing(n) is None}
    for r in rows:
        expected = {n for n in installed if _bench.supports(n, case, r["op"])} - {"bn_simd"}
        assert set(r["max_diff"]) == expected
        assert all(d < 1e-5 for d in r["max_diff"].values()), (r["op"], r["max_diff"])
        assert all(r["ms"][n] > 0 for n in expected | {"bn_simd"})
    text = _bench.table(rows)
    for title in ("forward-train", "backward", "eval"):
        assert f"| {case.label} | {title} | {case.layout_label} |" in text
    assert "forward-train (1): " in text and "backward (1): " in text and "eval (1): " in text


def test_plot(tmp_path, capsys, keep_torch_threads):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert main(["bench", *TINY, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_bench, "have_matplotlib", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--plot", str(tmp_path / "bench.png")])
    assert exc.value.code == 2
    assert "--plot needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


def test_interleaved_medians_samples_every_fn_in_rounds_after_its_setup():
    log = []

    def fn(name):
        return lambda: log.append(name)

    def setup(name):
        return lambda: log.append("set " + name)

    res = _bench.interleaved_medians([fn("a"), fn("b")], setups=[setup("a"), setup("b")], target_s=0.001,
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
    assert [(r["id"], r["op"], r["threads"]) for r in rows] == [("1x8x1x1-NCHW", "eval", 2)]
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
    assert [(r["id"], r["op"], r["isas"]) for r in rows] == [("1x8x1x1-NCHW", "eval", isas)]
    assert sorted(rows[0]["ms"]) == sorted(isas) and all(v > 0 for v in rows[0]["ms"].values())
    assert bn_simd.get_isa() == active  # the kernel set is put back


def test_isa_table_with_one_kernel_set():
    """A CPU with the scalar kernels only: one time column and no ratio column, header and rows alike."""
    row = {"case": "1×8×1×1", "layout": "NCHW", "op": "eval", "id": "1x8x1x1-NCHW", "threads": 2,
           "isas": ["scalar"], "ms": {"scalar": 0.001}}
    lines = [line for line in _bench.isa_table([row]).splitlines() if line.startswith("|")]
    assert _cells(lines[0]) == ["case", "op", "layout", "scalar ms"]
    assert lines[1] == "|---|---|---|---:|"
    assert _cells(lines[2]) == ["1×8×1×1", "eval", "NCHW", "0.0010"]
    assert "Geometric" not in _bench.isa_table([row])


def test_isas_refuses_plot(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--isas", *TINY, "--plot", "x.png"])
    assert "not --isas" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [(["--threads", "1"], "--threads 2 or more"),
                                           (["--plot", "x.png"], "not --scaling"),
                                           (["--isas"], "separate tables")])
def test_scaling_refuses_options_it_cannot_honour(extra, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--scaling", *TINY, *extra])
    assert message in capsys.readouterr().err
