"""Small file helpers shared by stages: atomic writes and JSONL / Parquet reading.

Every file a stage writes goes through :func:`atomic_write` (write to a temporary name in the same
folder, fsync, rename), so a reader never sees half a file, even after a SIGKILL.
"""

from __future__ import annotations

import json
import os
import tempfile
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


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines atomically; returns the number of rows."""
    n = 0
    with atomic_write(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str))
            fh.write("\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read JSON lines; a malformed line is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


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
