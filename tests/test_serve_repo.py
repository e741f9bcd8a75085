"""Triton model repositories from real exports of the demo model: every generated config.pbtxt is
parsed by Triton's own ModelConfig protobuf (tritonclient.grpc.model_config_pb2) and compared with
the manifest; writing is one transaction per model (refused overwrite, nothing half-written)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from slab_deploy.errors import ArtifactError, ConfigError
from slab_deploy.serve import RepoOptions, write_triton_repository

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
from google.protobuf import text_format  # noqa: E402  (protobuf comes with tritonclient[grpc])

DEMO = "slab_deit_demo"


@functools.cache
def _export(root: str, batch: int | None, precision: str) -> Path:
    from slab_deploy.export.api import ExportOptions, export_model

    out = Path(root) / f"{DEMO}-{precision}-{batch or 'dyn'}"
    # TorchScript: the quicker exporter; what is served does not depend on which one wrote the graph
    export_model(DEMO, None, out, ExportOptions(batch=batch, precision=precision, exporter="torchscript"))
    return out


def demo_export(
    tmp_path_factory: pytest.TempPathFactory, *, batch: int | None = None, precision: str = "fp32"
) -> Path:
    """A real `slab-deploy export` of the demo model, made once per test session and per variant
    (shared read-only by the serve tests)."""
    return _export(str(tmp_path_factory.getbasetemp() / "serve-exports"), batch, precision)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_export(tmp_path_factory)


def manifest(d: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((d / "manifest.json").read_text())


def parsed(model_dir: Path) -> pb2.ModelConfig:
    """config.pbtxt through Triton's own ModelConfig message (raises on anything Triton would not parse)."""
    msg = pb2.ModelConfig()
    text_format.Parse((model_dir / "config.pbtxt").read_text(), msg)
    return msg


def _io_matches(cfg: pb2.ModelConfig, m: dict, dtype: str = "TYPE_FP32") -> None:  # type: ignore[type-arg]
    (inp,), (out,) = m["io"]["inputs"], m["io"]["outputs"]
    assert [i.name for i in cfg.input] == [inp["name"]] and [o.name for o in cfg.output] == [out["name"]]
    assert list(cfg.input[0].dims) == inp["shape"][1:] and list(cfg.output[0].dims) == out["shape"][1:]
    assert pb2.DataType.Name(cfg.input[0].data_type) == dtype == pb2.DataType.Name(cfg.output[0].data_type)


@pytest.mark.parametrize("flavour", ["onnxruntime", "python"])
def test_repository_layout_and_config_from_the_manifest(exported: Path, tmp_path: Path, flavour: str) -> None:
    opts = RepoOptions(
        flavour=flavour, max_batch=16, preferred_batch=(4, 8), queue_delay_us=500, instances=3, threads=2
    )
    res = write_triton_repository(exported, tmp_path / "repo", opts)
    m = manifest(exported)
    model_dir = tmp_path / "repo" / m["model"]
    assert res.model_dir == model_dir and res.name == m["model"]
    cfg = parsed(model_dir)
    assert cfg.name == m["model"] and cfg.max_batch_size == 16
    _io_matches(cfg, m)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [
        (3, "KIND_CPU")
    ]
    assert cfg.parameters["intra_op_thread_count"].string_value == "2"
    if flavour == "onnxruntime":
        assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
        assert sorted(os.listdir(model_dir / "1")) == ["model.onnx"]
    else:
        assert cfg.backend == "python" and not cfg.platform
        assert sorted(os.listdir(model_dir / "1")) == ["model.onnx", "model.py"]
        assert "class TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    assert (model_dir / "manifest.json").read_bytes() == (exported / "manifest.json").read_bytes()
    assert (model_dir / "1" / "model.onnx").read_bytes() == (exported / "model.onnx").read_bytes()
    assert res.files["1/model.onnx"]["sha256"] == m["files"]["model.onnx"]["sha256"]
    # nothing but complete models in the repository: Triton would load any folder as one
    assert os.listdir(tmp_path / "repo") == [m["model"]]


