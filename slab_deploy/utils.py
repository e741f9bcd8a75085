"""Small helpers shared across stages (no heavy imports): atomic files, whole-directory swaps,
the umask, deferred signals, available memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux reports it in
    /proc/self/status); elsewhere it is set and restored under a lock, since it is process-global."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` would give a new directory: 0o777 less the umask."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    The file gets the mode the umask allows (`mkstemp` alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        raise_if_interrupted()
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them.

    For a few renames that must happen together. Python runs signal handlers in the main thread
    only, so this is a no-op elsewhere (and the handlers it would defer never run there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        pending.append(signum)

    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, hold) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush one file (or, with `directory`, a directory's entries) to disk; errors are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file below `root` and the directories themselves to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath), directory=True)


# Names of the hidden siblings a directory swap uses (all in the target's parent):
#   .NAME.staging-XXXX   the new contents while they are built
#   .NAME.replaced-XXXX  the previous contents during the swap
STAGING_TAG = "staging"
REPLACED_TAG = "replaced"


def sibling(target: Path, tag: str) -> list[Path]:
    """Hidden siblings `.NAME.TAG-*` of `target`."""
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}.{tag}-"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def make_staging(target: Path) -> Path:
    """An empty hidden directory beside `target` (same filesystem, so the swap is a rename),
    with the mode the umask allows (`mkdtemp` alone would leave it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{STAGING_TAG}-", dir=target.parent))
    os.chmod(path, dir_mode())
    return path


def recover_swap(target: Path) -> str:
    """Undo what an interrupted swap into `target` left (call it holding the target's lock).

    A crash between the two renames of `swap_in` leaves no `target` and its previous contents in
    `.NAME.replaced-*`: they are put back. Left-over staging directories and replaced copies
    whose swap had finished are removed. Returns a note of what was done ("" when nothing)."""
    notes = []
    replaced = sibling(target, REPLACED_TAG)
    if replaced and not os.path.lexists(target):
        newest = max(replaced, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, target)
        replaced.remove(newest)
        notes.append(f"restored {target} from an interrupted swap")
    for p in replaced + sibling(target, STAGING_TAG):
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"removed {p.name}")
    return "; ".join(notes)


def swap_in(staging: Path, target: Path) -> None:
    """Make the directory `staging` be `target`, replacing any directory there as a whole.

    Two renames inside the same parent, with SIGINT/SIGTERM held between them: at every
    instant `target` is either the complete old or the complete new directory, except after a
    hard crash between the renames, which `recover_swap` undoes (back to the old one)."""
    fsync_tree(staging)
    aside = target.parent / f".{target.name}.{REPLACED_TAG}-{secrets.token_hex(4)}"
    try:
        with deferred_signals():  # a signal held here is delivered on leaving, after both renames
            if os.path.lexists(target):
                os.rename(target, aside)
            os.rename(staging, target)
        fsync_path(target.parent, directory=True)
    finally:
        if os.path.lexists(aside):
            if os.path.lexists(target):
                shutil.rmtree(aside, ignore_errors=True)
            else:  # the second rename failed: put the old directory back
                os.rename(aside, target)


def available_memory() -> int | None:
    """Bytes of host memory this process can still get: the least of MemAvailable, the cgroup's
    limit (v2 or v1) less its usage, and psutil's figure (when installed); None when none of them
    can be read (swap is not counted)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim, use = Path(limit).read_text().strip(), Path(usage).read_text().strip()
            if lim.isdigit() and use.isdigit() and int(lim) < 1 << 60:
                found.append(max(int(lim) - int(use), 0))
        except OSError:
            pass
    try:
        import psutil  # type: ignore[import-untyped]  # optional: used when present

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    return min(found) if found else None


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM (see `signals_interrupt`), so `finally` blocks
    and context managers clean up (temporary files, staging directories, locks) exactly as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_PENDING: list[int] = []  # the signal `signals_interrupt` caught, whether or not its exception got through


def raise_if_interrupted() -> None:
    """Raise `Interrupted` for a signal caught by `signals_interrupt` whose exception never
    reached the code: Python drops an exception raised while a finaliser runs (a signal that
    lands in `ZipFile.__del__`, say). Called before every step that cannot be undone (renaming an
    artefact into place), so such a signal still stops the work there."""
    if _PENDING:
        raise Interrupted(_PENDING[0])


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise `Interrupted` once; a repeat while cleaning up is
    ignored. The signal is also kept for `raise_if_interrupted`, in case its exception was
    swallowed. The earlier handlers come back on leaving. A no-op off the main thread, where
    handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PENDING.clear()

    def handler(signum: int, _frame: object) -> None:
        if _PENDING:
            return
        _PENDING.append(signum)
        raise Interrupted(signum)

    previous_hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        # Our own signal, dropped by a finaliser: it is kept in _PENDING and raised at the
        # next rename or at exit, so Python's "Exception ignored in ..." traceback is noise.
        if not isinstance(info.exc_value, Interrupted):
            previous_hook(info)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        sys.unraisablehook = previous_hook
        _PENDING.clear()
