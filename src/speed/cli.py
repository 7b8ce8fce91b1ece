"""The `speed` command line: parse, load the config, call the runner or a tool.

Every subcommand is a thin shell over a library function, so that what the CLI does can also be
done from Python. Heavy modules are imported inside the subcommand that needs them, which keeps
`speed status` instant.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speed.budget import BudgetExceeded
from speed.config import ConfigError, SpeedConfig, load_config
from speed.export import ExportError
from speed.io import DamagedFileError
from speed.ledger import LedgerError
from speed.llm.base import BackendError
from speed.runlock import RunLockedError
from speed.runner import StageError

logger = logging.getLogger("speed.cli")


def _load_run(run: str) -> tuple[SpeedConfig, Path]:
    run_dir = Path(run)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(
            f"'{run_dir}' is not a run directory (no config.yaml); pass the folder `speed run` made"
        )
    cfg = load_config(cfg_path, [f"run.dir={run_dir}"])
    return cfg, run_dir


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_run(args: argparse.Namespace) -> int:
    from speed.runner import Runner, setup_logging

    cfg = load_config(args.config, args.override)
    run_dir = Path(cfg.run.dir)
    runner = Runner(cfg)

    def start() -> None:
        # the log file lives in the run folder: started only once the run really starts
        setup_logging(run_dir, cfg.run.log_level)
        logger.info("run %s: %d stages", run_dir, len(runner.stages))

    statuses = runner.run(only=args.only, until=args.until, on_start=start)
    if not args.only and not args.until and all(s.state == "done" for s in statuses):
        report = _try_report(run_dir)
        if report:
            logger.info("report: %s", report)
    _print_status(runner.status(), run_dir, cfg)
    return 0


def _try_report(run_dir: Path) -> Path | None:
    """Build the report after a full run; a report failure must not fail the finished run."""
    try:
        from speed.report import build_report

        return build_report(run_dir)
    except Exception as err:  # the run's outputs are complete; say why the report is missing
        logger.warning("could not build the report (%s); retry with `speed report %s`", err, run_dir)
        return None


def cmd_report(args: argparse.Namespace) -> int:
    from speed.report import build_report

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise ConfigError(f"'{run_dir}' is not a folder; pass a run directory")
    if not _looks_like_a_run(run_dir):
        # the report writes report.html and summary.json: never into a folder that is not a run
        raise ConfigError(
            f"'{run_dir}' is not a run directory (no config.yaml, ledger.sqlite or finished stage); "
            "pass the folder `speed run` made"
        )
    print(build_report(run_dir))
    return 0


def _looks_like_a_run(run_dir: Path) -> bool:
    return (
        (run_dir / "config.yaml").is_file()
        or (run_dir / "ledger.sqlite").is_file()
        or any(run_dir.glob("*/manifest.json"))
    )


def cmd_status(args: argparse.Namespace) -> int:
    from speed.runner import Runner

    cfg, run_dir = _load_run(args.run)
    _print_status(Runner(cfg).status(), run_dir, cfg)
    return 0


def _print_status(statuses: list[Any], run_dir: Path, cfg: SpeedConfig) -> None:
    from speed.ledger import Ledger

    # a reader: never turn an empty or damaged ledger into a new one (create=False)
    path = run_dir / "ledger.sqlite"
    ledger = Ledger(path, create=False) if path.exists() and path.stat().st_size else None
    rows = [("stage", "state", "count", "drops", "teacher calls", "time (s)")]
    for s in statuses:
        m = s.manifest or {}
        stats = m.get("stats", {})
        drops = stats.get("drops", {})
        teacher = ledger.totals(stage=s.name, role="teacher").calls if ledger else 0
        rows.append(
            (
                s.name,
                s.state,
                str(stats.get("count", "")),
                str(sum(drops.values())) if isinstance(drops, dict) and drops else "",
                str(teacher) if teacher else "",
                f"{m['duration_s']:.1f}" if "duration_s" in m else "",
            )
        )
    print(f"run {run_dir}")
    _print_table(rows)
    sent = ledger.totals(role="teacher") if ledger else None
    if sent and any(sent.failed.values()):
        print(
            f"teacher connection: {sent.attempts} tries for {sent.calls + sent.errors} requests; "
            f"failed tries by cause: {_failed_words(sent.failed)}; {sent.errors} request(s) "
            "unanswered or dropped (asked again when their stage reruns)"
        )
    for s in statuses:
        if s.problem:
            print(f"{s.name}: damaged: {s.problem}; `speed run` redoes it")
    if path.exists() and not path.stat().st_size:
        print(f"the call ledger {path} is empty (0 bytes): teacher calls cannot be counted")
    if ledger:
        ledger.close()


def _failed_words(failed: dict[str, int]) -> str:
    """``429: 3, timeout: 1``: the causes that happened, with their counts."""
    return ", ".join(f"{cause}: {n}" for cause, n in failed.items() if n) or "none"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


def cmd_show(args: argparse.Namespace) -> int:
    from speed.io import read_json, read_rows

    run_dir = Path(args.run)
    folder = run_dir / args.stage
    if not (folder / "manifest.json").exists():
        done = sorted(p.parent.name for p in run_dir.glob("*/manifest.json"))
        raise ConfigError(
            f"stage '{args.stage}' has not finished in {run_dir}; finished: {', '.join(done) or 'none'}"
        )
    try:
        rows = read_rows(folder)
    except FileNotFoundError:
        print(json.dumps(read_json(folder / "manifest.json"), indent=2, ensure_ascii=False))
        return 0
    print(f"{args.stage}: {len(rows)} rows; showing {min(args.n, len(rows))}")
    for i, row in enumerate(rows[: args.n]):
        print(f"--- [{i}]")
        print(json.dumps(row, indent=2, ensure_ascii=False))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "ledger.sqlite").exists():
        raise ConfigError(f"'{run_dir}' has no ledger.sqlite; is it a run directory?")
    from speed.ledger import budget_summary, cost_summary

    c = cost_summary(run_dir)
    try:
        budget = budget_summary(run_dir)
    except ConfigError as err:  # the costs do not need the config; say why the budget is missing
        print(f"budget: not shown ({err})", file=sys.stderr)
        budget = None
    if args.json:
        print(json.dumps({**c, "budget": budget}, indent=2))
        return 0
    rows = [("stage", "teacher calls", "tokens in", "tokens out", "errors", "tries", "failed tries")]
    for stage, t in [*c["teacher_by_stage"].items(), ("total", c["teacher_total"])]:
        rows.append(
            (
                stage,
                str(t["calls"]),
                str(t["tokens_in"]),
                str(t["tokens_out"]),
                str(t["errors"]),
                str(t["attempts"]),
                str(sum(t["failed_attempts"].values())),
            )
        )
    _print_table(rows)
    t = c["teacher_total"]
    if any(t["failed_attempts"].values()):
        print(f"failed tries by cause: {_failed_words(t['failed_attempts'])}")
    spent = c["teacher_ledger_total"]
    if spent["calls"] != t["calls"]:
        print(f"the ledger holds {spent['calls']} teacher calls in all, superseded stage runs included")
    if c["final_examples"]:
        print(
            f"final examples: {c['final_examples']}; teacher calls per final example: "
            f"{c['teacher_calls_per_example']:.4f}"
        )
    else:
        print("final examples: none yet (synthesize has not finished)")
    if budget is not None:
        print()
        _print_budget(budget)
    return 0


def _print_budget(budget: dict[str, Any]) -> None:
    """The run's budget: limit, spent and left per limit (every teacher call of the ledger)."""
    rows = [("budget", "limit", "spent", "left")]
    for name in ("calls", "tokens_in", "tokens_out", "usd"):
        b = budget[name]
        if b["limit"] is None:
            continue
        fmt = (lambda v: f"{v:.4f}") if name == "usd" else str
        rows.append((f"teacher {name}", fmt(b["limit"]), fmt(b["spent"]), fmt(b["left"])))
    _print_table(rows)
    if budget["unpriced_models"]:
        print(f"not priced (run.budget.prices): {', '.join(budget['unpriced_models'])}")


