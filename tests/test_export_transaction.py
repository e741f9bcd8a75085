"""Export as a transaction on its output directory: a failed or interrupted export leaves an earlier
export byte-for-byte intact, a second export into the same directory is refused by the lock, files
follow the umask, the manifest states the file's real opset, and bad options cost nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
import torch
from filelock import FileLock
from helpers import break_the_fold, run_cli

from slab_deploy.errors import ArtifactError, ExportError, ExportParityError, UnsupportedInputError
from slab_deploy.export import onnx_export
from slab_deploy.export.api import ExportOptions, ExportTarget, export_model
from slab_deploy.export.onnx_export import ImageModel, file_opset, onnx_from_torch
from slab_deploy.models import create_model
from slab_deploy.utils import sha256_file
from slab_deploy.weights import random_checkpoint

NAME = "test_slab_deit"
# The TorchScript exporter without a simplifier: the fastest real export of a tiny model, for tests
# about the output directory rather than the graph.
FAST = dict(exporter="torchscript", simplifier="none")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    """Staging/replaced siblings and partial files anywhere below `parent`."""
    return sorted(
        str(p.relative_to(parent)) for p in parent.rglob("*")
        if ".staging-" in p.name or ".replaced-" in p.name or p.name.endswith(".partial")
        or p.name.startswith(".exporter-output")
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(NAME, tmp_path_factory.mktemp("ckpt") / "c.pth", seed=5)


def test_failed_force_reexport_leaves_the_good_export_untouched(ckpt: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is filled without --force
    res = export_model(NAME, ckpt, out, ExportOptions(**FAST))
    assert res.passed and res.onnx_path == out / "model.onnx"
    good = _files(out)
    assert set(good) == {"model.onnx", "model.unsimplified.onnx", "manifest.json"}
    m = json.loads(good["manifest.json"])
    for name in ("model.onnx", "model.unsimplified.onnx"):
        assert m["files"][name] == {"sha256": sha256_file(out / name), "bytes": len(good[name])}

    break_the_fold(monkeypatch)  # the folded head's bias moves: parity must fail
    with pytest.raises(ExportParityError) as ei:
        export_model(NAME, ckpt, out, ExportOptions(**FAST, seed=1), force=True)
    failed = tmp_path / "out.failed"
    assert (ei.value.failed_dir == failed and f"{out} is unchanged" in str(ei.value)
            and str(failed) in str(ei.value))
    assert _files(out) == good  # every byte of the earlier export, the manifest included
    fm = json.loads((failed / "manifest.json").read_text())
    assert (fm["status"] == "parity-failed" and fm["onnx"] == "model.parity-failed.onnx"
            and fm["parity"]["seed"] == 1)
    assert not (failed / "model.onnx").exists()

    # a second failure replaces the earlier failed set (ours), never the export
    with pytest.raises(ExportParityError):
        export_model(NAME, ckpt, out, ExportOptions(**FAST, seed=2), force=True)
    assert json.loads((failed / "manifest.json").read_text())["parity"]["seed"] == 2
    assert _files(out) == good
    assert _leftovers(tmp_path) == []


def test_a_directory_with_user_files_is_never_replaced(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.onnx").write_bytes(b"an old graph")
    for force in (False, True):
        with pytest.raises(ArtifactError, match=r"not export artefacts \(notes.txt\)"):
            export_model(NAME, ckpt, out, ExportOptions(**FAST), force=force)
    assert _files(out) == {"model.onnx": b"an old graph", "notes.txt": b"mine"}
    assert _leftovers(tmp_path) == []


def test_an_earlier_export_needs_force(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_model(NAME, ckpt, out, ExportOptions(**FAST))
    before = _files(out)
    with pytest.raises(ArtifactError, match="holds an earlier export; pass --force"):
        export_model(NAME, ckpt, out, ExportOptions(**FAST))
    assert _files(out) == before
    res = export_model(NAME, ckpt, out, ExportOptions(**FAST, seed=7), force=True)
    assert (json.loads((out / "manifest.json").read_text())["parity"]["seed"] == 7
            == res.manifest["parity"]["seed"])
    assert _leftovers(tmp_path) == []


def test_force_replaces_an_export_that_holds_an_engine(ckpt: Path, tmp_path: Path) -> None:
    """`slab-deploy build` adds model.plan and engine.json to an export: they are export artefacts,
    so --force replaces the directory (engine and record go with the graph they were built from)."""
    out = tmp_path / "out"
    export_model(NAME, ckpt, out, ExportOptions(**FAST))
    (out / "model.plan").write_bytes(b"plan bytes of the earlier graph")
    (out / "engine.json").write_text("{}")
    with pytest.raises(ArtifactError, match="holds an earlier export; pass --force"):
        export_model(NAME, ckpt, out, ExportOptions(**FAST))
    export_model(NAME, ckpt, out, ExportOptions(**FAST, seed=7), force=True)
    assert not (out / "model.plan").exists() and not (out / "engine.json").exists()
    assert json.loads((out / "manifest.json").read_text())["parity"]["seed"] == 7
    assert _leftovers(tmp_path) == []


def test_the_lock_refuses_a_second_writer(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with FileLock(str(tmp_path / ".out.lock")):  # held as a running export holds it
        t0 = time.perf_counter()
        with pytest.raises(ArtifactError,
                           match=r"out is being written by another export \(lock .*\.out\.lock\)"):
            export_model(NAME, ckpt, out, ExportOptions(**FAST))
        assert time.perf_counter() - t0 < 10
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_interrupted_swap_is_repaired_to_the_old_export(ckpt: Path, tmp_path: Path) -> None:
    """The states a hard crash (SIGKILL, power) can leave at each step of the swap. The states are
    laid out by hand with real artefacts, since no signal can be timed between two renames."""
    out = tmp_path / "out"
    export_model(NAME, ckpt, out, ExportOptions(**FAST))
    good = _files(out)
    # killed while building: a staging directory with half a graph
    stale = tmp_path / ".out.staging-dead1"
    stale.mkdir()
    (stale / "model.unsimplified.onnx").write_bytes(b"half")
    # killed between the two renames: no `out`, the old set aside, the new one complete in staging
    os.rename(out, tmp_path / ".out.replaced-dead2")
    with pytest.raises(ArtifactError, match="holds an earlier export"):
        export_model(NAME, ckpt, out, ExportOptions(**FAST))
    assert _files(out) == good and _leftovers(tmp_path) == []
    # killed after the swap, while removing the old set: `out` is the new one, the old half-removed
    aside = tmp_path / ".out.replaced-dead3"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    export_model(NAME, ckpt, out, ExportOptions(**FAST, seed=3), force=True)
    assert json.loads((out / "manifest.json").read_text())["parity"]["seed"] == 3
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("opset, exporter, want_exporter", [
    (17, "auto", "torchscript"),
    pytest.param(21, "auto", "dynamo", marks=pytest.mark.slow),  # the torch.export-based exporter: ~5-9 s
])
def test_the_manifest_states_the_opset_the_file_holds(ckpt: Path, tmp_path: Path, opset: int, exporter: str,
                                                      want_exporter: str) -> None:
    res = export_model(NAME, ckpt, tmp_path / "out",
                       ExportOptions(opset=opset, exporter=exporter, simplifier="none"))
    g = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert file_opset(g) == opset == res.manifest["opset"] == res.manifest["export"]["opset"]
    assert res.manifest["export"]["exporter"] == want_exporter
    if want_exporter == "torchscript":
        assert "outside the torch.export-based exporter's 18-25" in res.manifest["export"]["fallback_reason"]


def test_an_exporter_that_writes_another_opset_is_caught(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Let the torch.export-based exporter be asked for opset 17 (the range check is widened): for
    an SLA model its down-conversion fails and it really writes 18, and onnx_from_torch must refuse
    the file rather than call it 17."""
    monkeypatch.setitem(onnx_export.OPSETS, "dynamo", (17, 25))
    model = ImageModel(create_model(NAME))
    with pytest.raises(ExportError, match="wrote opset 18, not the requested 17"):
        onnx_from_torch(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32), opset=17, exporter="dynamo")


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(opset=7, exporter="dynamo"),
         "--exporter dynamo cannot write opset 7 .*use --exporter torchscript"),
        (dict(opset=6), "--opset 6 cannot be written: .* 18-25, .* 7-20"),
        (dict(opset=22, exporter="torchscript"),
         "--exporter torchscript cannot write opset 22 .*use --exporter dynamo"),
        (dict(opset=26), "--opset 26 cannot be written"),
        (dict(simplifier="onnxslimm"),
         "unsupported --simplifier 'onnxslimm'; use one of auto, onnxslim, onnxsim, none"),
        (dict(exporter="jit"), "unsupported --exporter 'jit'"),
        (dict(precision="int4"), "unsupported precision 'int4'"),
        (dict(sla_policy="fp8"), "unsupported --sla-policy 'fp8'"),
        (dict(img_size=0), "--img-size must be a whole number >= 1, not 0"),
        (dict(img_size=10**6), "--img-size must be at most"),
        (dict(img_size=36), r"--img-size 36 does not fit test_slab_deit "
                            r"\(img_size \(36, 36\) must be a multiple of the patch size 8\)"),
        (dict(batch=0), "--batch must be a whole number >= 1, not 0"),
        (dict(batch=2.5), "--batch must be a whole number >= 1, not 2.5"),
        (dict(batch=True), "--batch must be a whole number >= 1, not True"),
        (dict(batch=10**9), r"test_slab_deit at batch 1000000000 needs about .* of memory .* available: "
                            r"use a smaller --batch or --dynamic-batch"),
        (dict(img_size=8192),
         r"test_slab_deit at batch 3 at 8192x8192 px needs about .*: use a smaller --img-size"),
    ],
)
def test_bad_options_are_refused_before_any_work(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 opts: dict, match: str) -> None:
    import slab_deploy.export.options as options

    # the host's memory, fixed: cases must not depend on the machine
    monkeypatch.setattr(options, "available_memory", lambda: 8 * 2**30)
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedInputError, match=match):
        export_model(NAME, ckpt, tmp_path / "out", ExportOptions(**opts))
    assert time.perf_counter() - t0 < 5  # no load, no export
    assert list(tmp_path.iterdir()) == []  # not even the lock file


