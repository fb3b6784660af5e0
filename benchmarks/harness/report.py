"""Reports of measure.py's rows: markdown tables, a bar chart, and the tables' place in benchmarks/README.md.

Tables name the libraries and versions, the kernels, the dtypes and the thread count in a header line.
Rows of several op families make one table per family, each under its family's title; rows of one family
make one table. Rows with the "bn_eval" yardstick (group norm, instance norm) get its time, bn_simd's time
over it, and a line checking those ratios against the family's targets.
"""
import math
import os

import numpy as np

import bn_simd

from . import impls, machine
from .cases import FAMILIES, MODE_TITLES
from .measure import gbs, ratio

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKS = {"comparison": ("<!-- bench-table:start -->", "<!-- bench-table:end -->"),
         "scaling": ("<!-- scaling-table:start -->", "<!-- scaling-table:end -->"),
         "isas": ("<!-- isa-table:start -->", "<!-- isa-table:end -->")}

# implementations always given a column, then those shown when installed and timed; the "vs" columns
BASE_COLUMNS = ("bn_simd", "numpy")
OPTIONAL_COLUMNS = ("torch", "torch_out", "onnxruntime")
RATIO_COLUMNS = ("numpy", "torch", "onnxruntime")
BN_EVAL = "bn_eval"  # the yardstick: a time column and a "÷ BN eval" column (bn_simd's time over it)


def have_matplotlib():
    """matplotlib is installed and imports (imported on first call)."""
    return impls.optional("matplotlib") is not None


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def fmt_ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def fmt_x(v):
    return "—" if v is None else (f"{v:.1f}×" if v >= 10 else f"{v:.2f}×")


def _num(v, spec):
    return "—" if v is None else format(v, spec)


def _dtypes(rows):
    return ", ".join(dict.fromkeys(r["dtype"] for r in rows)) or "float32"


def _by_family(rows, one_table):
    """one_table(rows of one family) for each family of rows, under the family's title when there are
    several."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    if len(families) <= 1:
        return one_table(rows)
    return "\n".join(f"{FAMILIES[f].title}:\n\n" + one_table([r for r in rows if r["family"] == f]).strip("\n")
                     + "\n" for f in families)


def _cells(r):
    return [r["case"], MODE_TITLES[r["mode"]], r["layout"]]


def _compared(rows):
    """The optional implementations in the rows whose library is installed: their columns are shown."""
    return [n for n in OPTIONAL_COLUMNS if impls.missing(n) is None and any(n in r["ms"] for r in rows)]


def table(rows):
    """The markdown table of measure()'s rows, with a header line and geometric means of the speed-ups.

    Columns of PyTorch and ONNX Runtime appear when they are installed; "vs PyTorch" takes the faster of
    PyTorch and PyTorch out=."""
    v = impls.versions()
    libs = [f"NumPy {v['numpy']}"] + [f"{t} {v[k]}" for k, t in (("torch", "PyTorch"), ("onnxruntime", "ONNX Runtime"))
                                      if v[k]]
    threads = sorted({r["threads"] for r in rows})
    header = (f"Machine: {machine.describe()}. bn_simd {v['bn_simd']} ({bn_simd.get_isa()} kernels), "
              f"{', '.join(libs)}; {_dtypes(rows)}, {'/'.join(map(str, threads))} thread(s)"
              f"{'; glibc malloc with fixed thresholds' if machine.MALLOC.steady else ''}; medians in ms.")
    return header + "\n\n" + _by_family(rows, _comparison)


def _has_bn_eval(rows):
    return any(r.get("over_bn_eval") for r in rows)


def _comparison(rows):
    shown = list(BASE_COLUMNS) + _compared(rows)
    ratios = [(k, impls.IMPL_TITLES[k]) for k in RATIO_COLUMNS if k in shown]
    yardstick = [BN_EVAL] if _has_bn_eval(rows) else []
    head = ([f"{impls.IMPL_TITLES[n]} ms" for n in shown + yardstick] + ["bn_simd GB/s", "% of probe"]
            + [f"vs {t}" for _, t in ratios] + [f"÷ {impls.IMPL_TITLES[n]}" for n in yardstick])
    lines = ["| case | op | layout | " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(head)]
    for r in rows:
        cells = (_cells(r) + [fmt_ms(r["ms"].get(n)) for n in shown + yardstick]
                 + [_num(r["gbs"], ".1f" if r["gbs"] >= 1 else ".3f"), _num(r["pct_probe"], ".0f") + " %"]
                 + [fmt_x(r["speedup"][k]) for k, _ in ratios] + [fmt_x(r.get("over_bn_eval")) for _ in yardstick])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    parts = []
    for label, sel in [("all", rows)] + [(MODE_TITLES[m], [r for r in rows if r["mode"] == m]) for m in MODE_TITLES]:
        if not sel:
            continue
        means = [(geomean(r["speedup"][k] for r in sel), t) for k, t in ratios]
        parts.append(f"{label} ({len(sel)}): " + ", ".join(f"{fmt_x(gm)} vs {t}" for gm, t in means if gm))
    lines.append("Geometric means of the speed-ups — " + "; ".join(parts) + ".")
    if yardstick:
        lines += ["", bn_eval_targets(rows)]
    return "\n".join(lines)


def bn_eval_targets(rows):
    """One line: per mode, bn_simd's time over its batch-norm eval of the same tensor (the "÷ BN eval" column),
    its range, and the rows over the family's target for that mode (cases.Family.bn_eval_targets)."""
    parts = []
    for mode in MODE_TITLES:
        sel = [r for r in rows if r["mode"] == mode and r.get("over_bn_eval")]
        if not sel:
            continue
        vals = [r["over_bn_eval"] for r in sel]
        span = fmt_x(min(vals)) if len(sel) == 1 else f"{fmt_x(min(vals))}–{fmt_x(max(vals))}"
        text = f"{MODE_TITLES[mode]} {span} ({len(sel)} row{'s' if len(sel) > 1 else ''}"
        bounds = {FAMILIES[r["family"]].bn_eval_targets.get(mode) for r in sel} - {None}
        if len(bounds) == 1:
            bound = bounds.pop()
            over = [f"{r['case']} {r['layout']}" for r in sel if r["over_bn_eval"] > bound]
            text += f"; target ≤ {bound:g}×: " + (f"over it: {', '.join(over)}" if over else "all within")
        parts.append(text + ")")
    return "bn_simd's time ÷ its batch-norm eval of the same tensor — " + "; ".join(parts) + "."


