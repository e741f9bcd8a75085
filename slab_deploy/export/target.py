"""The output directory of an export as a transaction (`ExportTarget`), and the names of what it holds."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from slab_deploy.errors import ArtifactError
from slab_deploy.utils import make_staging, raise_if_interrupted, recover_swap, swap_in

ONNX_NAME = "model.onnx"
MANIFEST_NAME = "manifest.json"
# kept beside model.onnx so `check` can tell exporter from simplifier faults
UNSIMPLIFIED_NAME = "model.unsimplified.onnx"
FAILED_ONNX_NAME = "model.parity-failed.onnx"  # the deployed graph of a failed set (in DIR.failed)
# What an export directory may hold: anything else is the user's, and such a directory is never
# replaced (earlier releases also left `.NAME.*.partial` files of interrupted writes).
# What `slab-deploy build` adds to an export (runtime/engine_record.py): the engine and its record.
# An export with --force replaces them with the rest: the new graph has no engine yet.
PLAN_NAME = "model.plan"
RECORD_NAME = "engine.json"
ARTIFACT_NAMES = frozenset({ONNX_NAME, MANIFEST_NAME, UNSIMPLIFIED_NAME, FAILED_ONNX_NAME, PLAN_NAME,
                            RECORD_NAME})
LOCK_TIMEOUT_S = 0.5


class ExportTarget:
    """The output directory of one export, as a transaction.

    Entering takes the lock `.NAME.lock` beside DIR (a lock inside DIR would be swapped away),
    repairs what an interrupted earlier export left, checks that DIR may be written and makes an
    empty hidden staging directory beside it. `commit()` swaps the staging directory in as DIR
    whole; `divert()` moves it to the side folder DIR.failed instead; leaving without either
    removes it. DIR itself is only ever replaced whole, and only when it is absent, empty, or an
    earlier export (only `ARTIFACT_NAMES`) and `force` is given: a directory with anything else in
    it is the user's and is refused, `--force` or not.
    """

    def __init__(
        self, out_dir: str | Path, *, force: bool = False, lock_timeout: float = LOCK_TIMEOUT_S
    ) -> None:
        self.out_dir = Path(out_dir)
        path = Path(os.path.abspath(self.out_dir))
        self.target = path.resolve() if path.is_symlink() else path
        if not self.target.name:
            raise ArtifactError(f"--output {out_dir} is a filesystem root; pass a directory below it")
        self.force = force
        self.lock_path = self.target.parent / f".{self.target.name}.lock"
        self.lock_timeout = lock_timeout
        self.staging: Path | None = None
        self.existed = False  # whether DIR was there when the export began (after any repair)
        self.recovered = ""
        self._lock: Any = None

    def __enter__(self) -> ExportTarget:
        from filelock import FileLock, Timeout

        if os.path.lexists(self.target) and not self.target.is_dir():
            raise ArtifactError(f"--output {self.out_dir} is a file; pass a directory")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.lock_path), timeout=self.lock_timeout)
            self._lock.acquire()
        except Timeout:
            raise ArtifactError(
                f"{self.out_dir} is being written by another export (lock {self.lock_path}); "
                "wait for it to finish or choose another --output"
            ) from None
        except OSError as exc:
            raise ArtifactError(f"cannot write beside {self.out_dir}: {exc.strerror or exc}") from None
        try:
            self.recovered = recover_swap(self.target)
            self.existed = self.target.is_dir()
            self._check_replaceable()
            self.staging = make_staging(self.target)
        except OSError as exc:
            self._lock.release()
            raise ArtifactError(f"cannot prepare --output {self.out_dir}: {exc.strerror or exc}") from None
        except BaseException:
            self._lock.release()
            raise
        return self

    def _check_replaceable(self) -> None:
        if not self.target.is_dir():
            return
        entries = sorted(p.name for p in self.target.iterdir())
        foreign = [n for n in entries
                   if n not in ARTIFACT_NAMES and not (n.startswith(".") and n.endswith(".partial"))]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ArtifactError(
                f"--output {self.out_dir} holds files that are not export artefacts ({shown}); an export "
                "replaces its directory whole, so it will not write there: choose another --output"
            )
        if entries and not self.force:
            raise ArtifactError(f"{self.out_dir} holds an earlier export; "
                                "pass --force to replace it or choose another --output")

    def commit(self) -> None:
        """Swap the staging directory in as DIR (the previous DIR, if any, is removed)."""
        assert self.staging is not None
        raise_if_interrupted()  # a signal whose exception was swallowed still stops the swap
        try:
            swap_in(self.staging, self.target)
        finally:
            if not self.staging.exists():
                self.staging = None

    def divert(self) -> Path:
        """Move the staging directory to the side folder DIR.failed (replacing an earlier failed
        set there; a DIR.failed holding anything else is left alone and a dated name is used)."""
        assert self.staging is not None
        failed = self.target.with_name(self.target.name + ".failed")
        if failed.is_dir() and {p.name for p in failed.iterdir()} <= ARTIFACT_NAMES:
            shutil.rmtree(failed)
        elif os.path.lexists(failed):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            failed = self.target.with_name(f"{self.target.name}.failed-{stamp}")
            n = 1
            while os.path.lexists(failed):
                n += 1
                failed = self.target.with_name(f"{self.target.name}.failed-{stamp}-{n}")
        os.rename(self.staging, failed)
        self.staging = None
        return self.failed_display(failed)

    def failed_display(self, failed: Path) -> Path:
        """`failed` spelt like the user's --output (relative stays relative)."""
        if self.out_dir.is_absolute() or self.target != Path(os.path.abspath(self.out_dir)):
            return failed
        return Path(os.path.relpath(failed))

    def __exit__(self, *exc: object) -> None:
        try:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
        finally:
            self._lock.release()

