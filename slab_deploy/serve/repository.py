"""A Triton model repository from an export directory: `write_triton_repository`.

    REPO/<model>/config.pbtxt     platform onnxruntime_onnx or tensorrt_plan, or backend python
    REPO/<model>/manifest.json    the export's manifest, copied as it is
    REPO/<model>/engine.json      (tensorrt) the engine's record, copied as it is
    REPO/<model>/<version>/model.onnx | model.plan   (python: model.onnx and model.py)

One model is one transaction: it is built in a hidden staging folder beside REPO (never inside:
Triton would take it for a model) and swapped in whole once every file is written and checked,
so a running Triton never sees half a model and a failure or Ctrl-C leaves REPO as it was. Other
models in REPO are never touched; an existing REPO/<model> is replaced only with `force`, and
only when it is a Triton model folder.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from slab_deploy.errors import ArtifactError
from slab_deploy.serve.artifact import ENGINE_INFO_NAME, MANIFEST_NAME, ONNX_NAME, PLAN_NAME, read_artifact
from slab_deploy.serve.config import ModelConfig, model_config, render_config
from slab_deploy.serve.options import RepoOptions
from slab_deploy.utils import deferred_signals, dir_mode, fsync_tree, raise_if_interrupted

CONFIG_NAME = "config.pbtxt"
PYTHON_MODEL_NAME = "model.py"
LOCK_TIMEOUT_S = 0.5


@dataclass
class RepoResult:
    """What `write_triton_repository` wrote."""

    repo: Path
    model_dir: Path
    name: str
    flavour: str
    config: ModelConfig
    config_text: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path in model_dir -> sha256, bytes
    replaced: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": str(self.repo),
            "model_dir": str(self.model_dir),
            "name": self.name,
            "flavour": self.flavour,
            "backend": self.config.backend,
            "platform": self.config.platform,
            "max_batch_size": self.config.max_batch_size,
            "dynamic_batching": self.config.dynamic_batching,
            "instances": {"count": self.config.instance_count, "kind": self.config.instance_kind},
            "input": {
                "name": self.config.input.name,
                "dtype": self.config.input.dtype,
                "dims": list(self.config.input.dims),
            },
            "output": {
                "name": self.config.output.name,
                "dtype": self.config.output.dtype,
                "dims": list(self.config.output.dims),
            },
            "files": self.files,
            "replaced": self.replaced,
            "notes": self.notes,
        }


def python_model_source() -> str:
    """The text of the python flavour's model.py (`slab_deploy/serve/python_model.py`)."""
    return resources.files("slab_deploy.serve").joinpath("python_model.py").read_text(encoding="utf-8")


def _copy_hashed(src: Path, dst: Path) -> dict[str, Any]:
    """Copy `src` to `dst`, hashing what was written; returns its file entry."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(1 << 20):
            h.update(block)
            fout.write(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def _write_text(path: Path, text: str) -> dict[str, Any]:
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


class _Side:
    """The hidden folders of one model's transaction, kept beside REPO rather than inside it: Triton
    takes every folder of a repository for a model (a hidden one too), so nothing but complete
    models may ever appear in REPO.

        .REPO.MODEL.staging-XXXX   the new model while it is written
        .REPO.MODEL.replaced-XXXX  the previous model during the swap
        .REPO.MODEL.lock           held while a writer works on REPO/MODEL
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.parent = target.parent.parent
        self.prefix = f".{target.parent.name}.{target.name}."

    def path(self, tag: str) -> Path:
        return self.parent / f"{self.prefix}{tag}"

    def _siblings(self, tag: str) -> list[Path]:
        return sorted(self.parent.glob(f"{self.prefix}{tag}-*"))

    def staging(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{self.prefix}staging-", dir=self.parent))
        os.chmod(path, dir_mode())
        return path

    def recover(self) -> str:
        """Undo what an interrupted earlier write left: a model moved aside whose replacement never
        arrived is put back; stale staging and replaced folders are removed."""
        notes = []
        replaced = self._siblings("replaced")
        if replaced and not os.path.lexists(self.target):
            newest = max(replaced, key=lambda p: p.stat().st_mtime_ns)
            os.rename(newest, self.target)
            replaced.remove(newest)
            notes.append(f"restored {self.target} from an interrupted write")
        for p in replaced + self._siblings("staging"):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p.name}")
        return "; ".join(notes)

    def swap(self, staging: Path) -> None:
        """Make `staging` be REPO/MODEL: two renames with SIGINT/SIGTERM held between them."""
        fsync_tree(staging)
        aside = self.path(f"replaced-{secrets.token_hex(4)}")
        try:
            with deferred_signals():
                if os.path.lexists(self.target):
                    os.rename(self.target, aside)
                os.rename(staging, self.target)
        except OSError as exc:
            raise ArtifactError(
                f"cannot move the new model into {self.target}: {exc.strerror or exc} (REPO and "
                "its parent folder must be on one filesystem)"
            ) from None
        finally:
            if os.path.lexists(aside):
                if os.path.lexists(self.target):
                    shutil.rmtree(aside, ignore_errors=True)
                else:  # the second rename failed: put the old model back
                    os.rename(aside, self.target)


