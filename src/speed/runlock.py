"""One writer per run folder: an exclusive lock, and who holds it, beside the run's files.

Two ``speed run`` on one folder would each start a teacher, write the same stage work folders and
send every call twice. Every command that writes a run (``run``, ``stage``, ``scale-study``) holds
``RUN/.lock`` while it works; a second one exits at once, naming the holder. Read-only commands
(``status``, ``show``, ``cost``, ``report``) take no lock and keep working during a run.

Design choices:
- The lock is the operating system's (``filelock.FileLock``: ``flock`` on POSIX, ``msvcrt`` on
  Windows), so a holder killed with SIGKILL releases it with its last file descriptor: nothing is
  left to clean up, and the next run simply takes it. Where the filesystem has no such locks,
  filelock falls back to a lock *file*, which a killed holder leaves behind; that stale file is taken
  over when its recorded holder ran on this host and its pid is gone.
- Who holds the lock is written to ``RUN/.lock.json`` (pid, host, start time, command) once the lock
  is held, so a refused writer can say whom it waits for. It is only ever read to word a message or
  to judge a stale lock file: the lock itself decides.
- The lock is taken only once a command has passed every check, so a refused command leaves no
  trace in the run folder (the folder is created here, by the writer that will use it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import BaseFileLock, FileLock, SoftFileLock, Timeout

from speed.io import read_json, write_json

#: the lock file and the holder's record, hidden in the run folder
LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.json"


class RunLockedError(RuntimeError):
    """Another live process writes this run folder; the message names it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder's lock."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def me(cls, command: str | None = None) -> Holder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            command=command if command is not None else " ".join(["speed", *sys.argv[1:]]),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}: `{self.command}`"


def read_holder(run_dir: Path) -> Holder | None:
    """The holder recorded in ``run_dir``, or None when there is no readable record."""
    try:
        data: Any = read_json(run_dir / HOLDER_NAME)
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this host; None where that cannot be told."""
    if os.name != "posix":
        return None  # os.kill(pid, 0) is no probe on Windows: it would send CTRL_C_EVENT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class RunLock:
    """The exclusive lock of one run folder; use as a context manager.

    Args:
        run_dir: the run folder (created on acquire).
        command: the command line recorded for others to see; default: this process's.
        lock_class: the filelock class (tests pass ``SoftFileLock`` to exercise stale lock files).

    Raises:
        RunLockedError: on enter, when another live process holds the lock.
    """

    def __init__(
        self, run_dir: str | Path, command: str | None = None, lock_class: type[BaseFileLock] = FileLock
    ):
        self.run_dir = Path(run_dir)
        self.command = command
        self.lock_class = lock_class
        self._lock: BaseFileLock | None = None
        self.holder: Holder | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_NAME
        lock = self.lock_class(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = read_holder(self.run_dir)
            if not self._stale(lock, holder):
                raise self._refusal(holder) from None
            # a lock file left by a killed holder on this host: remove it and take the lock
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            try:
                lock.acquire()
            except Timeout:  # someone else took it over first
                raise self._refusal(read_holder(self.run_dir)) from None
        self._lock = lock
        self.holder = Holder.me(self.command)
        write_json(self.run_dir / HOLDER_NAME, asdict(self.holder))

    def _stale(self, lock: BaseFileLock, holder: Holder | None) -> bool:
        """Whether a lock we could not take is a lock file that nobody holds any more.

        Only a lock *file* (soft lock) can outlive its holder; an OS lock that is still held has a
        live holder by definition (a process that inherited the descriptor, if not the recorded one).
        """
        if not isinstance(lock, SoftFileLock) or holder is None:
            return False
        return holder.host == socket.gethostname() and pid_alive(holder.pid) is False

    def _refusal(self, holder: Holder | None) -> RunLockedError:
        who = holder.describe() if holder is not None else "a process that left no record"
        gone = ""
        if holder is not None and holder.host == socket.gethostname() and pid_alive(holder.pid) is False:
            gone = (
                f" Process {holder.pid} is gone, but a process it started still holds the lock: "
                f"find it with `fuser {self.run_dir / LOCK_NAME}` and stop it."
            )
        return RunLockedError(
            f"run folder '{self.run_dir}' is in use by {who}.{gone} Wait for it to finish (watch it "
            f"with `speed status {self.run_dir}`), stop it, or choose another run.dir"
        )

    def release(self) -> None:
        if self._lock is None:
            return
        # the record goes first: a record without a lock is harmless, a lock without one is not
        if read_holder(self.run_dir) == self.holder:
            with contextlib.suppress(OSError):
                (self.run_dir / HOLDER_NAME).unlink()
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
