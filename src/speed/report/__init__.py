"""The run report: ``report.html`` for people, ``summary.json`` for programs, both in the run directory.

:func:`build_report` reads whatever the run holds (stage manifests, the call ledger, the synthesized
data, judge verdicts, evaluation results, plots), so it works on a finished run, a run stopped
halfway, or one still running; a missing or unreadable file leaves its section empty and adds a
line to ``summary["warnings"]`` instead of failing.

The page is one self-contained HTML file (inline CSS and JS, images as ``data:`` URIs, no network)
that can be mailed or copied with the run. All model text is escaped by Jinja2's autoescaping, and a
Content Security Policy lets only the page's own script run.

Example:
    >>> from speed.report import build_report
    >>> build_report(Path("runs/quickstart"))  # doctest: +SKIP
    PosixPath('runs/quickstart/report.html')
"""

from __future__ import annotations

import logging
from pathlib import Path

from speed.io import atomic_write, write_json
from speed.report.summary import collect_summary

__all__ = ["build_report", "collect_summary"]

logger = logging.getLogger(__name__)


def build_report(run_dir: str | Path, sample_per_kind: int = 40, judge_samples: int = 40) -> Path:
    """Write ``report.html`` and ``summary.json`` into a run directory.

    Both files are written atomically, so a reader never sees half a report, and rebuilding the
    report of a run (``speed report RUN``) replaces them.

    Args:
        run_dir: the run directory (``run.dir`` of its config).
        sample_per_kind: synthesized examples shown per task kind (a seeded random sample).
        judge_samples: judge verdicts shown.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist; pass the folder `speed run` made")
    from speed.report.render import render_html

    summary, sample, verdicts = collect_summary(
        run_dir, sample_per_kind=sample_per_kind, judge_samples=judge_samples
    )
    page = render_html(run_dir, summary, sample, verdicts)
    write_json(run_dir / "summary.json", summary)
    out = run_dir / "report.html"
    with atomic_write(out) as fh:
        fh.write(page)
    logger.info(
        "report written: %s (%d stages, %s final examples, %d warnings)",
        out,
        len(summary["stages"]),
        summary["costs"].get("final_examples"),
        len(summary["warnings"]),
    )
    return out