def repository_target(repo: Path, name: str) -> Path:
    """REPO/<name>, absolute; refused when REPO is a file."""
    if os.path.lexists(repo) and not repo.is_dir():
        raise ArtifactError(f"--output {repo} is a file; pass a directory for the model repository")
    return Path(os.path.abspath(repo)) / name


def check_replaceable(target: Path, force: bool) -> bool:
    """Whether `target` exists (and may be replaced); refuses what must not be."""
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory; remove it or choose another --name")
    if not force:
        raise ArtifactError(f"{target} exists; pass --force to replace that model, or choose another --name")
    if not (target / CONFIG_NAME).is_file() and any(target.iterdir()):
        raise ArtifactError(
            f"{target} holds files but no {CONFIG_NAME}: it is not a Triton model folder, so it is "
            "not replaced even with --force; move it away or choose another --name"
        )
    return True


def write_triton_repository(
    artifact_dir: str | Path, repo: str | Path, options: RepoOptions | None = None, *, force: bool = False
) -> RepoResult:
    """Write the export in `artifact_dir` as one model of the Triton repository `repo`.

    Options are checked and the export read (manifest, graph sha256, engine) before anything is
    written; the model folder appears whole or not at all (see the module docstring)."""
    from filelock import FileLock, Timeout

    opts = (options or RepoOptions()).validate()
    art = read_artifact(artifact_dir, want_plan=opts.flavour == "tensorrt")
    name = opts.name or art.model
    if opts.name is None:
        RepoOptions(name=name).validate()  # the manifest's model name must be servable too
    cfg = model_config(art, opts, name)
    text = render_config(cfg)

    root = Path(repo)
    target = repository_target(root, name)
    side = _Side(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the repository {root}: {exc.strerror or exc}") from None
    lock = FileLock(str(side.path("lock")), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise ArtifactError(
            f"{target} is being written by another slab-deploy; wait for it or choose another --name"
        ) from None
    except OSError as exc:
        raise ArtifactError(f"cannot write beside {root}: {exc.strerror or exc}") from None
    try:
        notes = [n for n in [side.recover()] if n]
        replaced = check_replaceable(target, force)
        staging = side.staging()
        try:
            files = _fill(staging, art, opts, text)
            raise_if_interrupted()
            side.swap(staging)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()  # the lock file stays: removing it would race another writer
    if art.precision == "fp16" and not opts.fp16_io:
        notes.append(
            "fp16 graph with float32 I/O, as exported (--fp16-io sends FP16 over the wire with the "
            "python flavour)"
        )
    return RepoResult(Path(root), Path(root) / name, name, opts.flavour, cfg, text, files, replaced, notes)


def _fill(staging: Path, art: Any, opts: RepoOptions, text: str) -> dict[str, dict[str, Any]]:
    version = staging / str(opts.version)
    version.mkdir()
    files = {
        CONFIG_NAME: _write_text(staging / CONFIG_NAME, text),
        MANIFEST_NAME: _copy_hashed(art.manifest_path, staging / MANIFEST_NAME),
    }
    if opts.flavour == "tensorrt":
        files[f"{opts.version}/{PLAN_NAME}"] = _copy_hashed(art.plan, version / PLAN_NAME)
        files[ENGINE_INFO_NAME] = _copy_hashed(art.folder / ENGINE_INFO_NAME, staging / ENGINE_INFO_NAME)
    else:
        entry = _copy_hashed(art.onnx, version / ONNX_NAME)
        if entry["sha256"] != art.onnx_sha256:
            raise ArtifactError(f"{art.onnx} changed while it was copied; nothing was written, run again")
        files[f"{opts.version}/{ONNX_NAME}"] = entry
    if opts.flavour == "python":
        files[f"{opts.version}/{PYTHON_MODEL_NAME}"] = _write_text(
            version / PYTHON_MODEL_NAME, python_model_source()
        )
    return files
