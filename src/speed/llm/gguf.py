"""Trained weights back to GGUF, so that llama.cpp's server can run the trained generators.

After SFT and DPO the junior, senior and revisor are merged transformers folders
(:attr:`speed.training.common.TrainResult.merged_dir`). :func:`gguf_for` is the one place that turns
such a folder into a GGUF for the llama.cpp backends; whoever resolves "where role X's trained
weights live" calls it (today :meth:`speed.llm.server.LlamaCppServerBackend.from_spec`, with the
``model_path`` the stages pass).

Design choices:
- **llama.cpp's own converter, from the same sources as the server.** ``convert_hf_to_gguf.py`` and
  its ``gguf-py`` come from the llama.cpp that llama-cpp-python 0.3.36 vendors (kept by
  ``python -m speed.hardware build-server``, see :func:`speed.hardware.converter_script`), and the
  script is run with that ``gguf-py`` first on ``PYTHONPATH``: the writer, the server and the Python
  bindings then agree on the format, whatever ``gguf`` release the environment holds.
- **A child process.** The converter imports torch and loads the whole model; in a child it cannot
  leave memory or global state behind in a long run, and its log goes to a file.
- **q8_0 by default.** On these CPUs SmolLM2-135M in q8_0 decodes faster than in f16 (fewer bytes
  to read per token; measured in bench/synthesis.py) with no loss in JSON parse rate seen; ``f16``
  and ``bf16`` remain for exactness.
- **Cached beside the merged folder** (``<stage>/merged-gguf/model-<type>.gguf``), keyed by a stamp of
  the folder's files (names, sizes, modification times) and the converter's version, so a retrained
  stage gets a new GGUF and an unchanged one is converted once. The file is written under a
  temporary name and renamed when complete, under a file lock, so Ray workers starting together
  convert once and never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from speed import hardware
from speed.llm.base import BackendError

logger = logging.getLogger(__name__)

#: The GGUF type trained models are converted to (see the module docstring for why).
DEFAULT_OUTTYPE = "q8_0"
OUTTYPES = ("q8_0", "f16", "bf16", "f32")


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a transformers model folder without a GGUF in it."""
    folder = Path(path)
    return folder.is_dir() and (folder / "config.json").is_file() and not any(folder.glob("*.gguf"))


def _stamp(folder: Path, outtype: str) -> str:
    parts = [hardware.LLAMA_CPP_VERSION, outtype]
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_gguf_path(merged_dir: str | os.PathLike[str], outtype: str = DEFAULT_OUTTYPE) -> Path:
    """Where the GGUF of a merged folder is kept: ``<parent>/<name>-gguf/model-<outtype>.gguf``."""
    folder = Path(merged_dir)
    return folder.parent / f"{folder.name}-gguf" / f"model-{outtype}.gguf"


def convert_hf_to_gguf(
    merged_dir: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    *,
    outtype: str = DEFAULT_OUTTYPE,
    python: str = sys.executable,
    log_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert a transformers folder to one GGUF file with llama.cpp's ``convert_hf_to_gguf.py``.

    Args:
        merged_dir: the folder (``config.json``, safetensors, tokenizer files).
        out_file: the GGUF to write; written under a temporary name, renamed when complete.
        outtype: ``q8_0`` (default), ``f16``, ``bf16`` or ``f32``.
        python: the interpreter to run the converter with (it needs torch, numpy, sentencepiece).
        log_path: the converter's log; default ``out_file`` + ``.log``.

    Returns:
        ``out_file``.

    Raises:
        ValueError: an unknown ``outtype``.
        BackendError: the converter is not installed, or it failed (with the end of its log).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    script = hardware.converter_script()
    if script is None:
        raise BackendError(
            "llama.cpp's convert_hf_to_gguf.py is not installed; get it with: PYTHONPATH=src python -m "
            "speed.hardware build-server (make setup does), or point $SPEED_LLAMA_SRC at an unpacked "
            f"llama-cpp-python-{hardware.LLAMA_CPP_VERSION} source archive"
        )
    src, out = Path(merged_dir), Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else out.with_name(out.name + ".log")
    env = dict(os.environ)
    # the converter's own gguf-py first: it must write the format this llama.cpp reads
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(script.parent / "gguf-py"), str(script.parent), env.get("PYTHONPATH", "")) if p
    )
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        with open(log, "w") as fh:
            done = subprocess.run(
                [python, str(script), str(src), "--outfile", tmp, "--outtype", outtype],
                env=env, stdout=fh, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise BackendError(
                f"converting {src} to GGUF ({outtype}) failed with exit code {done.returncode}; "
                f"the end of its log {log}:\n{tail}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def gguf_for(model: str | os.PathLike[str], *, outtype: str = DEFAULT_OUTTYPE) -> str:
    """What a llama.cpp backend should load for ``model``: a GGUF where ``model`` is trained weights.

    A merged transformers folder (what the stages pass for trained weights) becomes its cached GGUF,
    converted now when there is none for the folder's current files. Anything else (a GGUF file, a
    folder holding GGUF files, a packaged model name) is returned unchanged, for
    :func:`speed.models.resolve_gguf`.

    Args:
        model: trained weights of the run, or any model reference.
        outtype: the GGUF type of a conversion.

    Returns:
        The GGUF file's path, or ``model`` itself.

    Raises:
        BackendError: the conversion failed or the converter is missing.
    """
    if not is_hf_folder(model):
        return str(model)
    from speed.models import _locked  # the same inter-process lock as the packaged models' join

    folder = Path(model)
    target = cached_gguf_path(folder, outtype)
    stamp_file = target.with_name(target.name + ".stamp")
    with _locked(target.with_name(target.name + ".lock")):
        stamp = _stamp(folder, outtype)
        if target.is_file() and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
            return str(target)
        logger.info("converting %s to GGUF (%s) for llama.cpp: %s", folder, outtype, target)
        convert_hf_to_gguf(folder, target, outtype=outtype)
        stamp_file.write_text(stamp + "\n")
        (target.parent / "source.json").write_text(json.dumps({"merged_dir": str(folder.resolve())}) + "\n")
    return str(target)
