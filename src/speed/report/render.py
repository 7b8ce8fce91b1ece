"""Render the run's figures into one self-contained HTML page.

Design choices:
- Jinja2 with autoescaping on: every value that reaches the page is escaped unless it is one of the
  package's own files (CSS, JS) or a base64 image, marked safe here and nowhere else. Model text
  (senior outputs, revisions, judge reasons) is only ever data.
- One file, no network: CSS and JS are inlined, plots are base64 ``data:`` URIs. A Content Security
  Policy allows exactly the page's own script (by its SHA-256), so even text that slipped through
  escaping could not run.
- Sorting and filtering of the sample tables is done by a few lines of JS over rows rendered here;
  no data is handed to the script as JSON, so there is no second escaping context to get right.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from speed.report.summary import revision_changed

#: Plots bigger than this are linked (relative path) instead of embedded.
MAX_EMBED_BYTES = 8 * 1024 * 1024


def _resource(name: str) -> str:
    return resources.files("speed.report").joinpath(name).read_text(encoding="utf-8")


def _fmt_int(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{round(value):,}".replace(",", "\u202f")


def _fmt_num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}".replace(",", "\u202f")


def _fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _pretty(value: Any) -> str:
    """Model text as it is; JSON (parsed or a JSON string) indented for reading."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "{[":
            try:
                return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except ValueError:
                pass
        return value
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _when(value: Any) -> str:
    """``2026-11-26T12:00:00+0000`` as ``2026-11-26 12:00``; anything else as it is."""
    if not isinstance(value, str):
        return ""
    return value[:16].replace("T", " ") if len(value) >= 16 and value[10:11] == "T" else value


def _plot(run_dir: Path, rel: str) -> dict[str, Any]:
    path = run_dir / rel
    try:
        size = path.stat().st_size
        if size <= MAX_EMBED_BYTES:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return {"name": rel, "src": f"data:image/png;base64,{data}", "embedded": True}
    except OSError:
        return {"name": rel, "src": None, "embedded": False}
    return {"name": rel, "src": rel, "embedded": False}


def render_html(
    run_dir: Path,
    summary: dict[str, Any],
    sample: list[dict[str, Any]],
    verdicts: list[dict[str, Any]],
) -> str:
    """The report page of a run.

    Args:
        run_dir: the run directory (plots are read from it).
        summary: what :func:`speed.report.summary.collect_summary` returned first.
        sample: synthesized examples to browse.
        verdicts: judge verdicts to browse.
    """
    try:
        import jinja2
    except ImportError as err:
        raise ImportError("the run report needs jinja2: pip install 'jinja2>=3.1'") from err
    from markupsafe import Markup

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, keep_trailing_newline=True)
    env.filters.update(
        fmt_int=_fmt_int,
        fmt_num=_fmt_num,
        fmt_duration=_fmt_duration,
        pretty=_pretty,
        when=_when,
        log=lambda n: math.log(n) if n and n > 0 else math.nan,
        revised=revision_changed,
    )
    template = env.from_string(_resource("report.html"))
    js = _resource("report.js")
    script_hash = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    evaluation = summary.get("eval")
    factor = 100.0 if evaluation and evaluation.get("scale") == "0-1" else 1.0
    plots = [_plot(run_dir, rel) for rel in summary.get("plots", [])]
    max_duration = max((s["duration_s"] or 0.0 for s in summary["stages"]), default=0.0)
    return template.render(
        s=summary,
        sample=sample,
        verdicts=verdicts,
        kinds=sorted({str(r.get("kind") or "unknown") for r in sample}),
        plots=plots,
        study_plot=_plot(run_dir, summary["study"]["plot"])
        if (summary.get("study") or {}).get("plot")
        else None,
        score_factor=factor,
        max_duration=max_duration or 1.0,
        css=Markup(_resource("report.css")),
        js=Markup(js),
        script_hash=script_hash,
    )
