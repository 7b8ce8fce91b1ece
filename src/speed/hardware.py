"""What this machine's CPU can run, and a llama.cpp build made for it.

llama.cpp (ggml) compiles its matrix kernels for one instruction set. A build for a CPU with more
than this one has dies of ``SIGILL`` (``Illegal instruction``) at the first kernel it runs; a build
for less leaves speed on the table. Design choices:

- **Build for the machine that builds.** ggml's ``-march=native`` (``GGML_NATIVE=ON``), with the AMX
  tile kernels switched off (``-mno-amx-*``): on CPUs whose kernel does not enable AMX tiles they
  crash with ``Illegal instruction`` (MODELS.md). On ARM64, ``-mcpu=native``.
- **Not "all CPU variants".** ggml can build one CPU library per x86 level and pick at run time
  (``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``), but llama-cpp-python's CMakeLists installs only
  the plain ``ggml-cpu`` library, not the ``ggml-cpu-<variant>`` ones, so such a wheel loads no CPU
  backend at all; it would also pick the AMX variant on an AMX CPU.
- **A wheel is reused only on the same CPU target.** pip keys its cache of built wheels on the source
  archive alone, so a wheel built on an AVX-512 machine would be handed to an AVX2-only one. speed
  builds with pip's wheel cache off and keeps the wheel in a folder named after a hash of what the
  compiler resolves ``-march=native`` to on this machine (every ISA flag and cache size) plus the
  CMake arguments and the version: another CPU gets another folder, hence its own build.
- **llama.cpp's own server from the same sources.** ``build-server`` compiles ``llama-server``
  (continuous batching over ``--parallel`` slots, JSON-schema grammars, LoRA adapters) from the
  llama.cpp that llama-cpp-python's source archive vendors, with the same build key, native flags and
  AMX-off flags as the wheel, so the binary and the Python bindings agree on kernels, GGUF versions
  and grammar code. Only the ``llama-server`` target is built, statically linked (no shared libraries
  to find at run time), without curl, OpenSSL or the web UI (no download at build time; the server
  only ever listens on 127.0.0.1). It is built in a temporary folder and moved to
  ``<wheel cache>/<build key>/bin/llama-server`` only when the build succeeded, so a killed build
  leaves nothing that a later run would take as done.
- This module uses the standard library only: ``make setup`` runs it before anything else is installed
  (``PYTHONPATH=src python -m speed.hardware build-llama``, then ``build-server``), and ``speed doctor``
  reads the same facts.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

#: The llama-cpp-python release speed builds; its sources also hold the server and converters.
LLAMA_CPP_VERSION = "0.3.36"

#: ISA extensions that decide which ggml kernels can run, as /proc/cpuinfo names them.
X86_FEATURES = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "bmi2",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")

#: Compiler flags that keep AMX kernels out of a native x86 build (explicit -mno-* wins over -march).
NO_AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")

BUILD_MARKER = "speed-llama-build.json"

#: CMake options of the ``llama-server`` build: one static binary, nothing downloaded while building.
SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The CPU as the operating system reports it."""

    arch: str
    model: str
    flags: frozenset[str]

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "AMD64", "i686")

    @property
    def is_arm(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    def features(self) -> dict[str, bool]:
        """The ISA extensions that matter to ggml, each with whether this CPU has it."""
        names = X86_FEATURES if self.is_x86 else ARM_FEATURES if self.is_arm else ()
        return {name: name in self.flags for name in names}

    def label(self) -> str:
        """The model name with the vector units that decide speed, for benchmark figures:
        ``AMD EPYC 9B14 (avx512, bf16, no amx)``."""
        units = [self.level()]
        if self.is_x86:
            units.append("bf16" if "avx512_bf16" in self.flags else "no bf16")
            if units[0] != "amx":
                units.append("no amx")
        return f"{self.model} ({', '.join(units)})"

    def level(self) -> str:
        """A short name of the widest vector unit: ``avx512``, ``avx2``, ``sve``, ``neon`` ..."""
        if self.is_x86:
            for name in ("amx_int8", "avx512f", "avx2", "avx", "sse4_2"):
                if name in self.flags:
                    return name.replace("_int8", "").replace("512f", "512")
            return "x86-64"
        if self.is_arm:
            return "sve" if "sve" in self.flags else "neon"
        return self.arch


def cpu_info() -> CpuInfo:
    """Read the CPU's model name and feature flags (Linux /proc/cpuinfo, macOS sysctl)."""
    arch = platform.machine()
    model = platform.processor() or arch
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if not text and sys.platform == "darwin":  # pragma: no cover - macOS only
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        model = out.strip() or model
        flags = {f.lower().replace(".", "_") for f in _run(["sysctl", "-n", "machdep.cpu.features"]).split()}
        if arch == "arm64":
            flags |= {"asimd", "asimddp"}
    return CpuInfo(arch=arch, model=model, flags=frozenset(flags))


def _run(cmd: list[str], stdin: str = "") -> str:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def compiler() -> str:
    """The C compiler CMake will use: ``$CC``, else ``cc``."""
    return os.environ.get("CC") or "cc"


def native_flags(cpu: CpuInfo | None = None, cc: str | None = None) -> list[str]:
    """The flags a native build adds on this machine's compiler (AMX excluded on x86)."""
    cpu = cpu or cpu_info()
    if cpu.is_x86:
        flags = ["-march=native"]
        if _compiler_accepts(list(NO_AMX_FLAGS), cc):
            flags += list(NO_AMX_FLAGS)
        return flags
    if cpu.is_arm:
        return ["-mcpu=native"]
    return []


def _compiler_accepts(flags: list[str], cc: str | None = None) -> bool:
    try:
        done = subprocess.run(
            [cc or compiler(), *flags, "-E", "-"], input="", capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def native_target(cpu: CpuInfo | None = None, cc: str | None = None) -> str:
    """What the compiler resolves a native build to here: ``-march=znver4 -mavx512f ... --param ...``.

    This is the identity of a native build: two machines with the same string get the same code.
    Falls back to the CPU's flag list when no compiler answers.
    """
    cpu = cpu or cpu_info()
    out = _run([cc or compiler(), *native_flags(cpu, cc), "-E", "-v", "-"])
    for line in out.splitlines():
        if "cc1" in line and " -" in line:
            tokens = shlex.split(line)
            kept = [t for t in tokens if t.startswith(("-m", "--param", "-mcpu", "-mtune")) or "=" in t]
            if kept:
                return " ".join(kept)
    return f"{cpu.arch} " + " ".join(sorted(cpu.flags))


def llama_cmake_args(cpu: CpuInfo | None = None, extra: str = "") -> str:
    """CMAKE_ARGS for llama-cpp-python: a native build, AMX kernels off, plus the user's ``extra``."""
    cpu = cpu or cpu_info()
    args = ["-DGGML_NATIVE=ON"]
    if cpu.is_x86:
        args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    if extra.strip():
        args += shlex.split(extra)
    return shlex.join(args)


def build_key(cpu: CpuInfo | None = None, extra_cmake: str = "", version: str = LLAMA_CPP_VERSION) -> str:
    """The folder name of this machine's llama.cpp wheel: arch, level and a hash of the build's target."""
    cpu = cpu or cpu_info()
    ident = "\n".join([version, native_target(cpu), llama_cmake_args(cpu, extra_cmake)])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return f"{cpu.arch}-{cpu.level()}-{digest}"


def wheel_cache() -> Path:
    """Where built llama.cpp wheels are kept: ``$SPEED_WHEEL_CACHE`` or ``~/.cache/speed/wheels``."""
    if os.environ.get("SPEED_WHEEL_CACHE"):
        return Path(os.environ["SPEED_WHEEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "speed" / "wheels"


def installed_build(prefix: str | Path | None = None) -> dict[str, str] | None:
    """The marker ``build-llama`` left in the environment: what the installed llama.cpp was built for."""
    path = Path(prefix or sys.prefix) / BUILD_MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rebuild_command() -> str:
    """The command that rebuilds llama.cpp for this machine (from the repository's root)."""
    return "make llama-rebuild   (or: PYTHONPATH=src .venv/bin/python -m speed.hardware build-llama --force)"


def describe_signal_death(returncode: int | None, what: str) -> str | None:
    """Words for a process killed by a signal (``returncode`` < 0), or None when it was not.

    SIGILL gets the whole story: the build does not match this CPU, what the CPU has, how to rebuild.
    """
    if returncode is None or returncode >= 0:
        return None
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    text = f"{what} was killed by {name} (signal {signum})"
    if signum == signal.SIGILL:
        return f"{text}: {sigill_advice()}"
    if signum == signal.SIGKILL:
        return f"{text}; out of memory is the usual cause (see `dmesg`), or another process killed it"
    if signum == signal.SIGSEGV:
        return f"{text}: a crash inside llama.cpp (a damaged model file or a llama.cpp bug)"
    return text


def sigill_advice(cpu: CpuInfo | None = None) -> str:
    """Why ``Illegal instruction`` happens and how to fix it, with this CPU's features."""
    cpu = cpu or cpu_info()
    have = [name for name, ok in cpu.features().items() if ok]
    lack = [name for name, ok in cpu.features().items() if not ok]
    marker = installed_build()
    built_for = ""
    if marker:
        here = build_key(cpu, marker.get("extra_cmake_args", ""), marker.get("version", LLAMA_CPP_VERSION))
        if marker.get("key") != here:
            built_for = f" The installed build was made on another CPU ({marker.get('cpu', '?')}, {marker.get('key')})."
    return (
        "an instruction this CPU does not have (Illegal instruction): the installed llama.cpp build "
        f"does not match this CPU ({cpu.model}; has {' '.join(have) or 'none of the listed'}; "
        f"lacks {' '.join(lack) or 'nothing listed'}).{built_for} Rebuild it for this machine: "
        f"{rebuild_command()}; `speed doctor` shows what this machine and install have."
    )


def build_llama_wheel(
    pip: list[str], *, force: bool = False, extra_cmake: str = "", log=print
) -> tuple[Path, bool]:
    """Build (or find) this machine's llama-cpp-python wheel.

    Returns the wheel's path and whether it was built now. The wheel is written to a temporary
    folder and moved into the cache only when the build succeeded, so a killed build leaves nothing
    that a later run would take as done.
    """
    cpu = cpu_info()
    key = build_key(cpu, extra_cmake)
    folder = wheel_cache() / key
    found = sorted(glob.glob(str(folder / f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl")))
    if found and not force:
        log(f"llama.cpp: reusing {found[-1]} (built for this CPU: {key})")
        return Path(found[-1]), False
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = llama_cmake_args(cpu, extra_cmake)
    flags = " ".join(native_flags(cpu)[1:])  # -march/-mcpu=native comes from GGML_NATIVE itself
    if flags:
        env["CFLAGS"] = f"{env.get('CFLAGS', '')} {flags}".strip()
        env["CXXFLAGS"] = f"{env.get('CXXFLAGS', '')} {flags}".strip()
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    log(
        f"llama.cpp: building llama-cpp-python {LLAMA_CPP_VERSION} for this CPU ({cpu.model}, {cpu.level()}; "
        f"CMAKE_ARGS={env['CMAKE_ARGS']} CFLAGS={env.get('CFLAGS', '')}); 10-20 minutes on 2 cores"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        log_path = folder / "build.log"
        with open(log_path, "w") as out:
            done = subprocess.run(
                [*pip, "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                 "-w", tmp, f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"llama.cpp: the build failed (log: {log_path}); its end:\n{tail}")
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise SystemExit(f"llama.cpp: pip wheel made no wheel (log: {log_path})")
        target = folder / built[-1].name
        os.replace(built[-1], target)
    info = {
        "key": key,
        "version": LLAMA_CPP_VERSION,
        "cpu": cpu.model,
        "arch": cpu.arch,
        "cmake_args": env["CMAKE_ARGS"],
        "cflags": env.get("CFLAGS", ""),
        "extra_cmake_args": extra_cmake,
        "target": native_target(cpu),
        "build_seconds": round(time.monotonic() - started),
    }
    (folder / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"llama.cpp: built {target.name} in {info['build_seconds']} s")
    return target, True


def server_path(extra_cmake: str = "", cpu: CpuInfo | None = None) -> Path:
    """Where this machine's ``llama-server`` lives (or would): ``<wheel cache>/<build key>/bin/llama-server``."""
    return wheel_cache() / build_key(cpu, extra_cmake) / "bin" / "llama-server"


def find_server(extra_cmake: str = "") -> Path | None:
    """This machine's ``llama-server`` when it has been built (``$SPEED_LLAMA_SERVER`` overrides), else None."""
    override = os.environ.get("SPEED_LLAMA_SERVER")
    path = Path(override).expanduser() if override else server_path(extra_cmake)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _llama_sources(pip: list[str], source: str | Path | None, work: Path, log=print) -> Path:
    """The vendored llama.cpp of llama-cpp-python's source archive: given, or fetched with pip.

    ``source`` may be the unpacked archive (holding ``vendor/llama.cpp``) or llama.cpp itself.
    """
    if source:
        root = Path(source).expanduser()
        for cand in (root / "vendor" / "llama.cpp", root):
            if (cand / "tools" / "server").is_dir() and (cand / "CMakeLists.txt").is_file():
                return cand
        raise SystemExit(
            f"llama-server: {root} holds no llama.cpp sources (expected vendor/llama.cpp/tools/server); "
            f"unpack llama-cpp-python-{LLAMA_CPP_VERSION}.tar.gz there, or leave --source out to fetch it"
        )
    log(f"llama-server: fetching the llama-cpp-python {LLAMA_CPP_VERSION} source archive with pip")
    done = subprocess.run(
        [*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
         f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    archives = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise SystemExit(
            f"llama-server: pip download of the sources failed:\n{(done.stdout + done.stderr)[-2000:]}"
        )
    with tarfile.open(archives[-1]) as tar:
        tar.extractall(work / "src", filter="data")
    found = sorted((work / "src").glob("*/vendor/llama.cpp"))
    if not found:
        raise SystemExit(f"llama-server: {archives[-1].name} holds no vendor/llama.cpp")
    return found[0]


def converter_dir(version: str = LLAMA_CPP_VERSION) -> Path:
    """Where llama.cpp's HF-to-GGUF converter of this release is kept (pure Python: one per version)."""
    return wheel_cache() / f"llama.cpp-{version}-convert"


def converter_script() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py`` (beside its own ``gguf-py``), or None when not installed.

    ``$SPEED_LLAMA_SRC`` (an unpacked llama-cpp-python source archive) is looked in first.
    """
    cands = []
    if os.environ.get("SPEED_LLAMA_SRC"):
        cands.append(Path(os.environ["SPEED_LLAMA_SRC"]).expanduser() / "vendor" / "llama.cpp")
    cands.append(converter_dir())
    for folder in cands:
        script = folder / "convert_hf_to_gguf.py"
        if script.is_file() and (folder / "gguf-py" / "gguf").is_dir():
            return script
    return None


def install_converter(src: Path, log=print) -> Path:
    """Copy the converter, its ``conversion`` package and its ``gguf-py`` out of the llama.cpp sources.

    The converter and the ``gguf`` package it writes with come from the same sources as the server
    that reads the files, so the three agree on the GGUF format. Copied to a temporary folder, then
    renamed into place, so a half copy is never found.
    """
    dest = converter_dir()
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest / "convert_hf_to_gguf.py"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-") as tmp:
        stage = Path(tmp) / "c"
        stage.mkdir()
        for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
            if (src / name).is_file():
                shutil.copy2(src / name, stage / name)
        for name in ("conversion", "gguf-py"):
            if (src / name).is_dir():
                shutil.copytree(src / name, stage / name, ignore=shutil.ignore_patterns("tests", "examples"))
        try:
            os.replace(stage, dest)
        except OSError:  # another process put it there first
            if not (dest / "convert_hf_to_gguf.py").is_file():
                raise
    log(f"llama.cpp: HF-to-GGUF converter of {LLAMA_CPP_VERSION} in {dest}")
    return dest / "convert_hf_to_gguf.py"


def build_llama_server(
    pip: list[str],
    *,
    source: str | Path | None = None,
    force: bool = False,
    extra_cmake: str = "",
    cmake: str = "cmake",
    log=print,
) -> tuple[Path, bool]:
    """Build (or find) this machine's ``llama-server`` from llama-cpp-python's vendored llama.cpp.

    Args:
        pip: the pip command that fetches the source archive when ``source`` is not given.
        source: an unpacked llama-cpp-python source archive (or its ``vendor/llama.cpp``).
        force: rebuild even when a binary for this CPU exists.
        extra_cmake: extra CMake arguments (the same as the wheel's: they enter the build key).
        cmake: the cmake program.
        log: where progress lines go.

    Returns:
        The binary's path and whether it was built now. Everything is built under a temporary folder
        and the binary moved into the cache (an atomic rename) only after the build succeeded.

    Raises:
        SystemExit: the sources could not be had or the build failed (with the end of its log).
    """
    cpu = cpu_info()
    key = build_key(cpu, extra_cmake)
    target = wheel_cache() / key / "bin" / "llama-server"
    if target.is_file() and os.access(target, os.X_OK) and not force:
        log(f"llama-server: reusing {target} (built for this CPU: {key})")
        if converter_script() is None:
            with tempfile.TemporaryDirectory(prefix="speed-llama-src-") as tmp:
                install_converter(_llama_sources(pip, source, Path(tmp), log), log)
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    flags = " ".join(native_flags(cpu)[1:])  # -march/-mcpu=native comes from GGML_NATIVE itself
    if flags:
        env["CFLAGS"] = f"{env.get('CFLAGS', '')} {flags}".strip()
        env["CXXFLAGS"] = f"{env.get('CXXFLAGS', '')} {flags}".strip()
    jobs = env.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
    cmake_args = [*SERVER_CMAKE_ARGS, *shlex.split(llama_cmake_args(cpu, extra_cmake))]
    log_path = target.parent / "server-build.log"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        src = _llama_sources(pip, source, work, log)
        install_converter(src, log)
        log(
            f"llama-server: building from {src} for this CPU ({cpu.model}, {cpu.level()}; "
            f"{' '.join(cmake_args)} CFLAGS={env.get('CFLAGS', '')}); several minutes on 2 cores"
        )
        with open(log_path, "w") as out:
            for step in (
                [cmake, "-S", str(src), "-B", str(work / "build"), *cmake_args],
                [cmake, "--build", str(work / "build"), "--config", "Release", "--target", "llama-server",
                 "-j", jobs],
            ):  # fmt: skip
                out.write(f"$ {shlex.join(step)}\n")
                out.flush()
                done = subprocess.run(step, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
                if done.returncode != 0:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise SystemExit(f"llama-server: the build failed (log: {log_path}); its end:\n{tail}")
        built = work / "build" / "bin" / "llama-server"
        if not built.is_file():
            raise SystemExit(f"llama-server: the build made no bin/llama-server (log: {log_path})")
        # copy inside the target's folder, then rename: the cache holds a whole binary or none
        staged = target.parent / f".llama-server-{os.getpid()}"
        shutil.copy2(built, staged)
        os.replace(staged, target)
    info = {
        "key": key,
        "version": LLAMA_CPP_VERSION,
        "cpu": cpu.model,
        "cmake_args": cmake_args,
        "cflags": env.get("CFLAGS", ""),
        "jobs": jobs,
        "build_seconds": round(time.monotonic() - started),
    }
    (target.parent / "server-build.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"llama-server: built {target} in {info['build_seconds']} s")
    return target, True


def install_llama(python: str, *, force: bool = False, extra_cmake: str = "", log=print) -> Path:
    """Build or find this machine's wheel and install it into the environment of ``python``.

    Reinstalls when the environment holds a build made for another CPU (its marker differs).
    """
    pip = [python, "-m", "pip"]
    wheel, _ = build_llama_wheel(pip, force=force, extra_cmake=extra_cmake, log=log)
    prefix = Path(_run([python, "-c", "import sys; print(sys.prefix)"]).strip())
    marker = installed_build(prefix)
    key = wheel.parent.name
    if marker and marker.get("key") == key and not force:
        log(f"llama.cpp: {prefix} already holds the build for this CPU ({key})")
        return wheel
    done = subprocess.run([*pip, "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp: installing {wheel} failed")
    info = (
        json.loads((wheel.parent / "build.json").read_text())
        if (wheel.parent / "build.json").exists()
        else {}
    )
    info.update({"key": key, "wheel": str(wheel), "version": LLAMA_CPP_VERSION})
    (prefix / BUILD_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    log(f"llama.cpp: installed {wheel.name} into {prefix}")
    return wheel


def llama_lib_dir() -> Path | None:
    """The folder of the installed llama-cpp-python's shared libraries, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if lib.is_dir() else None


def _probe_marker(model: Path) -> Path | None:
    lib = llama_lib_dir()
    if lib is None:
        return None
    cpu = cpu_info()
    stamp = [cpu.model, " ".join(sorted(cpu.flags)), str(model.resolve())]
    for f in sorted(lib.iterdir()):
        st = f.stat()
        stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return wheel_cache().parent / "probes" / f"llama-{digest}.ok"


#: What the probe runs: a prompt long enough for the batched matrix kernels, then two decoded tokens.
_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, n_batch=64, verbose=False)
llm.create_completion(" ".join(["the quick brown fox jumps over the lazy dog"] * 6), max_tokens=2)
"""


class LlamaCrash(RuntimeError):
    """llama.cpp died of a signal in the probe process (its message says which and what to do)."""


def check_llama_runs(model: str | os.PathLike[str], python: str = sys.executable) -> bool:
    """Run llama.cpp's kernels once on ``model`` in a child process before this process loads it.

    An ``Illegal instruction`` inside llama.cpp kills the whole Python process with no message, so
    the in-process backend asks a child first. The answer is remembered per build, CPU and model
    (``~/.cache/speed/probes``), so the probe costs its 1-3 seconds once per machine.

    Returns:
        True when llama.cpp ran (now or before); False when the probe failed in an ordinary way (a bad
        model file: the real load will say why).

    Raises:
        LlamaCrash: the child died of a signal (SIGILL: the build does not match this CPU).
    """
    path = Path(model)
    marker = _probe_marker(path)
    if marker is not None and marker.exists():
        return True
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [python, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    words = describe_signal_death(done.returncode, f"llama.cpp (loading {path.name} in a probe process)")
    if words:
        raise LlamaCrash(words)
    if done.returncode != 0:
        return False
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{path}\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speed.hardware", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-llama", help="build (or reuse) llama-cpp-python for this CPU and install it")
    b.add_argument("--python", default=sys.executable, help="the environment's python (default: this one)")
    b.add_argument("--force", action="store_true", help="rebuild even when a wheel for this CPU exists")
    b.add_argument(
        "--cmake-args",
        default=os.environ.get("SPEED_LLAMA_CMAKE_ARGS", ""),
        help="extra CMake arguments, e.g. -DGGML_CUDA=ON (default: $SPEED_LLAMA_CMAKE_ARGS)",
    )
    s = sub.add_parser("build-server", help="build (or reuse) llama.cpp's llama-server for this CPU")
    s.add_argument("--python", default=sys.executable, help="the python whose pip fetches the sources")
    s.add_argument("--source", default=os.environ.get("SPEED_LLAMA_SRC") or None,
                   help="an unpacked llama-cpp-python source archive (default: $SPEED_LLAMA_SRC, else pip download)")  # fmt: skip
    s.add_argument("--force", action="store_true", help="rebuild even when a binary for this CPU exists")
    s.add_argument("--cmake-args", default=os.environ.get("SPEED_LLAMA_CMAKE_ARGS", ""),
                   help="extra CMake arguments (default: $SPEED_LLAMA_CMAKE_ARGS)")  # fmt: skip
    sub.add_parser("key", help="print this machine's build key and native target")
    args = parser.parse_args(argv)
    if args.command == "build-server":
        build_llama_server(
            [args.python, "-m", "pip"], source=args.source, force=args.force, extra_cmake=args.cmake_args
        )
        return 0
    if args.command == "key":
        cpu = cpu_info()
        print(build_key(cpu))
        print(native_target(cpu))
        return 0
    install_llama(args.python, force=args.force, extra_cmake=args.cmake_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
