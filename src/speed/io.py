"""Small file helpers shared by every layer: atomic writes and JSONL / Parquet reading.

Every file a stage writes goes through :func:`atomic_write` (write to a temporary name in the same
folder, fsync, rename), so a reader never sees half a file, even after a SIGKILL.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2, default=str)
        fh.write("\n")


class DamagedFileError(ValueError):
    """A file that does not parse as what it should be; the message names the file and the fault."""


def read_json(path: str | os.PathLike[str]) -> Any:
    """One JSON document.

    Raises:
        DamagedFileError: the file is not valid JSON or not UTF-8 (a truncated write, a disk
            fault, a hand edit); the message names the file and where the fault is.
        OSError: the file cannot be read.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DamagedFileError(
            f"'{path}' is damaged: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except UnicodeDecodeError as err:
        raise DamagedFileError(f"'{path}' is damaged: not UTF-8 text (byte {err.start})") from None


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines atomically; returns the number of rows."""
    n = 0
    with atomic_write(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str))
            fh.write("\n")
            n += 1
    return n


def iter_jsonl(
    path: str | os.PathLike[str],
    *,
    error: type[Exception] = ValueError,
    skipped: Counter[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream the JSON objects of a JSON Lines file; blank lines are passed over.

    The one JSONL reader of the package: stage outputs, evaluation folders, decontamination sources
    and labelled training data all read through it, so a bad line is reported the same way.

    Args:
        path: the file.
        error: the exception raised for a line that is not a JSON object (callers pass their own
            ``ValueError`` subclass); the message names the file and line.
        skipped: when given, a bad line is counted here (``not_json``, ``not_an_object``) and
            skipped instead of raising, and undecodable bytes are replaced: for readers that must
            not fail (the report).

    Raises:
        error: a line is not valid JSON, or is JSON but not an object (unless ``skipped`` is given).
    """
    with open(path, encoding="utf-8", errors="replace" if skipped is not None else "strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                if skipped is not None:
                    skipped["not_json"] += 1
                    continue
                raise error(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                if skipped is not None:
                    skipped["not_an_object"] += 1
                    continue
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def read_jsonl(path: str | os.PathLike[str], *, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """All the JSON objects of a JSON Lines file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, error=error))


def read_rows(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A stage's examples: ``data.jsonl`` if present, else its Parquet shards in name order."""
    folder = Path(folder)
    if (folder / "data.jsonl").exists():
        return read_jsonl(folder / "data.jsonl")
    shards = sorted(folder.glob("**/*.parquet"))
    if shards:
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for shard in shards:
            rows.extend(pq.read_table(shard).to_pylist())
        return rows
    raise FileNotFoundError(f"{folder} holds no data.jsonl and no Parquet shards")
