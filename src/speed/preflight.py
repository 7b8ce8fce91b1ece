"""Preflight: everything a config names is checked before the first teacher call.

A run can spend hours (and money) before it reaches the stage that needs a missing model, an
evaluation folder or a writable disk. The runner calls :func:`preflight` before any stage runs, new
run or resumed one alike, and refuses to start while a required check fails; ``speed doctor`` prints
the same checks, from the same functions, so the two never disagree.

Design choices:
- A check is plain data (:class:`Check`): a name, whether it holds, what was seen, the fix. Failures
  are gathered, not raised one by one, so one refusal lists every problem of the config at once.
- Every check names the config key it comes from (``models.teacher.model``, ``evaluate.tasks``,
  ``run.dir``) and the fix.
- Checks only look: nothing is created, downloaded, joined or converted, so a refused command leaves
  no trace on disk, and a packaged model's presence is its packages' presence (joining a split GGUF
  happens when the backend starts).
- Only what the stages about to run need is checked: a resumed run whose brainstorm is done does not
  need ``topics.source`` any more.
- Damaged run state that cannot be redone is refused here: a ledger that SQLite cannot read, or one
  that is empty although finished work says calls were made (taking it for a new ledger would send
  and pay for every call again).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from speed.config import ConfigError, LocalSpec

if TYPE_CHECKING:
    from speed.config import ModelSpec, SpeedConfig
    from speed.stage import Stage

#: What each backend needs installed (import names), and the extra that brings it.
BACKEND_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "llamacpp": (("llama_cpp",), "llamacpp"),
    "llamacpp_server": (("llama_cpp", "uvicorn", "fastapi", "sse_starlette"), "llamacpp"),
    "hf": (("torch", "transformers", "peft"), "train"),
    "vllm": (("vllm",), "vllm"),
    "openai": (("httpx",), ""),
}


class PreflightError(ConfigError):
    """A config or run folder that cannot run here; the message lists every failed check."""


@dataclasses.dataclass
class Check:
    """One fact about the machine, the install, the config or the run folder.

    Attributes:
        name: what was checked (a config key where there is one).
        ok: whether it holds.
        detail: what was seen.
        fix: what to do when it does not hold ("" when it does).
        roles: the roles (or stages) that need it.
        required: the config cannot run without it.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    roles: tuple[str, ...] = ()
    required: bool = False


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The import names among ``modules`` that are not installed (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------------------------
# models


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(name: str, file: str | None) -> bool:
    """Whether the hub client has ``name`` (its ``file``, else its config.json) in its local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in [file] if file else ["config.json", "adapter_config.json"]:
        found = try_to_load_from_cache(name, filename)
        if isinstance(found, str):
            return True
    return False


def check_model(role: str, spec: ModelSpec) -> Check | None:
    """Whether ``models.<role>.model`` names weights this machine can load, without loading them.

    A packaged name must have its packages installed; a path must exist; any other name is a hub
    name, allowed only when the hub is reachable (``HF_HUB_OFFLINE`` unset) or the hub cache holds it.
    API backends (``openai``) name a model of the server, which only the server can check.

    Returns:
        The check, or None where there is nothing to check (no model: weights trained in the run;
        a remote backend).
    """
    from speed.models import PACKAGED, is_installed, packaged
    from speed.suggest import did_you_mean

    name = spec.model
    if not name or not isinstance(spec, LocalSpec):
        return None
    key = f"models.{role}.model"
    pm = packaged(name)
    if pm is not None:
        ok = is_installed(pm.name)
        detail = f"packaged model {pm.name} " + ("installed" if ok else "not installed")
        return Check(key, ok, detail, "" if ok else pm.install_command, (role,), True)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        ok = path.exists()
        return Check(
            key,
            ok,
            f"local path {path}" if ok else f"path '{name}' does not exist",
            ""
            if ok
            else f"point {key} at an existing file or folder, or name a packaged model (`speed models`)",
            (role,),
            True,
        )
    file = getattr(spec, "file", None)
    near = did_you_mean(name, PACKAGED, what="the packaged model ")
    if spec.backend in ("llamacpp", "llamacpp_server") and "/" not in name:
        return Check(
            key,
            False,
            f"'{name}' is not a packaged model, a local GGUF or a hub repo.{near}",
            f"set {key} to a packaged model (`speed models`) or a GGUF path",
            (role,),
            True,
        )
    if _offline() and not _in_hub_cache(name, file):
        return Check(
            key,
            False,
            f"'{name}' is a hub name, but HF_HUB_OFFLINE is set and the hub cache does not hold it.{near}",
            f"set {key} to a packaged model (`speed models`) or a local path, or unset HF_HUB_OFFLINE",
            (role,),
            True,
        )
    return Check(key, True, f"hub model {name}", roles=(role,), required=True)


def check_backends(config: SpeedConfig, roles: Sequence[str] | None = None) -> list[Check]:
    """Each role's backend packages, its model and its adapter (``roles``: all by default)."""
    from speed.config import ROLES

    checks = []
    for role in roles if roles is not None else ROLES:
        spec = getattr(config.models, role)
        modules, extra = BACKEND_MODULES.get(spec.backend, ((), ""))
        missing = missing_modules(modules)
        checks.append(
            Check(
                f"{role}: backend {spec.backend}",
                not missing,
                "installed" if not missing else f"missing {', '.join(missing)}",
                "" if not missing else f"pip install 'speed[{extra}]' (or make setup)",
                (role,),
                required=True,
            )
        )
        model = check_model(role, spec)
        if model is not None:
            checks.append(model)
        adapter = getattr(spec, "adapter", None)
        if adapter:
            ok = Path(adapter).expanduser().is_dir()
            checks.append(
                Check(
                    f"models.{role}.adapter",
                    ok,
                    str(adapter) if ok else f"adapter folder '{adapter}' does not exist",
                    "" if ok else f"point models.{role}.adapter at a PEFT adapter folder, or remove it",
                    (role,),
                    True,
                )
            )
    return checks


# --------------------------------------------------------------------------------------------
# evaluation data and files


def check_eval(config: SpeedConfig | None) -> list[Check]:
    """The evaluation data folder and each configured task's folder in it."""
    from speed.evaluation.registry import TASKS, UnknownTaskError, resolve_task_names
    from speed.paths import EvalDataNotFoundError, eval_data_dir

    configured = config.evaluate.data_dir if config is not None else None
    try:
        root = eval_data_dir(configured)
    except EvalDataNotFoundError as err:
        return [Check("evaluation data", False, str(err), "export SPEED_EVAL_DIR=/path/to/shared/eval",
                      ("evaluate",), True)]  # fmt: skip
    checks = [Check("evaluation data", True, str(root), roles=("evaluate",))]
    try:
        names = resolve_task_names(config.evaluate.tasks) if config is not None else []
    except UnknownTaskError as err:
        return [*checks, Check("evaluate.tasks", False, str(err), "fix the task name", ("evaluate",), True)]
    for name in names:
        folder = root / TASKS[name].folder
        ok = folder.is_dir()
        checks.append(
            Check(
                f"eval task {name}",
                ok,
                str(folder) if ok else f"{folder} is missing",
                "" if ok else f"put the task's files in {folder} (layout: see {root}/README.md)",
                ("evaluate",),
                required=True,
            )
        )
    return checks


def check_files(config: SpeedConfig, stages: Sequence[str]) -> list[Check]:
    """Files the config names for the stages about to run."""
    checks = []
    source = config.topics.source
    if "brainstorm" in stages and source != "builtin":
        ok = Path(source).expanduser().is_file()
        checks.append(
            Check(
                "topics.source",
                ok,
                source if ok else f"topic file '{source}' does not exist",
                "" if ok else "point topics.source at a text file of topics, or set it to builtin",
                ("brainstorm",),
                True,
            )
        )
    if "embed" in stages:
        for i, extra in enumerate(config.embed.extra_data):
            ok = Path(extra).expanduser().is_file()
            checks.append(
                Check(
                    f"embed.extra_data[{i}]",
                    ok,
                    extra if ok else f"labelled data file '{extra}' does not exist",
                    "" if ok else "fix the path, or remove it from embed.extra_data",
                    ("embed",),
                    True,
                )
            )
    return checks


# --------------------------------------------------------------------------------------------
# the run folder


def check_run_dir(run_dir: Path) -> Check:
    """Whether the run folder is (or can be made) a writable folder, looking only."""
    name = "run.dir"
    if run_dir.exists() and not run_dir.is_dir():
        return Check(name, False, f"'{run_dir}' is a file, not a folder",
                     "choose another run.dir, or move the file away", required=True)  # fmt: skip
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return Check(name, False, f"'{probe}' (on the way to '{run_dir}') is a file, not a folder",
                     "choose another run.dir", required=True)  # fmt: skip
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the run folder" if probe == run_dir else f"'{probe}', where the run folder would be made,"
        return Check(name, False, f"{what} is not writable ('{probe}')",
                     f"chmod u+w '{probe}', or choose another run.dir", required=True)  # fmt: skip
    ledger = run_dir / "ledger.sqlite"
    if ledger.exists() and not os.access(ledger, os.R_OK | os.W_OK):
        return Check(name, False, f"the call ledger '{ledger}' is not writable",
                     f"chmod u+rw '{ledger}'", required=True)  # fmt: skip
    return Check(name, True, str(run_dir), required=True)


def recorded_calls(run_dir: Path) -> dict[str, int]:
    """Calls that finished or interrupted stages say they made, by the file that says so."""
    found: dict[str, int] = {}
    for manifest in [*run_dir.glob("*/manifest.json"), *run_dir.glob(".work/*/manifest.json")]:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            calls = sum(int(t.get("calls", 0)) for t in data.get("calls", {}).values())
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # a damaged manifest is the runner's to redo; it proves nothing here
        if calls:
            found[str(manifest)] = calls
    return found


def check_ledger(run_dir: Path) -> Check:
    """Whether the run's ledger can be read, and is not an empty stand-in for one that held calls."""
    path = run_dir / "ledger.sqlite"
    name = "ledger"
    if not path.exists():
        return Check(name, True, "no ledger yet (made when the first call is recorded)")
    move = f"mv '{path}' '{path}.damaged'"
    try:
        # a WAL database opened even read-only makes its -wal and -shm files; where no writer has
        # them open (no -wal file), read the file as immutable so that a refused run leaves no trace
        wal = path.with_name(path.name + "-wal").exists()
        conn = sqlite3.connect(f"file:{path}?mode=ro" + ("" if wal else "&immutable=1"), uri=True)
        try:
            has_calls = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calls'"
            ).fetchone()
            result = conn.execute("PRAGMA quick_check").fetchone()[0] if has_calls else "ok"
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        return Check(name, False, f"the call ledger '{path}' is damaged ({err})",
                     f"restore it from a backup, or {move} and rerun (unfinished stages send their "
                     "calls again)", required=True)  # fmt: skip
    if result != "ok":
        return Check(name, False, f"the call ledger '{path}' is damaged (integrity check: {result})",
                     f"restore it from a backup, or {move} and rerun", required=True)  # fmt: skip
    if not has_calls:
        made = recorded_calls(run_dir)
        if made:
            where = ", ".join(f"{Path(m).parent.name}: {n}" for m, n in made.items())
            return Check(
                name,
                False,
                f"the call ledger '{path}' is empty ({path.stat().st_size} bytes, no call table), but "
                f"stage manifests record {sum(made.values())} calls ({where}); as a new ledger every "
                "unfinished call would be sent and paid for again",
                f"restore the ledger from a backup; or, to start a new ledger knowingly, delete it "
                f"(rm '{path}')",
                required=True,
            )
    return Check(name, True, str(path))


