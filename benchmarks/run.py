"""Time every case x op x implementation in one run and print a markdown table.

    python benchmarks/run.py [--quick] [--threads N] [--only TEXT ...] [--json FILE] [--plot FILE]
                             [--retries N] [--wait-idle SECONDS] [--default-malloc] [--write-readme]

The same as ``python -m bn_simd bench`` (the cases, timing and table live in ``bn_simd/_bench.py``), plus
``--write-readme``, which replaces the table between the markers in benchmarks/README.md (the thread-scaling
table's markers with ``--scaling``, the kernel-set table's with ``--isas``).
``measure(cases)``, ``table(rows)`` and ``plot(rows, path)`` can be imported from here.
"""
import os
import sys

from bn_simd._bench import disagreements, make_parser, measure, plot, run, table  # noqa: F401  (the API)

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
MARK_START, MARK_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
SCALING_START, SCALING_END = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"
ISA_START, ISA_END = "<!-- isa-table:start -->", "<!-- isa-table:end -->"


def write_readme(text, path=README, marks=(MARK_START, MARK_END)):
    """Replace the text between the markers (default: the bench-table ones) of path with text."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    mark_start, mark_end = marks
    start, end = doc.find(mark_start), doc.find(mark_end)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {mark_start} ... {mark_end} markers")
    doc = doc[:start + len(mark_start)] + "\n" + text.strip("\n") + "\n" + doc[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv=None):
    parser = make_parser("benchmarks/run.py")
    parser.add_argument("--write-readme", action="store_true",
                        help="replace the table between the markers in benchmarks/README.md (with "
                             "--scaling: the thread-scaling table; with --isas: the kernel-set table)")
    args = parser.parse_args(argv)
    rows, text = run(args, parser)
    if args.write_readme:
        marks = ((SCALING_START, SCALING_END) if args.scaling else (ISA_START, ISA_END) if args.isas
                 else (MARK_START, MARK_END))
        write_readme(text, marks=marks)
    return 1 if disagreements(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
