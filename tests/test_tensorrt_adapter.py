"""The TensorRT adapter on what only full TensorRT offers: TensorRT 10's weakly typed FP16 build
with SLA's normaliser pinned to fp32, TensorRT 11's strongly typed-only builder, hardware
compatibility levels, the timing cache, version compatibility, parse and build failures.

A stand-in module is used here, and only here, because no real one can exist on this host: full
TensorRT's builder needs a CUDA GPU (TensorRT-RTX, which builds without one, is tested for real in
test_tensorrt.py), and TensorRT 10 and 11 are one import name that cannot be installed side by
side. The stand-in parses the real exported ONNX graph into one layer per node, named and tagged
as TensorRT's ONNX parser does ("[ONNX Layer: NAME]"), and records what the builder was asked.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import onnx
import pytest

from slab_deploy.errors import ArtifactError, ConfigError
from slab_deploy.export.api import export_model
from slab_deploy.runtime import engine as engine_mod
from slab_deploy.runtime.engine import EngineOptions, build_engine, sla_normaliser_nodes
from slab_deploy.runtime.engine_record import PLAN_NAME, RECORD_NAME, EngineMismatch, load_plan
from slab_deploy.runtime.tensorrt import TensorRT

NAME = "test_slab_deit"
L4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}


class Member:
    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"{self.enum}.{self.name}"

    __str__ = __repr__


def enum(name: str, *members: str) -> type:
    return type(name, (), {m: Member(name, m, i) for i, m in enumerate(members)})


def fake_tensorrt(version: str, *, fp16_flag: bool, parse_ok: bool = True, build_ok: bool = True) -> Any:
    """A module with TensorRT's Python API surface that `slab_deploy.runtime.tensorrt` uses."""
    m: Any = types.ModuleType("tensorrt")
    m.__version__ = version
    m.asked = {"flags": set(), "pinned": [], "profile": None}
    flags = ["OBEY_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE", "TF32"] + (["FP16"] if fp16_flag else [])
    m.BuilderFlag = enum("BuilderFlag", *flags)
    m.NetworkDefinitionCreationFlag = enum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")
    m.MemoryPoolType = enum("MemoryPoolType", "WORKSPACE")
    m.HardwareCompatibilityLevel = enum("HardwareCompatibilityLevel", "NONE", "AMPERE_PLUS",
                                        "SAME_COMPUTE_CAPABILITY")
    m.ProfilingVerbosity = enum("ProfilingVerbosity", "LAYER_NAMES_ONLY", "DETAILED")
    m.LayerType = enum("LayerType", "MATRIX_MULTIPLY", "CONVOLUTION", "OTHER")
    m.DataType = enum("DataType", "FLOAT", "HALF", "INT64")
    m.float32 = m.DataType.FLOAT

    class Logger:
        WARNING = 2

        def __init__(self, _severity: int) -> None:
            pass

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: Member) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class Layer:
        def __init__(self, node: Any, dtype: Member) -> None:
            self.name, self.metadata = node.name, f"[ONNX Layer: {node.name}]"
            self.type = {"MatMul": m.LayerType.MATRIX_MULTIPLY, "Conv": m.LayerType.CONVOLUTION}.get(
                node.op_type, m.LayerType.OTHER)
            self.num_outputs = len(node.output)
            self.outputs = [Tensor(o, (), dtype) for o in node.output]
            self.precision = None

        def get_output(self, i: int) -> Tensor:
            return self.outputs[i]

        def set_output_type(self, i: int, dtype: Member) -> None:
            self.outputs[i].dtype = dtype
            m.asked["pinned"].append((self.name, i))

    class Network:
        def __init__(self, flags: int) -> None:
            m.asked["network_flags"] = flags
            self.layers: list[Layer] = []
            self.inputs: list[Tensor] = []

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class OnnxParser:
        num_errors = 1

        def __init__(self, network: Network, _logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            g = onnx.load(path).graph
            half = any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer)
            self.network.layers = [Layer(n, m.DataType.HALF if half else m.DataType.FLOAT) for n in g.node]
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                         for d in g.input[0].type.tensor_type.shape.dim)
            self.network.inputs = [Tensor(g.input[0].name, dims, m.DataType.FLOAT)]
            return parse_ok

        def get_error(self, _i: int) -> str:
            return "In node 3 (importMatMul): UNSUPPORTED_NODE"

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+1"

    class Config:
        builder_optimization_level = 3
        hardware_compatibility_level = m.HardwareCompatibilityLevel.NONE
        profiling_verbosity = m.ProfilingVerbosity.LAYER_NAMES_ONLY

        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_flag(self, flag: Member) -> None:
            m.asked["flags"].add(flag.name)

        def set_memory_pool_limit(self, _pool: Member, size: int) -> None:
            m.asked["workspace"] = size

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data or b"cache")

        def set_timing_cache(self, cache: TimingCache, _ignore_mismatch: bool) -> bool:
            self.cache = cache
            return not cache.data.startswith(b"other gpu")

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

        def add_optimization_profile(self, profile: Any) -> None:
            m.asked["profile"] = profile.shapes

    class Profile:
        def set_shape(self, name: str, *shapes: Any) -> None:
            self.shapes = (name, *shapes)

    class Builder:
        def __init__(self, _logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            m.config = Config()
            return m.config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            m.asked["opt_level"] = config.builder_optimization_level
            m.asked["hardware"] = str(config.hardware_compatibility_level)
            return json.dumps(sorted(m.asked["flags"])).encode() if build_ok else None

    m.Logger, m.OnnxParser, m.Builder, m.IBuilderConfig = Logger, OnnxParser, Builder, Config
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("adapter") / "fp32"
    export_model(NAME, None, d)
    return d


@pytest.fixture
def art(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the export, on a host whose GPU is an L4 (full TensorRT builds for the GPU it runs on)."""
    d = tmp_path / "art"
    d.mkdir()
    for p in exported.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(engine_mod, "gpu_info", lambda: dict(L4))
    return d


def test_the_adapter_tells_the_flavours_apart() -> None:
    t10, t11 = (TensorRT(fake_tensorrt("10.14.1", fp16_flag=True)),
                TensorRT(fake_tensorrt("11.4.0", fp16_flag=False)))
    assert (t10.flavour, t10.major, t10.weak_fp16, t10.hardware_compat) == ("tensorrt", 10, True, True)
    assert (t11.major, t11.weak_fp16, t11.compute_capabilities) == (11, False, ())
    rtx: Any = types.ModuleType("tensorrt_rtx_bindings")
    rtx.__version__ = "1.7.1.116"
    rtx.BuilderFlag = enum("BuilderFlag", "VERSION_COMPATIBLE")
    rtx.HardwareCompatibilityLevel = enum("HardwareCompatibilityLevel", "NONE")
    rtx.ComputeCapability = enum("ComputeCapability", "NONE", "CURRENT", "SM75", "SM80", "SM89", "SM120")
    r = TensorRT(rtx)
    assert (r.flavour, r.rtx, r.weak_fp16, r.hardware_compat) == ("tensorrt-rtx", True, False, False)
    assert r.compute_capabilities == ("7.5", "8.0", "8.9", "12.0")


def test_sla_normaliser_nodes_of_a_real_export(exported: Path) -> None:
    nodes = sla_normaliser_nodes(exported / "model.onnx")
    g = onnx.load(str(exported / "model.onnx")).graph
    ops = {n.name: n.op_type for n in g.node}
    picked = sorted(ops[n] for n in nodes)
    blocks = sum(1 for op in ops.values() if op == "Reciprocal")
    assert blocks == 2  # test_slab_deit: two SLA blocks
    # per block: token sum of k (a MatMul by a row of ones), its transpose, q . sum(k), + eps,
    # reciprocal, and the scaling by it
    assert picked == sorted(["MatMul", "Transpose", "MatMul", "Add", "Reciprocal", "Mul"] * blocks)
    assert not any("qkv" in n or "proj" in n for n in nodes)


def test_weakly_typed_fp16_pins_the_sla_normaliser(art: Path) -> None:
    m = fake_tensorrt("10.14.1", fp16_flag=True)
    result = build_engine(art, EngineOptions(weak_fp16=True, workspace_gib=2, opt_level=5), trt=TensorRT(m))
    want = sla_normaliser_nodes(art / "model.onnx")
    assert {"FP16", "OBEY_PRECISION_CONSTRAINTS"} <= m.asked["flags"]
    assert m.asked["network_flags"] == 0  # weakly typed: no STRONGLY_TYPED flag
    assert {name for name, _ in m.asked["pinned"]} == want
    assert m.asked["workspace"] == 2 << 30 and m.asked["opt_level"] == 5
    rec = result.record
    assert rec.typing == "weak-fp16" and rec.flags["pinned_fp32_layers"] == len(want) == 12
    assert rec.targets["compute_capabilities"] == ["8.9"] and rec.gpu == L4
    assert (art / PLAN_NAME).read_bytes() == json.dumps(sorted(m.asked["flags"])).encode()


def test_strongly_typed_builds_set_no_precision_flag(art: Path) -> None:
    m = fake_tensorrt("10.14.1", fp16_flag=True)
    build_engine(art, EngineOptions(min_batch=2, opt_batch=8, max_batch=32), trt=TensorRT(m))
    assert m.asked["network_flags"] == 1 << int(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert "FP16" not in m.asked["flags"] and m.asked["pinned"] == []
    assert m.asked["profile"] == ("images", [2, 3, 32, 32], [8, 3, 32, 32], [32, 3, 32, 32])


def test_tensorrt_11_refuses_weak_fp16_before_parsing(art: Path) -> None:
    m = fake_tensorrt("11.4.0", fp16_flag=False)
    with pytest.raises(ConfigError,
                       match="--weak-fp16 needs TensorRT 10; tensorrt 11.4.0 builds strongly typed only"):
        build_engine(art, EngineOptions(weak_fp16=True), trt=TensorRT(m))
    assert not hasattr(m, "config") and not (art / PLAN_NAME).exists()


def test_hardware_compat_and_version_compatible_widen_the_record(art: Path) -> None:
    m = fake_tensorrt("10.14.1", fp16_flag=True)
    rec = build_engine(art, EngineOptions(hardware_compat="ampere-plus", version_compatible=True),
                       trt=TensorRT(m)).record
    assert (m.asked["hardware"] == "HardwareCompatibilityLevel.AMPERE_PLUS"
            and "VERSION_COMPATIBLE" in m.asked["flags"])
    assert rec.targets == {"compute_capabilities": ["8.0+"], "hardware_compat": "ampere-plus",
                           "version_compatible": True}
    sha = rec.onnx["sha256"]
    load_plan(art, onnx_sha256=sha, tensorrt={"flavour": "tensorrt", "version": "10.15.1"},
              gpu={"name": "NVIDIA H200", "compute_capability": "9.0"})
    with pytest.raises(EngineMismatch, match="this host runs tensorrt 11.4.0"):
        load_plan(art, onnx_sha256=sha, tensorrt={"flavour": "tensorrt", "version": "11.4.0"}, gpu=L4)


def test_the_timing_cache_is_loaded_and_saved(art: Path, tmp_path: Path) -> None:
    cache = tmp_path / "trt.cache"
    m = fake_tensorrt("10.14.1", fp16_flag=True)
    r1 = build_engine(art, EngineOptions(timing_cache=cache), trt=TensorRT(m))
    assert cache.read_bytes() == b"cache+1" and "timing cache written" in " ".join(r1.notes)
    r2 = build_engine(art, EngineOptions(timing_cache=cache, force=True),
                      trt=TensorRT(fake_tensorrt("10.14.1", fp16_flag=True)))
    assert cache.read_bytes() == b"cache+1+1" and "timing cache updated" in " ".join(r2.notes)
    assert r2.record.flags["timing_cache"] == str(cache)
    cache.write_bytes(b"other gpu's cache")
    before = (art / PLAN_NAME).read_bytes()
    with pytest.raises(ConfigError, match="timing cache is from another TensorRT version or GPU"):
        build_engine(art, EngineOptions(timing_cache=cache, force=True),
                     trt=TensorRT(fake_tensorrt("10.14.1", fp16_flag=True)))
    assert cache.read_bytes() == b"other gpu's cache" and (art / PLAN_NAME).read_bytes() == before


@pytest.mark.parametrize(("parse_ok", "build_ok", "message"), [
    (False, True, r"could not parse .*model.onnx: In node 3 \(importMatMul\): UNSUPPORTED_NODE"),
    (True, False, "failed to build an engine from model.onnx"),
])
def test_parse_and_build_failures_write_nothing(
    art: Path, parse_ok: bool, build_ok: bool, message: str
) -> None:
    before = sorted(p.name for p in art.iterdir())
    m = fake_tensorrt("10.14.1", fp16_flag=True, parse_ok=parse_ok, build_ok=build_ok)
    with pytest.raises(ArtifactError, match=message):
        build_engine(art, EngineOptions(), trt=TensorRT(m))
    assert sorted(p.name for p in art.iterdir()) == before
    assert RECORD_NAME not in before


def test_full_tensorrt_without_a_gpu_is_refused(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "gpu_info", lambda: None)
    with pytest.raises(ConfigError,
                       match="builds on the GPU that will run the engine, and there is none here"):
        build_engine(art, EngineOptions(), trt=TensorRT(fake_tensorrt("10.14.1", fp16_flag=True)))
    with pytest.raises(ConfigError, match="--compute-capability is TensorRT-RTX's"):
        build_engine(art, EngineOptions(compute_capability=("8.9",)),
                     trt=TensorRT(fake_tensorrt("10.14.1", fp16_flag=True)))
