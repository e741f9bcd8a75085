"""The parity ladder behind `slab-deploy check`.

Same inputs through every rung, each compared with the reference (the checkpoint model in eval
mode, torch fp32 on the CPU):

  fold        folded torch model
  onnx        exported graph before simplification, ONNX Runtime CPU with graph optimisations off
  simplified  deployed (simplified) graph, ONNX Runtime CPU with graph optimisations off
  ort_cpu     deployed graph, ONNX Runtime CPU with all graph optimisations
  ort_cuda    deployed graph on ONNX Runtime CUDA (fp32 and fp16 artefacts)
  tensorrt    TensorRT engine built from the deployed graph

Rungs whose runtime is missing are skipped with the reason. The verdict names the first rung that
broke, so "which step broke it" has an answer.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from slab_deploy.errors import ArtifactError, ConfigError, ParityError
from slab_deploy.parity import compare, judge
from slab_deploy.tolerances import Tolerance, tolerance_for

RUNGS = ("fold", "onnx", "simplified", "ort_cpu", "ort_cuda", "tensorrt")
BACKENDS = ("torch", "onnx", "ort-cpu", "ort-cuda", "tensorrt")
_RUNG_BACKEND = {"fold": "torch", "onnx": "onnx", "simplified": "onnx", "ort_cpu": "ort-cpu", "ort_cuda": "ort-cuda", "tensorrt": "tensorrt"}
_METRICS = ("max_rel", "min_cosine", "min_sqnr_db", "min_top1")


class _Graphs(TypedDict):
    """The ONNX files of one exported precision."""

    deployed: Path
    unsimplified: Path | None  # None when the export did not keep model.unsimplified.onnx


@dataclass
class RungResult:
    rung: str
    precision: str
    status: str  # pass | fail | skipped
    runner: str = ""
    artifact: str = ""
    reason: str = ""
    metrics: dict[str, Any] | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    needed: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.rung} ({self.precision})"


@dataclass
class CheckReport:
    model: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    untrained: bool
    inputs: dict[str, Any]
    rungs: list[RungResult]
    versions: dict[str, Any]
    replay_command: str = ""
    artifacts_precision: dict[str, Any] | None = None  # the export manifest's precision block (--artifacts)

    @property
    def first_failure(self) -> RungResult | None:
        return next((r for r in self.rungs if r.status == "fail"), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    def verdict(self) -> str:
        f = self.first_failure
        ran = sum(r.status != "skipped" for r in self.rungs)
        if f is None:
            return f"PASS: {ran} rungs agree with the checkpoint model ({len(self.rungs) - ran} skipped)"
        return f"FAIL at rung {f.label}: {'; '.join(f.failures)} (first rung that broke; earlier rungs passed)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "untrained": self.untrained,
            "inputs": self.inputs,
            "passed": self.passed,
            "verdict": self.verdict(),
            "first_failure": self.first_failure.rung if self.first_failure else None,
            "rungs": [asdict(r) for r in self.rungs],
            "versions": self.versions,
            "replay_command": self.replay_command,
            "artifacts_precision": self.artifacts_precision,
        }

    def to_markdown(self) -> str:
        lines = [
            f"# slab-deploy check: {self.model}",
            "",
            f"**{self.verdict()}**",
            "",
            f"- checkpoint: `{self.checkpoint or 'embedded default (UNTRAINED)'}` (sha256 `{(self.checkpoint_sha256 or '')[:16]}`)",
            f"- inputs: {self.inputs.get('source')} ({self.inputs.get('count')} images, seed {self.inputs.get('seed')})",
            "- reference: checkpoint model in eval mode, torch fp32 on the CPU",
            "",
            "| rung | precision | status | max abs | max rel | mean abs | cosine | SQNR dB | top-1 | top-5 | tolerance | needed to pass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rungs:
            m = r.metrics or {}

            def f(k: str, fmt: str, m: dict[str, Any] = m) -> str:
                v = m.get(k)
                return "-" if v is None else format(v, fmt)

            tol = ", ".join(f"{k}={v:g}" for k, v in r.tolerance.items()) or "-"
            need = ", ".join(f"{k}={v:.3g}" for k, v in r.needed.items()) or "-"
            status = r.status if r.status != "skipped" else f"skipped: {r.reason}"
            lines.append(
                f"| {r.rung} | {r.precision} | {status} | {f('max_abs', '.2e')} | {f('max_rel', '.2e')} | {f('mean_abs', '.2e')} "
                f"| {f('cosine', '.6f')} | {f('sqnr_db', '.1f')} | {f('top1', '.3f')} | {f('top5', '.3f')} | {tol} | {need} |"
            )
        if self.replay_command:
            lines += ["", "Replay locally:", "", f"    {self.replay_command}"]
        return "\n".join(lines) + "\n"


def parse_tolerance_overrides(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """`RUNG:METRIC=VALUE` strings -> {rung: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        try:
            rung, rest = item.split(":", 1)
            metric, value = rest.split("=", 1)
            v = float(value)
        except ValueError:
            raise ConfigError(f"--tolerance {item!r}: expected RUNG:METRIC=VALUE, e.g. ort_cuda:min_cosine=0.995") from None
        if rung not in RUNGS:
            raise ConfigError(f"--tolerance {item!r}: unknown rung {rung!r}; rungs are {', '.join(RUNGS)}")
        if metric not in _METRICS:
            raise ConfigError(f"--tolerance {item!r}: unknown metric {metric!r}; metrics are {', '.join(_METRICS)}")
        out.setdefault(rung, {})[metric] = v
    return out


def load_images(folder: str | Path, preprocessing: dict[str, Any], limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images of `folder` through the model's own preprocessing: resize the shorter side, centre
    crop, scale to [0, 1], normalise with mean/std. Returns (N, 3, H, W) float32 and the file names."""
    from slab_deploy._deps import require

    Image = require("PIL.Image", "--images")
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    if not files:
        raise ConfigError(f"--images {folder} holds no .jpg/.jpeg/.png/.bmp/.webp files")
    files = files[:limit] if limit else files
    _, h, w = preprocessing["input_size"]
    short = preprocessing["resize_shorter_to"]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(preprocessing["interpolation"], Image.BICUBIC)
    mean = np.array(preprocessing["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.array(preprocessing["std"], dtype=np.float32).reshape(3, 1, 1)
    batch = []
    for p in files:
        try:
            img = Image.open(p).convert("RGB")
        except Exception as exc:
            raise ConfigError(f"cannot read image {p}: {exc}") from None
        iw, ih = img.size
        scale = short / min(iw, ih)
        img = img.resize((max(w, round(iw * scale)), max(h, round(ih * scale))), resample)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        batch.append((arr - mean) / std)
    return np.stack(batch).astype(np.float32), [p.name for p in files]


def run_check(
    model_name: str,
    checkpoint: str | Path | None,
    *,
    artifacts: str | Path | None = None,
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = ("fp32",),
    inputs: int = 8,
    images: str | Path | None = None,
    replay: str | Path | None = None,
    seed: int = 0,
    tolerance: dict[str, dict[str, float]] | None = None,
    ema: bool = False,
    allow_unfinished_prepbn: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Run the ladder and return the report (it does not raise on parity failure: see `raise_for_verdict`)."""
    import torch

    from slab_deploy.export.api import (
        ExportOptions,
        export_model,
        preprocessing,
        tool_versions,
    )
    from slab_deploy.models import checkpoint_info
    from slab_deploy.passes import fold_model
    from slab_deploy.pipeline import load_model

    say = progress or (lambda _s: None)
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ConfigError(f"unknown backend(s) {', '.join(bad)}; choose from {', '.join(BACKENDS)}")
    for p in precisions:
        if p not in ("fp32", "fp16"):
            raise ConfigError(f"unknown precision {p!r}; check supports fp32 and fp16")
    say("loading checkpoint")
    ref = load_model(model_name, checkpoint, ema=ema, allow_unfinished_prepbn=allow_unfinished_prepbn)
    info = checkpoint_info(ref)
    pre = preprocessing(ref)

    # ---- inputs
    if replay is not None:
        data = np.load(replay)
        x = np.asarray(data["inputs"], dtype=np.float32)
        src = {"source": f"replay of {replay}", "count": int(x.shape[0]), "seed": None}
    elif images is not None:
        x, names = load_images(images, pre, limit=inputs if inputs else None)
        src = {"source": f"images from {images}", "count": len(names), "files": names, "seed": None}
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(inputs, *pre["input_size"], generator=g).numpy()
        src = {"source": "seeded random normal images", "count": inputs, "seed": seed}
    if tuple(x.shape[1:]) != tuple(pre["input_size"]):
        raise ConfigError(f"inputs have shape {tuple(x.shape[1:])}, {model_name} expects {tuple(pre['input_size'])}")

    say("reference forward")
    with torch.no_grad():
        reference = ref(torch.from_numpy(x)).float().numpy()
    outputs: dict[str, np.ndarray] = {"reference": reference}
    rungs: list[RungResult] = []

    def record(rung: str, precision: str, fn: Callable[[], tuple[str, str, np.ndarray]], backend: str) -> None:
        from slab_deploy.runtime.base import UnsupportedBackend

        if backend not in backends:
            rungs.append(RungResult(rung, precision, "skipped", reason=f"backend {backend} not selected"))
            return
        t0 = time.perf_counter()
        try:
            runner, artifact, out = fn()
        except UnsupportedBackend as exc:
            rungs.append(RungResult(rung, precision, "skipped", reason=str(exc)))
            return
        tol: Tolerance = tolerance_for(rung, precision, tolerance)
        m = compare(reference, out)
        v = judge(m, tol)
        outputs[f"{rung}.{precision}"] = out
        rungs.append(
            RungResult(rung, precision, "pass" if v.passed else "fail", runner, artifact, "", m.to_dict(), tol.to_dict(),
                       v.failures, v.needed, time.perf_counter() - t0)
        )

    # ---- fold (torch)
    say("folding")

    def run_fold() -> tuple[str, str, np.ndarray]:
        from slab_deploy.runtime.torch_runner import TorchRunner

        folded, _ = fold_model(ref)
        runner = TorchRunner(folded, "cpu", "fp32")
        return f"torch {runner.info.details['torch']} cpu fp32", "in memory", runner(x)

    record("fold", "fp32", run_fold, "torch")

    # ---- artefacts: given, or exported now into a temporary directory
    tmp: tempfile.TemporaryDirectory[str] | None = None
    graphs: dict[str, _Graphs] = {}
    try:
        if artifacts is not None:
            graphs = _graphs_from_artifacts(Path(artifacts), model_name)
            graphs = {p: g for p, g in graphs.items() if p in precisions} or graphs
        else:
            tmp = tempfile.TemporaryDirectory(prefix="slab-deploy-check-")
            for prec in precisions:
                say(f"exporting {prec}")
                d = Path(tmp.name) / prec
                try:
                    export_model(model_name, checkpoint, d, ExportOptions(precision=prec), force=True, ema=ema,
                                 allow_unfinished_prepbn=allow_unfinished_prepbn)
                except ParityError:
                    pass  # the ladder below shows where
                graphs[prec] = _graphs_from_artifacts(d, model_name)[prec]
        for prec, graph in graphs.items():
            unsimplified, deployed = graph["unsimplified"], graph["deployed"]
            say(f"ONNX rungs ({prec})")
            record("onnx", prec, _ort_rung(unsimplified, x, "cpu", "none", prec, "exported graph (unsimplified)"), "onnx")
            record("simplified", prec, _ort_rung(deployed, x, "cpu", "none", prec), "onnx")
            record("ort_cpu", prec, _ort_rung(deployed, x, "cpu", "all", prec), "ort-cpu")
            say(f"ONNX Runtime CUDA ({prec})")
            record("ort_cuda", prec, _ort_rung(deployed, x, "cuda", "all", prec), "ort-cuda")
            say(f"TensorRT ({prec})")
            record("tensorrt", prec, _trt_rung(deployed, x, prec), "tensorrt")
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = CheckReport(
        model=model_name,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_sha256=info.sha256 if info else None,
        untrained=bool(getattr(ref, "untrained", False)),
        inputs=src,
        rungs=rungs,
        versions=tool_versions(),
        artifacts_precision=_manifest_precision(Path(artifacts)) if artifacts is not None else None,
    )
    report._inputs = x  # type: ignore[attr-defined]
    report._outputs = outputs  # type: ignore[attr-defined]
    return report


def _manifest_precision(d: Path) -> dict[str, Any] | None:
    try:
        prec = json.loads((d / "manifest.json").read_text()).get("precision")
    except (OSError, json.JSONDecodeError):
        return None
    return prec if isinstance(prec, dict) else None


def _graphs_from_artifacts(d: Path, model_name: str) -> dict[str, _Graphs]:
    from slab_deploy.export.api import UNSIMPLIFIED_NAME

    manifest = d / "manifest.json"
    if not d.is_dir():
        raise ArtifactError(f"--artifacts {d} is not a directory; pass the output directory of `slab-deploy export`")
    if not manifest.exists():
        raise ArtifactError(f"{d} has no manifest.json; pass the output directory of `slab-deploy export`")
    try:
        m = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest} is not valid JSON ({exc}); export again") from None
    if m.get("model") != model_name:
        raise ArtifactError(f"{d} holds an export of {m.get('model')!r}, not {model_name!r}: pass --model {m.get('model')}")
    deployed = d / m.get("onnx", "model.onnx")
    if not deployed.exists():
        raise ArtifactError(f"{deployed} is missing; export again")
    un = d / m.get("unsimplified_onnx", UNSIMPLIFIED_NAME)
    return {m.get("precision", {}).get("mode", "fp32"): {"deployed": deployed, "unsimplified": un if un.exists() else None}}


def _ort_rung(path: Path | None, x: np.ndarray, provider: str, opt: str, precision: str,
              what: str = "") -> Callable[[], tuple[str, str, np.ndarray]]:
    def fn() -> tuple[str, str, np.ndarray]:
        from slab_deploy.runtime.base import UnsupportedBackend
        from slab_deploy.runtime.ort import ORTRunner

        if path is None:
            raise UnsupportedBackend(f"no {what or 'graph'} in the artefacts (export keeps it as model.unsimplified.onnx)")
        r = ORTRunner(path, provider, graph_opt=opt, precision=precision)
        return f"onnxruntime {r.info.details['onnxruntime']} {provider} (graph opt {opt})", path.name, r(x)

    return fn


def _trt_rung(path: Path, x: np.ndarray, precision: str) -> Callable[[], tuple[str, str, np.ndarray]]:
    def fn() -> tuple[str, str, np.ndarray]:
        from slab_deploy.runtime.tensorrt import TensorRTRunner

        r = TensorRTRunner.from_onnx(path, precision=precision)
        return f"tensorrt {r.info.details.get('tensorrt')}", path.name, r(x)

    return fn


def write_reports(report: CheckReport, out_dir: str | Path, replay_base: str) -> dict[str, Path]:
    """report.json, report.md and io.npz (inputs and every rung's outputs) into `out_dir`."""
    from slab_deploy.utils import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "io.npz"
    report.replay_command = f"{replay_base} --replay {npz}"
    with atomic_write(npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, inputs=report._inputs, **{k.replace(".", "_"): v for k, v in report._outputs.items()})  # type: ignore[attr-defined]
    paths = {"json": out / "report.json", "markdown": out / "report.md", "npz": npz}
    with atomic_write(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    with atomic_write(paths["markdown"]) as tmp:
        tmp.write_text(report.to_markdown())
    return paths


def raise_for_verdict(report: CheckReport) -> None:
    f = report.first_failure
    if f is not None:
        raise ParityError(report.verdict())
