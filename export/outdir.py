"""The output directory of ``keras-bn run`` and ``keras-bn check``: one consistent set of files, or nothing.

The policy (layout of ``--out DIR``, what is refused, what is cleaned, what the user keeps) is written once, for
users, in docs/report.md, section "Output directory: one consistent set, or nothing"; this module implements it and
the names below are that layout's. The one step everything rests on: ``publish`` swaps ``DIR/latest`` in one
``rename(2)`` of a fresh symlink over the old one, which is atomic on Linux (POSIX rename: "a link named new shall
remain visible to other threads throughout the renaming operation and refer either to the file referred to by new or
old"), so a reader sees the old set or the new one, never a mixture.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

__all__ = [
    "CURRENT_LINK",
    "LOCK_NAME",
    "OutputDir",
    "OutputDirBusy",
    "OutputDirError",
    "SET_PREFIX",
    "STAGING_PREFIX",
    "check_out_dir",
    "is_own_name",
    "manifest",
    "sha256_file",
    "verify",
]

CURRENT_LINK = "latest"
LOCK_NAME = ".keras-bn.lock"
SET_PREFIX = ".keras-bn-run-"
STAGING_PREFIX = ".keras-bn-staging-"
STAGING_MARKER = ".staging.json"
_LINK_TMP_PREFIX = ".keras-bn-latest-"


class OutputDirError(Exception):
    """``--out`` cannot hold a run set (not a directory, foreign files, not writable): the user's to fix."""


class OutputDirBusy(OutputDirError):
    """Another keras-bn run holds ``--out``'s lock."""


def is_own_name(name: str) -> bool:
    """True for the names keras-bn creates directly in ``--out`` (layout in the module docstring)."""
    return name in (CURRENT_LINK, LOCK_NAME) or name.startswith((SET_PREFIX, STAGING_PREFIX, _LINK_TMP_PREFIX))