def cmd_eval(args: argparse.Namespace) -> int:
    from speed.evaluation import evaluate_model, markdown_table

    result = evaluate_model(
        args.model,
        args.tasks.split(","),
        data_dir=args.data_dir,
        out_dir=args.out,
        instructions=args.instructions,
        batch_size=args.batch_size,
        baseline=args.baseline,
        threads=args.threads,
        precision=args.precision,
    )
    print(markdown_table(result, result.get("baseline")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from speed.export import export_run

    print(export_run(args.run, args.format, args.out, overwrite=args.overwrite, seed=args.seed))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from speed.llm.server import serve

    serve(
        args.model,
        port=args.port,
        threads=args.threads,
        n_ctx=args.n_ctx,
        file=args.file,
        engine=args.engine,
        parallel=args.parallel,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from speed.models import is_installed, list_packaged

    rows = [("name", "installed", "install with")]
    for m in list_packaged():
        rows.append((m.name, "yes" if is_installed(m.name) else "no", m.install_command))
    _print_table(rows)
    return 0


def cmd_scale_study(args: argparse.Namespace) -> int:
    from speed.io import read_rows
    from speed.runlock import RunLock
    from speed.scale import scale_study

    cfg, run_dir = _load_run(args.run)
    synth = run_dir / "synthesize"
    if not (synth / "manifest.json").exists():
        raise ConfigError(f"'{run_dir}' has no finished synthesize stage; run the pipeline first")
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes '{args.sizes}': give whole numbers, e.g. 1000,2000,4000") from None
    rows = read_rows(synth)
    too_big = [n for n in sizes if n > len(rows)]
    if too_big:
        raise ConfigError(f"--sizes {too_big} exceed the {len(rows)} training rows of {synth}")
    with RunLock(run_dir):  # it trains and writes into the run folder: one writer at a time
        study = scale_study(
            rows,
            sizes,
            cfg.models.embedder.model or "",
            args.tasks.split(",") if args.tasks else cfg.evaluate.tasks,
            args.out or run_dir / "scale_study",
            cfg.embed,
            data_dir=cfg.evaluate.data_dir,
            baseline=cfg.evaluate.baseline or cfg.models.embedder.model,
            seed=cfg.run.seed,
            threads=cfg.run.threads,
            precision=cfg.evaluate.precision,
        )
    fit = study["fit"]
    print(f"score = {fit['a']:.4f} + {fit['b']:.4f} ln(n)   (r2 {fit['r2']:.3f}, {fit['n_points']} points)")
    print(f"plot: {study['paths']['plot']}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from speed.runner import setup_logging
    from speed.study import run_study

    cfg = load_config(args.config, args.override)
    run_dir = Path(cfg.run.dir)

    def start() -> None:
        setup_logging(run_dir, cfg.run.log_level)
        logger.info("study %s: sources %s", run_dir, ", ".join(cfg.study.sources))

    table = run_study(cfg, on_start=start)
    print((run_dir / "study" / "table.md").read_text(encoding="utf-8"))
    print(f"table: {table['paths']['json']}")
    if table["paths"]["plot"]:
        print(f"plot: {table['paths']['plot']}")
    return 0


# --------------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from speed.doctor import default_config, diagnose, render

    path = args.config or default_config()
    cfg = load_config(path, args.override) if path else None
    print(f"speed doctor: {'config ' + str(path) if path else 'no config (machine and install only)'}")
    checks = diagnose(cfg, run_llama=not args.no_llama)
    print(render(checks))
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        print(f"\n{len(failed)} required check(s) failed: this config cannot run here until fixed.")
        return 1
    print("\neverything this config needs is here.")
    return 0


EXIT_CODES = (
    "exit status: 0 done; 2 a user error (config, files, a dead server); 3 stopped at run.budget "
    "(raise it and rerun to resume, nothing is sent twice); 130 Ctrl-C; 143 SIGTERM"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speed", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"speed {__import__('speed').__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    # -v also after the subcommand; SUPPRESS keeps a subcommand's default from hiding `speed -v run`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run", parents=[common], help="run the pipeline of a config (resumes; skips finished stages)"
    )
    r.epilog = EXIT_CODES
    r.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    r.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. -o seed.num_examples=200 (repeatable)",
    )
    g = r.add_mutually_exclusive_group()
    g.add_argument("--only", metavar="STAGE", help="run this stage only (its inputs must be done)")
    g.add_argument("--until", metavar="STAGE", help="run this stage and what it needs")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("stage", parents=[common], help="run one stage of a config (same as run --only)")
    st.epilog = EXIT_CODES
    st.add_argument("config")
    st.add_argument("only", metavar="STAGE")
    st.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    st.set_defaults(func=cmd_run, until=None)

    s = sub.add_parser(
        "status", parents=[common], help="stages done, stale or pending, with counts, teacher calls, time"
    )
    s.add_argument("run", help="run directory")
    s.set_defaults(func=cmd_status)

    sh = sub.add_parser("show", parents=[common], help="pretty-print a stage's examples")
    sh.add_argument("run")
    sh.add_argument("stage")
    sh.add_argument("-n", type=int, default=3, help="how many (default 3)")
    sh.set_defaults(func=cmd_show)

    c = sub.add_parser(
        "cost", parents=[common], help="teacher calls and tokens per stage, and per final example"
    )
    c.add_argument("run")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_cost)

    rp = sub.add_parser("report", parents=[common], help="(re)build report.html and summary.json of a run")
    rp.add_argument("run")
    rp.set_defaults(func=cmd_report)

    e = sub.add_parser(
        "eval", parents=[common], help="evaluate an embedding model on MTEB tasks read from local folders"
    )
    e.add_argument("model", help="model folder, packaged model or hub name")
    e.add_argument(
        "--tasks",
        default="STSBenchmark,SICK-R,Banking77Classification",
        help="comma-separated MTEB task names or suites (default: %(default)s)",
    )
    e.add_argument("--data-dir", help="evaluation data folder (default: $SPEED_EVAL_DIR)")
    e.add_argument("--out", help="folder for results.json and results.md")
    e.add_argument("--baseline", help="a model evaluated beside it")
    e.add_argument("--instructions", action="store_true", help="E5-style per-task query instructions")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="weights' dtype while encoding; bf16 is 2-3x faster on CPUs with bf16 units (default: fp32)",
    )
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", parents=[common], help="export a run's synthetic data for other trainers")
    x.add_argument("run")
    x.add_argument("--format", required=True, choices=["hf", "sentence-transformers", "flagembedding"])
    x.add_argument("out", help="output folder (flagembedding: a .jsonl file or a folder)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--seed", type=int, default=0, help="seed of flagembedding's sampled negatives")
    x.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve", parents=[common], help="serve a model with llama.cpp's OpenAI-compatible server (127.0.0.1)"
    )
    sv.add_argument("model", help="packaged model name (see `speed models`) or a GGUF path")
    sv.add_argument("--port", type=int, default=None)
    sv.add_argument("--threads", type=int, default=1)
    sv.add_argument("--n-ctx", type=int, default=4096)
    sv.add_argument("--file", help="GGUF file inside a folder")
    sv.add_argument(
        "--engine",
        choices=("auto", "native", "python"),
        default="auto",
        help="native: llama.cpp's llama-server (parallel slots); python: llama-cpp-python's; auto: native when built",
    )
    sv.add_argument(
        "--parallel", type=int, default=4, help="slots of the native server (requests decoded together)"
    )
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser(
        "doctor",
        parents=[common],
        help="what this machine and install have and lack for each role, with fixes (exit 1: cannot run)",
    )
    d.add_argument("config", nargs="?", help="config to check (default: configs/quickstart.yaml)")
    d.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--no-llama", action="store_true", help="skip running llama.cpp on a packaged model")
    d.set_defaults(func=cmd_doctor)

    m = sub.add_parser("models", parents=[common], help="list the models that install from PyPI packages")
    m.set_defaults(func=cmd_models)

    sc = sub.add_parser(
        "scale-study", parents=[common], help="train on nested subsets, evaluate, fit score = a + b ln(n)"
    )
    sc.add_argument("run")
    sc.add_argument("--sizes", required=True, help="comma-separated subset sizes, e.g. 1000,2000,4000")
    sc.add_argument("--tasks", help="comma-separated tasks (default: evaluate.tasks of the run)")
    sc.add_argument("--out", help="output folder (default: RUN/scale_study)")
    sc.set_defaults(func=cmd_scale_study)

    sy = sub.add_parser(
        "study",
        parents=[common],
        help="the ablation: equal-size data from each source (teacher, untuned, junior, senior, +revisor), "
        "embedders trained on each over seeds, scores with 95%% intervals (resumes)",
    )
    sy.epilog = EXIT_CODES
    sy.add_argument("config", help="YAML config with a study section, e.g. configs/study.yaml")
    sy.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. -o study.num_examples=40 (repeatable)")  # fmt: skip
    sy.set_defaults(func=cmd_study)
    return p


def _os_error_message(err: OSError) -> str:
    """Words for an operating-system error: the file, what happened, and the fix."""
    where = f" '{err.filename}'" if err.filename else ""
    what = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "the disk is full: free space (or move run.dir elsewhere) and rerun; finished work resumes"
    elif err.errno == errno.EFBIG:
        fix = "a file-size limit was reached (ulimit -f): raise it and rerun; finished work resumes"
    elif isinstance(err, PermissionError) or err.errno == errno.EROFS:
        fix = "no permission to write there: make it writable (chmod u+w) or choose another run.dir"
    elif isinstance(err, NotADirectoryError):
        fix = "a file stands where a folder is needed: move the file away or choose another run.dir"
    elif isinstance(err, IsADirectoryError):
        fix = "a folder stands where a file is needed: move it away"
    elif isinstance(err, FileNotFoundError):
        fix = "it does not exist: check the path; if it was part of a finished stage, rerun to redo it"
    else:
        fix = "check the file and the disk, then rerun"
    return f"{what}:{where}: {fix}" if where else f"{what}: {fix}"


#: errors that are the user's to fix (a config, a run folder, a dead server, a damaged file, a
#: busy run): shown as one line of words, exit 2; -v adds the traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    StageError,
    ExportError,
    BackendError,
    LedgerError,
    DamagedFileError,
    RunLockedError,
)