def scaling_table(rows):
    """The markdown table of measure_scaling()'s rows."""
    nt = rows[0]["threads"] if rows else impls.STATE.threads
    header = (f"Machine: {machine.describe()}. bn_simd {bn_simd.__version__} ({bn_simd.get_isa()} kernels); "
              f"{_dtypes(rows)}; medians in ms, 1 and {nt} threads timed alternately, sample by sample.")

    def one(sel):
        lines = [f"| case | op | layout | 1 thread ms | {nt} threads ms | {nt} threads ÷ 1 |",
                 "|---|---|---|---:|---:|---:|"]
        lines += [f"| {' | '.join(_cells(r))} | {fmt_ms(r['ms'][1])} | {fmt_ms(r['ms'][nt])} | {fmt_x(r['speedup'])} |"
                  for r in sel]
        return "\n".join(lines) + "\n"
    return header + "\n\n" + _by_family(rows, one)


def isa_table(rows):
    """The markdown table of measure_isas()'s rows: each kernel set's time and its ratio to the widest set's
    (the last of the supported ones), with geometric means of the ratios."""
    isas = rows[0]["isas"] if rows else bn_simd.show_config()["supported_isas"]
    nt = rows[0]["threads"] if rows else impls.STATE.threads
    widest, others = isas[-1], isas[:-1]
    header = (f"Machine: {machine.describe()}. bn_simd {bn_simd.__version__}; {_dtypes(rows)}, {nt} thread(s); "
              f"medians in ms, the kernel sets timed alternately, sample by sample; \"X ÷ {widest}\" is X's "
              f"time over {widest}'s.")

    def one(sel):
        lines = ["| " + " | ".join(["case", "op", "layout"] + [f"{n} ms" for n in isas]
                                   + [f"{n} ÷ {widest}" for n in others]) + " |",
                 "|---|---|---|" + "---:|" * (len(isas) + len(others))]
        for r in sel:
            cells = (_cells(r) + [fmt_ms(r["ms"][n]) for n in isas]
                     + [fmt_x(ratio(r["ms"][n], r["ms"][widest])) for n in others])
            lines.append("| " + " | ".join(cells) + " |")
        if sel and others:
            lines += ["", "Geometric means — " + "; ".join(
                f"{n} ÷ {widest}: {fmt_x(geomean(ratio(r['ms'][n], r['ms'][widest]) for r in sel))}"
                for n in others) + "."]
        return "\n".join(lines) + "\n"
    return header + "\n\n" + _by_family(rows, one)


def disagreements(rows, tol=impls.AGREEMENT_TOL):
    """"id mode impl (difference)" for every output that differs from bn_simd's by more than tol."""
    return [f"{r['id']} {r['mode']} {name} ({d:.1e})" for r in rows for name, d in r.get("max_diff", {}).items()
            if not d <= tol]


def plot(rows, path):
    """Bar chart of GB/s (minimum bytes / time) per case and mode, one bar per implementation and one for
    the copy probe, saved to path. Returns path, or None when matplotlib is not installed."""
    if not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in impls.IMPL_TITLES if n not in impls.YARDSTICKS and any(r["ms"].get(n) for r in rows)]
    labels = [f"{r['case']} {r['layout']}\n{MODE_TITLES[r['mode']]}" for r in rows]
    width = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 5))
    xs = np.arange(len(rows))
    for i, name in enumerate(names):
        vals = [gbs(r["min_bytes"], r["ms"].get(name)) or 0 for r in rows]
        ax.bar(xs + i * width, vals, width, label=impls.IMPL_TITLES[name])
    ax.bar(xs + len(names) * width, [r["probe_gbs"] for r in rows], width, label="copy probe", color="0.8")
    ax.set_xticks(xs + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("GB/s (minimum bytes / time)")
    titles = ", ".join(FAMILIES[f].title for f in dict.fromkeys(r["family"] for r in rows)) or "?"
    ax.set_title(f"{titles}, {_dtypes(rows)}, {rows[0]['threads'] if rows else '?'} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_readme(text, path=README, marks=MARKS["comparison"]):
    """Replace the text between the markers (default: the comparison table's) of path with text."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    mark_start, mark_end = marks
    start, end = doc.find(mark_start), doc.find(mark_end)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {mark_start} ... {mark_end} markers")
    doc = doc[:start + len(mark_start)] + "\n" + text.strip("\n") + "\n" + doc[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