def check_out_dir(out: Path, *, force: bool) -> None:
    """Refuse an ``out`` that is not a directory, or holds the user's files (unless ``force``), or whose ``latest``
    is not our symlink; creates nothing (called before any work)."""
    if out.is_symlink() and not out.exists():
        raise OutputDirError(f"--out {out} is a dangling symlink")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        ancestor = next(p for p in out.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise OutputDirError(f"cannot create --out {out}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputDirError(f"cannot create --out {out}: {ancestor} is not writable")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputDirError(f"--out {out} is not writable")
    if (out / LOCK_NAME).is_file():  # a quick probe, so that a busy --out is refused before the data loads
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
        try:
            _lock(fd, out)
        finally:
            os.close(fd)  # the probe's lock, if it got one, ends here; open() takes the real one
    link = out / CURRENT_LINK
    if (link.exists() or link.is_symlink()) and not _is_our_link(link):
        raise OutputDirError(f"{link} exists and is not keras-bn's symlink to a run set; keras-bn never replaces it")
    foreign = sorted(p.name for p in out.iterdir() if not is_own_name(p.name))
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputDirError(
            f"--out {out} holds files keras-bn did not write ({shown}); choose a new or empty directory, or pass "
            f"--force to add keras-bn's set ({CURRENT_LINK} and hidden {SET_PREFIX}*) beside them untouched"
        )


def _lock(fd: int, out: Path) -> None:
    """flock ``fd`` (the lock file of ``out``) without waiting; a held lock is a busy ``out``, named by its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputDirError(f"cannot lock {out / LOCK_NAME}: {exc.strerror or exc}") from exc
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        raise OutputDirBusy(
            f"--out {out} is in use by another keras-bn run ({holder or 'owner unknown'}); wait for it or choose "
            "another --out"
        ) from None


def _is_our_link(link: Path) -> bool:
    return link.is_symlink() and os.readlink(link).startswith(SET_PREFIX) and "/" not in os.readlink(link)


# ------------------------------------------------------------------------------------------------ process identity


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot): tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "process_start": _process_start(pid),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _is_dead(owner: dict[str, Any]) -> bool | None:
    """True if the process described by a marker is gone, False if alive, None if it ran on another host."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") != _boot_id():
        return True  # the machine rebooted since: every process of that boot is gone
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return owner.get("process_start") is not None and _process_start(pid) != owner.get("process_start")


# ------------------------------------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest(root: Path, *, exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``[{"path", "size", "sha256"}]`` for every regular file under ``root`` (POSIX paths relative to it), sorted."""
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in exclude or path.is_dir():
            continue
        if path.is_symlink() or not path.is_file():
            raise OutputDirError(f"{path} is not a regular file; a run set holds regular files only")
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so that a set renamed into place survives a power cut whole."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ a run's set


class OutputDir:
    """One run's hold on ``--out``: ``open()`` (lock, clean, stage), write into ``staging``, then ``publish()``;
    ``close()`` (always, e.g. in ``finally``) removes an unpublished staging folder and releases the lock."""

    def __init__(self, out: Path) -> None:
        self.out = out
        # Time for people, pid and a random part so that two runs of one process within a second differ.
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-{secrets.token_hex(3)}"
        self.staging = out / f"{STAGING_PREFIX}{self.run_id}"
        self.set_dir = out / f"{SET_PREFIX}{self.run_id}"
        self.cleaned: list[str] = []  # stale names removed by open(), for the log
        self._lock_fd: int | None = None

    @property
    def current(self) -> Path:
        """What readers use: ``out/latest``."""
        return self.out / CURRENT_LINK

    def open(self) -> OutputDir:
        """Create ``out`` if needed, take its lock (refuse if held), remove stale runs' leftovers, create staging."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirError(f"cannot write --out {self.out}: {exc.strerror or exc}") from exc
        try:
            _lock(fd, self.out)
        except OutputDirError:
            os.close(fd)
            raise
        self._lock_fd = fd
        owner = _identity()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {owner['pid']} on {owner['host']}, started {owner['started_utc']}\n".encode(), 0)
        self._clean_stale()
        try:
            self.staging.mkdir()
            (self.staging / STAGING_MARKER).write_text(json.dumps(owner) + "\n")
        except OSError as exc:
            self.close()
            raise OutputDirError(f"cannot write --out {self.out}: {exc.strerror or exc}") from exc
        probe = self.out / f"{_LINK_TMP_PREFIX}{self.run_id}"
        try:  # publish() ends with a symlink: find a filesystem without them now, not after training
            os.symlink(self.staging.name, probe)
            probe.unlink()
        except OSError as exc:
            self.close()
            raise OutputDirError(
                f"--out {self.out} cannot hold symlinks ({exc.strerror or exc}); choose a directory on a "
                "filesystem that can (keras-bn switches OUT/latest with one)"
            ) from exc
        return self

    def _clean_stale(self) -> None:
        """Under the lock: remove staging folders of dead runs and sets that ``latest`` no longer points to."""
        current = os.readlink(self.current) if _is_our_link(self.current) else None
        for path in sorted(self.out.iterdir()):
            name = path.name
            if name.startswith(STAGING_PREFIX) and path.is_dir() and not path.is_symlink():
                try:
                    owner = json.loads((path / STAGING_MARKER).read_text())
                except (OSError, ValueError):
                    owner = None  # killed between mkdir and marker, or after removing it to publish
                if owner is not None and _is_dead(owner) is not True:
                    continue  # alive, or on another host: not provably ours to delete
            elif name.startswith(SET_PREFIX) and path.is_dir() and not path.is_symlink():
                if name == current:
                    continue
            elif name.startswith(_LINK_TMP_PREFIX) and path.is_symlink():
                path.unlink()
                self.cleaned.append(name)
                continue
            else:
                continue
            shutil.rmtree(path)
            self.cleaned.append(name)

    def publish(self) -> Path:
        """Make the staged files the current set in one rename; returns ``out/latest``. The old set is deleted after."""
        (self.staging / STAGING_MARKER).unlink()
        _fsync_tree(self.staging)
        os.rename(self.staging, self.set_dir)
        previous = os.readlink(self.current) if _is_our_link(self.current) else None
        tmp_link = self.out / f"{_LINK_TMP_PREFIX}{self.run_id}"
        os.symlink(self.set_dir.name, tmp_link)
        os.replace(tmp_link, self.current)  # the one atomic step: readers see the old set or the new one
        _fsync_dir(self.out)
        if previous and previous != self.set_dir.name:
            shutil.rmtree(self.out / previous, ignore_errors=True)
        return self.current

    def close(self) -> None:
        """Remove the staging folder if it was not published, and release the lock."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the lock file stays (deleting it would race)
            self._lock_fd = None

    def __enter__(self) -> OutputDir:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------- verify


def verify(path: Path, report_name: str = "report.json") -> list[str]:
    """Check a run set against the manifest in its report: every listed file present with its size and sha256, and
    no other file. ``path`` is ``--out`` (its ``latest`` is followed) or a set folder. Returns the problems found,
    one sentence each; an empty list means the set is complete and unchanged."""
    root = path / CURRENT_LINK if (path / CURRENT_LINK).is_symlink() else path
    report_path = root / report_name
    try:
        listed = json.loads(report_path.read_text())["manifest"]
        expected = {entry["path"]: entry for entry in listed}
    except FileNotFoundError:
        return [f"{report_path} does not exist"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{report_path} has no readable manifest ({type(exc).__name__}: {exc})"]
    problems = []
    present = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if not p.is_dir()}
    present.pop(report_name, None)
    for rel, entry in sorted(expected.items()):
        file = present.pop(rel, None)
        if file is None:
            problems.append(f"{rel}: listed in the manifest but missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{rel}: size {file.stat().st_size}, manifest says {entry.get('size')}")
        elif sha256_file(file) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    problems += [f"{rel}: not in the manifest" for rel in sorted(present)]
    return problems