def test_an_image_size_the_checkpoint_does_not_fit_blames_the_image_size(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedInputError) as ei:
        export_model(NAME, ckpt, tmp_path / "out", ExportOptions(img_size=48))
    msg = str(ei.value)
    assert (msg.startswith("--img-size 48 does not fit test_slab_deit (")
            and "this checkpoint fits --img-size 32" in msg)
    assert "positional_encoding" in msg and str(ckpt) not in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("args, match", [
    (["--batch", "abc"], "--batch must be a whole number, not 'abc'"),
    (["--batch", "99999999999"], "needs about"),
    (["--img-size", "2x"], "--img-size must be a whole number"),
    (["--opset", "eighteen"], "--opset must be a whole number"),
])
def test_cli_bad_numbers_are_one_line_exit_1(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch, args: list[str], match: str) -> None:
    code, out, err = run_cli(["export", "-m", NAME, "-o", str(tmp_path / "out"), *args], capsys, monkeypatch)
    assert code == 1 and match in err and "Traceback" not in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) <= 3  # one message (rich may wrap it)
    assert list(tmp_path.iterdir()) == []


_UMASK_SCRIPT = textwrap.dedent("""
    import os, stat, sys
    from pathlib import Path
    from slab_deploy.export.api import ExportOptions, ExportTarget, export_model
    from slab_deploy.utils import atomic_write
    root = Path(sys.argv[1])
    def mode(p): return oct(stat.S_IMODE(os.stat(p).st_mode))
    os.umask(0o022)
    export_model("test_slab_deit", sys.argv[2], root / "a",
                 ExportOptions(exporter="torchscript", simplifier="none"))
    print("a", mode(root / "a"), *sorted(mode(p) for p in (root / "a").iterdir()))
    os.umask(0o077)
    with ExportTarget(root / "b") as t:
        (t.staging / "manifest.json").write_text("{}")
        t.commit()
    with atomic_write(root / "b.json") as tmp:
        tmp.write_text("{}")
    print("b", mode(root / "b"), mode(root / "b" / "manifest.json"), mode(root / "b.json"))
""")