#: exit code of a run stopped by run.budget (2: any other user error; 130: Ctrl-C; 143: SIGTERM)
EXIT_BUDGET = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as an interrupt: every ``except KeyboardInterrupt`` and
    ``finally`` on the way (answers already received go to the ledger, servers stop, the run lock is
    released) runs as for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # a scheduler's or a container's stop (SIGTERM) gets the same clean stop as Ctrl-C
        signal.signal(signal.SIGTERM, _raise_terminated)
    verbose = bool(getattr(args, "verbose", False))
    if not logging.getLogger("speed").handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S"
        )
    # httpx logs every request at INFO: far too loud for a run of thousands of calls
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except BudgetExceeded as err:
        # a stop the user asked for, not a failure: its own exit code, so scripts can tell
        if verbose:
            traceback.print_exc()
        print(f"speed: error: {err}", file=sys.stderr)
        return EXIT_BUDGET
    except USER_ERRORS as err:
        # a dead or crashed model server is the user's to fix, not a bug: words, not a traceback
        return _fail(str(err), verbose)
    except OSError as err:
        # permissions, full disks, file-size limits, a file where a folder belongs: the user's too
        return _fail(_os_error_message(err), verbose)
    except Terminated:
        print("speed: terminated (SIGTERM); answers received so far are in the ledger", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("speed: interrupted", file=sys.stderr)
        return 130


def _fail(message: str, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"speed: error: {message}", file=sys.stderr)
    return 2


def entry() -> None:
    """The ``speed`` command: :func:`main`, then exit with its code.

    After an interrupt (130, 143) the answers received are in the ledger, servers are stopped and the
    run lock is free; a request still waiting on a server that does not answer (an API's timeout is
    minutes) holds a worker thread that the interpreter would join before exiting, so the process
    leaves without waiting for it.
    """
    code = main()
    stuck = [
        t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()
    ]
    if code in (130, 143) and stuck:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
