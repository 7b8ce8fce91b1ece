"""`speed doctor`: what this machine and install have and lack, role by role, with the fix for each.

Design choices:
- Checks are plain data (:class:`Check`): a name, the roles that need it, whether it holds, what was
  seen, and the fix. The CLI prints them; tests and other tools read them. The model, backend and
  evaluation-data checks are the runner's preflight ones (:mod:`speed.preflight`): one piece of
  code, so doctor and a refused run never disagree.
- A check is *required* when the config given (by default configs/quickstart.yaml, else the
  quickstart's own roles) cannot run without it; the exit code is non-zero when a required check
  fails. Everything else (CUDA, vLLM, Ray, Chromium) is reported for the scale-out and test paths.
- Nothing here downloads or installs; the llama.cpp check really runs the packaged model's kernels in
  a child process (:func:`speed.hardware.check_llama_runs`), since a wrong build only shows itself
  as an ``Illegal instruction`` at the first matrix product.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from speed import hardware, preflight
from speed.precision import cpu_has_bf16
from speed.preflight import BACKEND_MODULES, Check, check_eval
from speed.preflight import missing_modules as _missing

if TYPE_CHECKING:
    from speed.config import SpeedConfig

# re-exported: they were defined here before the preflight shared them
__all__ = ["BACKEND_MODULES", "Check", "check_backends", "check_eval", "diagnose", "render"]

TRAINING_MODULES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "sentence_transformers")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_cpu() -> list[Check]:
    """The CPU, its vector units, and whether the installed llama.cpp was built for it."""
    cpu = hardware.cpu_info()
    feats = cpu.features()
    have = " ".join(n for n, ok in feats.items() if ok) or "-"
    lack = " ".join(n for n, ok in feats.items() if not ok) or "-"
    checks = [Check("CPU", True, f"{cpu.model} ({cpu.arch}, {cpu.level()}); has: {have}; lacks: {lack}")]
    marker = hardware.installed_build()
    if _missing(("llama_cpp",)):
        return checks
    here = hardware.build_key(cpu, (marker or {}).get("extra_cmake_args", ""))
    if marker is None:
        checks.append(
            Check(
                "llama.cpp build",
                True,
                f"llama-cpp-python {_version('llama-cpp-python')} was not built by `make setup` "
                "(no build marker): its CPU target is unknown",
                fix=f"if it crashes with Illegal instruction: {hardware.rebuild_command()}",
                roles=("teacher",),
            )
        )
    elif marker.get("key") != here:
        checks.append(
            Check(
                "llama.cpp build",
                False,
                f"built for another CPU ({marker.get('cpu')}, key {marker.get('key')}; this one: {here})",
                fix=hardware.rebuild_command(),
                roles=("teacher",),
                required=True,
            )
        )
    else:
        checks.append(
            Check(
                "llama.cpp build",
                True,
                f"llama-cpp-python {marker.get('version')} built for this CPU ({here}; {marker.get('cmake_args')})",
                roles=("teacher",),
            )
        )
    server = hardware.find_server((marker or {}).get("extra_cmake_args", ""))
    checks.append(
        Check(
            "llama-server (native engine)",
            server is not None,
            f"built for this CPU: {server}"
            if server
            else "not built: backend llamacpp_server falls back to llama-cpp-python's one-request server",
            fix="" if server else "PYTHONPATH=src .venv/bin/python -m speed.hardware build-server",
            roles=("teacher", "junior", "senior", "revisor"),
        )
    )
    return checks


def check_llama_runs(
    model: str = "qwen2.5-coder-0.5b-instruct", roles: tuple[str, ...] = ("teacher",)
) -> Check:
    """Whether llama.cpp really runs a packaged GGUF here (in a child process: a crash stays there)."""
    from speed.models import ModelNotFoundError, resolve_gguf

    if _missing(("llama_cpp",)):
        return Check("llama.cpp runs", False, "llama-cpp-python is not installed", "make setup", roles, True)
    try:
        gguf = resolve_gguf(model)
    except (ModelNotFoundError, OSError, ValueError) as err:
        return Check("llama.cpp runs", False, f"no GGUF to try: {err}", "make setup", roles, True)
    try:
        ran = hardware.check_llama_runs(gguf)
    except hardware.LlamaCrash as err:
        return Check("llama.cpp runs", False, str(err), hardware.rebuild_command(), roles, True)
    if not ran:
        return Check(
            "llama.cpp runs", False, f"loading {gguf.name} failed (not a signal)", "make setup", roles, True
        )
    return Check("llama.cpp runs", True, f"{gguf.name} loaded and evaluated in a child process", "", roles)


def check_backends(config: SpeedConfig | None) -> list[Check]:
    """Each role's backend, with the packages it needs and its model (the runner's preflight checks)."""
    return preflight.check_backends(config) if config is not None else []


def check_torch() -> list[Check]:
    """torch, bf16 on this CPU, CUDA."""
    roles = ("junior", "senior", "revisor", "embedder")
    if _missing(("torch",)):
        return [Check("torch", False, "not installed", "make setup (torch==2.13.0, CPU build)", roles, True)]
    import torch

    bf16 = cpu_has_bf16()
    checks = [
        Check("torch", True, f"torch {torch.__version__}", roles=roles),
        Check(
            "bf16 on the CPU",
            bf16,
            "bf16 matrix units (AVX512-BF16 or AMX): precision auto trains and encodes in bf16"
            if bf16
            else "no bf16 matrix units: precision auto stays fp32 (bf16 would be emulated, slower)",
            roles=roles,
        ),
    ]
    cuda = torch.cuda.is_available()
    detail = (
        f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
        if cuda
        else "no CUDA device"
    )
    checks.append(Check("CUDA", cuda, detail, "" if cuda else "GPU runs only: TORCH_SPEC=torch make setup"))
    missing = _missing(TRAINING_MODULES)
    checks.append(
        Check(
            "training stack",
            not missing,
            "TRL, PEFT, transformers, datasets, sentence-transformers"
            if not missing
            else f"missing {missing}",
            "" if not missing else "pip install 'speed[train]' (or make setup)",
            roles,
            required=True,
        )
    )
    return checks


def check_optional() -> list[Check]:
    """vLLM, Ray, Chromium: the scale-out and test paths."""
    out = []
    for name, module, fix in (
        ("vLLM", "vllm", "GPU machines: pip install 'speed[vllm]'"),
        ("Ray", "ray", "pip install 'speed[ray]'"),
        ("mteb", "mteb", "pip install 'speed[train]'"),
    ):
        ver = _version(module)
        out.append(Check(name, ver is not None, ver or "not installed", "" if ver else fix))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    out.append(
        Check(
            "Chromium",
            chromium is not None,
            chromium or "not found (only the report's browser test needs it)",
            "" if chromium else "apt-get install chromium chromium-driver",
        )
    )
    return out


def diagnose(config: SpeedConfig | None, *, run_llama: bool = True) -> list[Check]:
    """Every check for ``config`` (None: the machine and install only)."""
    from speed.config import ROLES

    checks = check_cpu()
    specs = [(role, getattr(config.models, role)) for role in ROLES] if config is not None else []
    llama_roles = [(role, spec) for role, spec in specs if spec.backend in ("llamacpp", "llamacpp_server")]
    if run_llama and (llama_roles or config is None) and not _missing(("llama_cpp",)):
        role, spec = llama_roles[0] if llama_roles else ("teacher", None)
        model = (spec.model if spec is not None else None) or "qwen2.5-coder-0.5b-instruct"
        checks.append(check_llama_runs(model, (role,)))
    checks += check_backends(config)
    checks += check_torch()
    checks += check_eval(config)
    checks += check_optional()
    return checks


def default_config() -> Path | None:
    """configs/quickstart.yaml of the working directory or of the source checkout, if there is one."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / "configs" / "quickstart.yaml"
        if path.is_file():
            return path
    return None


def render(checks: list[Check]) -> str:
    """The checks as a table a person reads: mark, name, what was seen, the fix."""
    lines = []
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "--  ")
        lines.append(f"{mark} {c.name.ljust(width)}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"     {' ' * width}  fix: {c.fix}")
    return "\n".join(lines)