def test_artefacts_follow_the_umask(ckpt: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _UMASK_SCRIPT, str(tmp_path), str(ckpt)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(ln.split(" ", 1) for ln in r.stdout.strip().splitlines())
    assert lines["a"] == "0o755 0o644 0o644 0o644"
    assert lines["b"] == "0o700 0o600 0o600"


@pytest.mark.parametrize("sig, code", [
    (signal.SIGTERM, 143),
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # the same path; ~8 s each
])
def test_a_signal_mid_export_cleans_up_and_keeps_the_earlier_export(ckpt: Path, tmp_path: Path, sig: int,
                                                                    code: int) -> None:
    """A real `slab-deploy export --force` over a good export, signalled once its staging directory
    appears (it then loads, folds and runs the torch.export-based exporter for seconds); meanwhile a
    second export into the same directory is refused by the lock. Afterwards: exit 128 + signal, one
    line, the earlier export intact, nothing left."""
    out = tmp_path / "out"
    export_model(NAME, ckpt, out, ExportOptions(**FAST))
    good = _files(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "slab_deploy.cli", "export", "-m", NAME, "-c", str(ckpt), "-o", str(out),
         "--force", "--exporter", "dynamo", "--simplifier", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.staging-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never reached its staging directory"
            time.sleep(0.05)
        with pytest.raises(ArtifactError, match="being written by another export"):
            export_model(NAME, ckpt, out, ExportOptions(**FAST), force=True)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1
    assert _files(out) == good
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out.failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
    with ExportTarget(out, force=True):  # and the lock was released
        pass


def test_a_signal_during_the_swap_waits_for_both_renames(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM sent between the two renames of the swap (a real signal, to this process) is held
    until the new directory is in place and the old one removed, then delivered."""
    from slab_deploy import utils

    class Stop(BaseException):
        pass

    def stop(signum, frame):  # type: ignore[no-untyped-def]
        raise Stop

    target = tmp_path / "out"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    staging = utils.make_staging(target)
    (staging / "manifest.json").write_text("new")
    real_rename = os.rename
    calls: list[str] = []

    def rename(src, dst):  # type: ignore[no-untyped-def]
        real_rename(src, dst)
        calls.append(Path(dst).name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # a Python handler would have run by now, were it not held

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        monkeypatch.setattr(utils.os, "rename", rename)
        with pytest.raises(Stop):
            utils.swap_in(staging, target)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 2 and calls[1] == "out"
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_signal_a_finaliser_swallows_still_stops_before_anything_is_renamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python drops an exception raised while a finaliser runs (a SIGTERM that lands in
    `ZipFile.__del__` did exactly that mid-export): the signal is kept, and the next step that
    cannot be undone (here an atomic write's rename) raises it instead of going ahead. Python's
    "Exception ignored in ..." traceback for it is not printed; any other unraisable still is."""
    from slab_deploy.utils import Interrupted, atomic_write, signals_interrupt

    reported: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))

    class Finaliser:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the Python-level handler runs here, inside the finaliser
                pass

    class Broken:
        def __del__(self) -> None:
            raise ValueError("a finaliser's own error")

    target = tmp_path / "kept.txt"
    target.write_text("earlier")
    with pytest.raises(Interrupted) as ei, signals_interrupt():
        Finaliser()  # made and dropped at once: its __del__ gets the signal
        assert reported == []  # dropped quietly: no traceback on stderr
        Broken()
        assert len(reported) == 1 and isinstance(reported[0], ValueError)
        with atomic_write(target) as tmp:
            tmp.write_text("new")
    assert ei.value.signum == signal.SIGTERM
    assert sys.unraisablehook is not None and sys.unraisablehook.__name__ == "<lambda>"  # restored
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