def test_gpu_instances_and_accelerators_parse(exported: Path, tmp_path: Path) -> None:
    res = write_triton_repository(
        exported,
        tmp_path / "r",
        RepoOptions(kind="gpu", accelerator="tensorrt", max_batch=8, preferred_batch=(2, 4)),
    )
    cfg = parsed(res.model_dir)
    assert pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    dims = "x".join(map(str, manifest(exported)["io"]["inputs"][0]["shape"][1:]))
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP32"
    assert acc.parameters["trt_profile_max_shapes"] == f"images:8x{dims}"
    assert acc.parameters["trt_profile_opt_shapes"] == f"images:4x{dims}"
    assert cfg.model_warmup[0].inputs["images"].zero_data
    res = write_triton_repository(
        exported, tmp_path / "r", RepoOptions(kind="gpu", accelerator="cuda", name="c")
    )
    (acc,) = parsed(res.model_dir).optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "cuda" and not parsed(res.model_dir).model_warmup


def test_static_batch_export_gets_max_batch_size_0_and_full_dims(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    static = demo_export(tmp_path_factory, batch=2)
    m = manifest(static)
    for flavour in ("onnxruntime", "python"):
        res = write_triton_repository(static, tmp_path / "r", RepoOptions(flavour=flavour, name=flavour))
        cfg = parsed(res.model_dir)
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
        assert list(cfg.input[0].dims) == m["io"]["inputs"][0]["shape"]  # the batch of 2 is part of the dims
        assert list(cfg.output[0].dims) == m["io"]["outputs"][0]["shape"]
    with pytest.raises(ConfigError, match="static batch of 2.*--max-batch"):
        write_triton_repository(static, tmp_path / "r", RepoOptions(name="x", max_batch=4))
    assert not (tmp_path / "r" / "x").exists()


def _engine(exported: Path, tmp_path: Path, info: dict | None) -> Path:  # type: ignore[type-arg]
    d = tmp_path / "with-engine"
    shutil.copytree(exported, d)
    # A stand-in for the engine: no TensorRT on this host to build a real model.plan. The writer
    # copies it as bytes and never parses it; what it checks comes from engine.json.
    (d / "model.plan").write_bytes(STAND_IN)
    if info is not None:
        (d / "engine.json").write_text(json.dumps(info))
    return d


STAND_IN = b"stand-in engine bytes"
PLAN_SHA = hashlib.sha256(STAND_IN).hexdigest()


def _record(onnx_sha: str, max_batch: int | None = 16, plan_sha: str = PLAN_SHA) -> dict:
    """engine.json in the layout `slab-deploy build` writes (runtime/engine_record.py)."""
    rec: dict = {"onnx": {"file": "model.onnx", "sha256": onnx_sha}, "plan": {"file": "model.plan",
                                                                             "sha256": plan_sha}}
    if max_batch is not None:
        rec["profile"] = {"input": "images", "min": [1, 3, 32, 32], "max": [max_batch, 3, 32, 32]}
    return rec


def test_tensorrt_flavour_takes_the_engine_and_its_profile(exported: Path, tmp_path: Path) -> None:
    sha = manifest(exported)["files"]["model.onnx"]["sha256"]
    d = _engine(exported, tmp_path, _record(sha))
    res = write_triton_repository(d, tmp_path / "r", RepoOptions(flavour="tensorrt", preferred_batch=(8,)))
    cfg = parsed(res.model_dir)
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert (
        cfg.max_batch_size == 16
        and pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    )
    _io_matches(cfg, manifest(exported))
    assert sorted(os.listdir(res.model_dir / "1")) == ["model.plan"]
    assert (res.model_dir / "engine.json").is_file()
    with pytest.raises(ConfigError, match="exceeds the engine's optimisation profile"):
        write_triton_repository(d, tmp_path / "r", RepoOptions(flavour="tensorrt", name="b", max_batch=32))


@pytest.mark.parametrize(
    ("info", "match"),
    [
        (None, "no engine.json"),
        ("another-graph", "built from another graph"),
        ("another-plan", "is not the engine engine.json records"),
        ("no-hashes", "records no onnx.sha256 and plan.sha256"),
        ("max-0", "not a positive whole number"),
        ("no-profile", "pass --max-batch N"),
    ],
)
def test_tensorrt_flavour_refuses_what_it_cannot_vouch_for(
    exported: Path, tmp_path: Path, info, match
) -> None:  # type: ignore[no-untyped-def]
    sha = manifest(exported)["files"]["model.onnx"]["sha256"]
    records = {None: None, "another-graph": _record("0" * 64),
               "another-plan": _record(sha, plan_sha="1" * 64),
               "no-hashes": {"profile": {"max": [8, 3, 32, 32]}}, "max-0": _record(sha, max_batch=0),
               "no-profile": _record(sha, max_batch=None)}
    d = _engine(exported, tmp_path, records[info])
    with pytest.raises((ArtifactError, ConfigError), match=match):
        write_triton_repository(d, tmp_path / "r", RepoOptions(flavour="tensorrt"))
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")


def test_tensorrt_flavour_without_an_engine_names_the_fix(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="holds no TensorRT engine model.plan"):
        write_triton_repository(exported, tmp_path / "r", RepoOptions(flavour="tensorrt", max_batch=4))


def test_fp16_io(tmp_path_factory: pytest.TempPathFactory, exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--fp16-io is for fp16 artefacts"):
        write_triton_repository(exported, tmp_path / "r", RepoOptions(flavour="python", fp16_io=True))
    fp16 = demo_export(tmp_path_factory, precision="fp16")
    # the fp16 export takes and gives float32 (manifest io), so only the python flavour can cast
    with pytest.raises(ConfigError, match="use --flavour python"):
        write_triton_repository(fp16, tmp_path / "r", RepoOptions(flavour="onnxruntime", fp16_io=True))
    res = write_triton_repository(fp16, tmp_path / "r", RepoOptions(flavour="python", fp16_io=True))
    _io_matches(parsed(res.model_dir), manifest(fp16), dtype="TYPE_FP16")
    plain = write_triton_repository(
        fp16, tmp_path / "r", RepoOptions(name="plain", kind="gpu", accelerator="tensorrt")
    )
    _io_matches(parsed(plain.model_dir), manifest(fp16))
    acc = parsed(plain.model_dir).optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.parameters["precision_mode"] == "FP16"


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (dict(flavour="triton"), "--flavour"),
        (dict(preferred_batch=(8, 4, 8)), "repeats"),
        (dict(max_batch=4, preferred_batch=(8,)), "exceeds --max-batch"),
        (dict(max_batch=0), "--max-batch must be"),
        (dict(instances=0), "--instances must be"),
        (dict(flavour="python", kind="gpu"), "runs ONNX Runtime on the CPU"),
        (dict(flavour="tensorrt", kind="cpu"), "takes --kind gpu"),
        (dict(accelerator="tensorrt"), "takes --flavour onnxruntime --kind gpu"),
        (dict(name="bad/name"), "not a model name"),
        (dict(dynamic_batching=False, queue_delay_us=10), "--no-dynamic-batching"),
    ],
)
def test_options_are_refused_before_anything_is_read(tmp_path: Path, opts, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        write_triton_repository(tmp_path / "no-such-export", tmp_path / "r", RepoOptions(**opts))
    assert not (tmp_path / "r").exists()


def test_default_max_batch_and_preferred_sizes_beyond_it(exported: Path, tmp_path: Path) -> None:
    from slab_deploy.serve.options import DEFAULT_MAX_BATCH

    cfg = parsed(write_triton_repository(exported, tmp_path / "r", RepoOptions()).model_dir)
    assert cfg.max_batch_size == DEFAULT_MAX_BATCH
    with pytest.raises(ConfigError, match="exceeds the max batch"):
        write_triton_repository(
            exported, tmp_path / "r", RepoOptions(name="b", preferred_batch=(DEFAULT_MAX_BATCH * 2,))
        )


def test_broken_exports_are_refused(exported: Path, tmp_path: Path) -> None:
    d = tmp_path / "tampered"
    shutil.copytree(exported, d)
    with open(d / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="not the graph the manifest records"):
        write_triton_repository(d, tmp_path / "r")
    failed = tmp_path / "failed"
    shutil.copytree(exported, failed)
    m = manifest(failed)
    (failed / "manifest.json").write_text(json.dumps({**m, "status": "parity-failed"}))
    with pytest.raises(ArtifactError, match="failed export is not served"):
        write_triton_repository(failed, tmp_path / "r")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        write_triton_repository(tmp_path, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_overwrite_needs_force_and_replaces_whole(exported: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_triton_repository(exported, repo, RepoOptions(flavour="python", instances=1))
    other = write_triton_repository(exported, repo, RepoOptions(name="other"))
    before = (other.model_dir / "config.pbtxt").read_text()
    with pytest.raises(ArtifactError, match="pass --force"):
        write_triton_repository(exported, repo, RepoOptions(instances=2))
    res = write_triton_repository(exported, repo, RepoOptions(instances=2), force=True)
    assert res.replaced and parsed(res.model_dir).instance_group[0].count == 2
    assert not (res.model_dir / "1" / "model.py").exists()  # replaced whole, not merged
    assert (other.model_dir / "config.pbtxt").read_text() == before  # the other model untouched
    (repo / "mine").mkdir()
    (repo / "mine" / "notes.txt").write_text("not a model")
    with pytest.raises(ArtifactError, match="not a Triton model folder"):
        write_triton_repository(exported, repo, RepoOptions(name="mine"), force=True)
    assert (repo / "mine" / "notes.txt").read_text() == "not a model"


def test_a_failure_mid_write_leaves_the_repository_as_it_was(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slab_deploy.serve import repository
    from slab_deploy.utils import Interrupted

    repo = tmp_path / "repo"
    first = write_triton_repository(exported, repo, RepoOptions(flavour="python"))
    old = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    real = repository._copy_hashed
    calls = []

    def copy_then_stop(src: Path, dst: Path) -> dict:  # type: ignore[type-arg]
        calls.append(dst.name)
        if len(calls) == 2:  # the manifest is in, the graph is not: Ctrl-C now
            raise Interrupted(2)
        return real(src, dst)

    monkeypatch.setattr(repository, "_copy_hashed", copy_then_stop)
    for name, force in ((first.name, True), ("new", False)):
        calls.clear()
        with pytest.raises(Interrupted):
            write_triton_repository(
                exported, repo, RepoOptions(name=name if name == "new" else None), force=force
            )
    assert {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()} == old
    assert sorted(os.listdir(repo)) == [first.name]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name or "replaced" in p.name]


def test_cli_serve_repo(exported: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from helpers import run_cli

    args = [
        "serve-repo",
        str(exported),
        "-o",
        str(tmp_path / "repo"),
        "--flavour",
        "python",
        "--preferred-batch",
        "2,4",
        "--queue-delay-us",
        "250",
        "--instances",
        "2",
        "--json",
    ]
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code == 0, out
    d = json.loads(out)
    assert d["backend"] == "python" and d["dynamic_batching"]["preferred_batch_size"] == [2, 4]
    assert parsed(Path(d["model_dir"])).dynamic_batching.max_queue_delay_microseconds == 250
    code, out, err = run_cli(args[:-1], capsys, monkeypatch)
    assert (
        code == 1 and "pass --force" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    )
    code, _, err = run_cli(
        ["serve-repo", str(exported), "-o", str(tmp_path / "r2"), "--preferred-batch", "4,x"],
        capsys,
        monkeypatch,
    )
    assert code == 1 and "comma list" in err


def test_repository_check_before_serving(exported: Path, tmp_path: Path) -> None:
    """`serve` refuses, before starting anything, what the server at hand could not load."""
    from slab_deploy.serve.server import TritonInstall, repository_models

    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)  # what the nvidia-pytriton server carries
    only_python = TritonInstall(tmp_path / "tritonserver", backends)
    repo = tmp_path / "repo"
    with pytest.raises(ConfigError, match="holds no model"):
        repository_models(repo, only_python) if repo.mkdir() is None else None
    write_triton_repository(exported, repo, RepoOptions(flavour="python", name="py"))
    assert repository_models(repo, only_python) == {"py": "python"}
    write_triton_repository(exported, repo, RepoOptions(flavour="onnxruntime", name="ort"))
    with pytest.raises(ConfigError, match="needs Triton's onnxruntime backend.*--flavour python"):
        repository_models(repo, only_python)
    shutil.rmtree(repo / "ort")
    (repo / ".left-over").mkdir()
    with pytest.raises(ConfigError, match="no config.pbtxt"):
        repository_models(repo, only_python)


def test_an_int8_export_is_served_like_fp32(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    int8 = demo_export(tmp_path_factory, precision="int8")
    res = write_triton_repository(int8, tmp_path / "r", RepoOptions(flavour="onnxruntime"))
    cfg = parsed(res.model_dir)
    assert cfg.platform == "onnxruntime_onnx"
    assert [pb2.DataType.Name(t.data_type) for t in (*cfg.input, *cfg.output)] == ["TYPE_FP32", "TYPE_FP32"]
