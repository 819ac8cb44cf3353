"""The report of a sweep: privacy-utility frontier and table, from MLflow.

    python -m experiments.report <sweep id or parent run id> [--out DIR]
        [--tracking-uri URI]

Writes ``frontier.png`` and ``sweep.md`` to ``--out`` (default
``reports/<sweep id>``) and logs both to the parent run as ``report/``; the
building itself is ``fl.tracking.sweep_report``. A multirun calls it on its own
when it ends.
"""

from __future__ import annotations

import argparse
import os
import sys

from fl.config import DEFAULT_TRACKING_URI
from fl.tracking.sweep_report import Report, ReportError, Row, build_report, frontier, short_labels

__all__ = ["Report", "ReportError", "Row", "build_report", "frontier", "main", "short_labels"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep id (printed by the multirun) or parent run id")
    parser.add_argument("--out", default=None, help="local folder (default reports/<sweep id>)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI",
                                                                 DEFAULT_TRACKING_URI))
    args = parser.parse_args(argv)
    try:
        report = build_report(args.tracking_uri, args.sweep, args.out)
    except ReportError as err:
        print(f"fedface report: {err}", file=sys.stderr)
        return 2
    print(report.markdown_path.read_text())
    print(f"written: {report.markdown_path}, {report.figure_path}; logged to MLflow run "
          f"{report.parent_run_id} under report/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
