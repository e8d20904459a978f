"""``python -m trainkit.report RUN_DIR [RUN_DIR ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys

from trainkit.errors import TrainkitError
from trainkit.report.render import default_out, format_compare, format_table, report_run, report_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainkit.report",
        description="Summarise a trainkit run (goodput, interruptions, loss, throughput) and plot it; "
                    "with several run dirs, compare their loss curves.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="local path or fsspec URL (s3://...)")
    parser.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/report for a local run, "
                                      "./report-<name> for a remote one, ./report-compare for several)")
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) == 1:
            summary, written = report_run(args.run_dirs[0], args.out)
            print(format_table(summary))
        else:
            summaries, written = report_runs(args.run_dirs, args.out)
            print(format_compare(summaries))
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"\nwrote {len(written)} files to {args.out or default_out(args.run_dirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
