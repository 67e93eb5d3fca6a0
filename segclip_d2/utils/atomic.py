"""Atomic output files: written under a temp name tagged with the writer, then renamed.

Every writer of this project (demo outputs, prepared datasets, checkpoints, evaluation results)
goes through :func:`atomic_output`::

    with atomic_output(out_dir / "tile_pred.tif") as tmp:
        write_something(tmp)  # any library that writes to a path
    # here tile_pred.tif exists, complete; on an exception it is untouched and tmp is gone

The temp file lives in the destination folder (so the rename is atomic), is hidden, keeps the
final suffix (so writers that pick the format from the extension still work) and carries the
writer's host and pid::

    .tile_pred.tif.tmp-<host>-<pid>-<token>.tif

It is created with mode ``0o666`` minus the umask (0644 under umask 022), like a plain
``open(path, "w")`` would, so outputs are as readable as any file the user creates. Before the
rename the data is fsynced, and after it the folder, so a power cut leaves the old file or the
new one, never a truncated one under the final name.

A writer killed by SIGKILL cannot clean up: :func:`remove_stale_temps` removes temps in a
folder whose writer process is gone (same host, pid no longer alive or reused by a process
that started after the temp was last written), and never those of a live writer, such as
another rank writing into the same folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_TEMP_RE = re.compile(
    r"^\.(?P<final>.+)\.tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?:\.[^.]*)?$"
)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def temp_name(final: str | Path) -> Path:
    """A fresh temp path next to ``final``, tagged with this host and pid (not created)."""
    final = Path(final)
    tag = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return final.with_name(f".{final.name}.tmp-{tag}{final.suffix}")


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """``(final name, host, pid)`` of a temp made by :func:`temp_name`, else ``None``."""
    m = _TEMP_RE.match(name)
    return (m["final"], m["host"], int(m["pid"])) if m else None


def _fsync(path: str | Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A temp file next to ``path`` that becomes ``path`` on :meth:`commit` (for writers that
    live longer than one ``with`` block; :func:`atomic_output` is the usual form).

    The temp file is created empty (mode 0666 & ~umask) so its name is reserved; the writer may
    overwrite or recreate it. :meth:`abort` removes it and leaves ``path`` as it was.
    """

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.tmp = temp_name(self.path)
        os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    def commit(self) -> None:
        """fsync the temp file, rename it to ``path``, fsync the folder."""
        try:
            if not self.tmp.exists():
                raise FileNotFoundError(f"{self.path}: the writer did not produce {self.tmp.name}")
            if self.fsync:
                _fsync(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        if self.fsync:
            _fsync(self.path.parent, directory=True)

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it to ``path``.

    On an exception (including KeyboardInterrupt and SystemExit) the temp file is removed and
    ``path`` is left as it was.
    """
    f = AtomicFile(path, fsync)
    try:
        yield f.tmp
    except BaseException:
        f.abort()
        raise
    f.commit()


def _started_after(pid: int, mtime: float) -> bool:
    """Whether the process now holding ``pid`` started after ``mtime`` (so it is not the writer
    of a file last written then). ``False`` when it cannot be told (no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return btime + start_ticks / os.sysconf("SC_CLK_TCK") > mtime + 1.0


def writer_alive(host: str, pid: int, mtime: float) -> bool:
    """Whether the writer ``(host, pid)`` of a temp last modified at ``mtime`` may be running.
    Writers on other hosts are assumed alive (they cannot be checked from here)."""
    if host != _host() or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return True
    return not _started_after(pid, mtime)


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temps in ``folder`` left by writers that are no longer alive; return them.

    Only names made by :func:`temp_name` are considered; a temp whose writer is alive (another
    process writing into the same folder right now) or on another host is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    candidates = folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")
    for p in candidates:
        parsed = parse_temp_name(p.name)
        if parsed is None or not p.is_file():
            continue
        _, host, pid = parsed
        try:
            mtime = p.stat().st_mtime
        except FileNotFoundError:
            continue
        if writer_alive(host, pid, mtime):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        logger.warning(
            "%s: removed %d temp file(s) left by interrupted earlier runs (%s)",
            folder,
            len(removed),
            ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else ""),
        )
    return removed