# --------------------------------------------------------------------------------------------
# the whole preflight


def run_checks(config: SpeedConfig, stages: Sequence[type[Stage]], run_dir: Path) -> list[Check]:
    """Every check for running ``stages`` (the ones about to run) of ``config`` in ``run_dir``."""
    names = [cls.name for cls in stages]
    roles = list(dict.fromkeys(role for cls in stages for role in cls.roles))
    checks = [check_run_dir(run_dir)]
    if run_dir.is_dir():
        checks.append(check_ledger(run_dir))
    checks += check_backends(config, roles)
    checks += check_files(config, names)
    if "evaluate" in names:
        checks += check_eval(config)
    elif "synthesize" in names and config.synthesize.decontaminate:
        # only decontamination needs the data here: turning it off is a fix too
        for check in check_eval(config):
            if not check.ok:
                check.fix += "; or set synthesize.decontaminate: false to keep eval-like examples"
            checks.append(check)
    return checks


def preflight(config: SpeedConfig, stages: Sequence[type[Stage]], run_dir: Path) -> list[Check]:
    """Refuse to start ``stages`` while anything they need is missing; return the checks made.

    Raises:
        PreflightError: the pipeline is empty, or a required check failed; the message lists each
            failure with its config key, what was seen and the fix.
    """
    if config.pipeline.stages == []:
        raise PreflightError(
            "pipeline.stages is empty: nothing to run. List the stages to run, or remove the key to "
            "run the whole pipeline"
        )
    checks = run_checks(config, stages, run_dir)
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        lines = [f"  {c.name}: {c.detail}" + (f"\n    fix: {c.fix}" if c.fix else "") for c in failed]
        raise PreflightError(
            f"{len(failed)} check(s) failed before the first call; nothing was run or written:\n"
            + "\n".join(lines)
        )
    return checks
