"""`slab-deploy trace`: kernel/operator categories, ONNX Runtime profiles, components, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from slab_deploy.bench.categories import ONNX_CATEGORIES, categorize, ops_from_ort_profile

# Kernel names as the torch profiler recorded them on an H200 (torch 2.11, CUDA 13), shortened
# after the part that decides the category.
H200_KERNELS = {
    "nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "matmul",
    "sm80_xmma_gemm_f32f32_f32f32_f32_nt_n_tilesize32x32x8_stage3_"
        "warpsize1x2x1_ffma_aligna4_alignc4_execute_kernel": "matmul",
    "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_f16_128x128_32x4_tt_align2>(Params)": "matmul",
    "std::enable_if<!(false), void>::type "
        "internal::gemvx::kernel<int, int, float, float, float, float, false, true>": "matmul",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, false>"
        "(int, float, c10::Half const*)": "norm",
    "void at::native::batch_norm_transform_input_kernel<c10::Half, c10::Half, float, true, int>(...)": "norm",
    "void (anonymous namespace)::softmax_warp_forward<c10::Half, c10::Half, float, 6, false, false>"
        "(c10::Half*, ...)": "softmax",
    "conv2d_c1_k1_nhwc_specialized": "conv",
    "void precomputed_convolve_sgemm<__half, 128, 6, 7, 3, 3, 5, 1, false>"
        "(int, int, int, __half const*, int)": "conv",
    "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, "
        "at::native::func_wrapper_t<float, at::native::sum_functor>>>": "reduction",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
        "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>>": "copy/cast/layout",
    "void at::native::unrolled_elementwise_kernel<"
        "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>": "copy/cast/layout",
    "void at::native::roll_cuda_kernel<c10::Half>"
        "(c10::Half const*, c10::Half*, long, long, long, long, long, long)": "copy/cast/layout",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<"
        "at::native::(anonymous namespace)::OpaqueType<2u>>": "copy/cast/layout",
    "Memset (Device)": "copy/cast/layout",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
        "at::native::CUDAFunctor_add<c10::Half>>>": "elementwise",
    "void at::native::vectorized_elementwise_kernel<8, "
        "at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)>": "elementwise",
    "void at::native::unrolled_elementwise_kernel<"
        "at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3ul>>": "elementwise",
    # compiled PVT-T's attention on an H100 (2026-12-07): cuDNN's SDPA, once filed as conv ("fprop")
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0":
        "fused attention",
}


@pytest.mark.parametrize("name, category", sorted(H200_KERNELS.items()))
def test_kernel_categories(name: str, category: str) -> None:
    assert categorize(name) == category


def test_onnx_categories_cover_norms_and_matmuls() -> None:
    assert ONNX_CATEGORIES["LayerNormalization"] == ONNX_CATEGORIES["SkipLayerNormalization"] == "norm"
    assert ONNX_CATEGORIES["FusedMatMul"] == ONNX_CATEGORIES["MatMul"] == "matmul"


def test_ort_profile_skips_warmup_runs(tmp_path: Path) -> None:
    """Node times inside the first `skip_runs` model_run windows are not counted."""
    events = []
    for i, dur in enumerate([1000.0, 10.0, 10.0]):  # a slow first run, then two steady ones
        t0 = i * 10_000.0
        events.append({"cat": "Session", "name": "model_run", "ts": t0, "dur": 5000.0})
        events.append({"cat": "Node", "name": "mm_kernel_time", "ts": t0 + 1, "dur": dur,
                       "args": {"op_name": "MatMul"}})
        events.append({"cat": "Node", "name": "ln_kernel_time", "ts": t0 + 2, "dur": 4.0,
                       "args": {"op_name": "LayerNormalization"}})
        events.append({"cat": "Node", "name": "ln_fence_before", "ts": t0 + 2, "dur": 0.0,
                       "args": {"op_name": "LayerNormalization"}})
    p = tmp_path / "prof.json"
    p.write_text(json.dumps(events))
    rows = {r.name: r for r in ops_from_ort_profile(p, iters=2, skip_runs=1)}
    assert rows["MatMul"].ms == pytest.approx(0.010) and rows["MatMul"].calls == 1
    assert (rows["LayerNormalization"].category == "norm"
            and rows["LayerNormalization"].ms == pytest.approx(0.004))


@pytest.mark.parametrize("backend", ["torch", "ort-cpu"])
def test_trace_cpu_shows_norms_only_in_the_baseline(  # type: ignore[no-untyped-def]
        backend: str, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "t"
    code, _, err = run_cli(["trace", "--device", "cpu", "--models", "test_slab_deit,test_deit",
                            "--backends", backend, "--iters", "2", "--threads", "1", "-o", str(out),
                            "--json"], capsys, monkeypatch)
    assert code == 0, err
    rep = json.loads((out / "trace.json").read_text())
    res = {r["model"]: r for r in rep["results"]}
    assert all(r["status"] == "ok" for r in res.values()), res
    slab, base = res["test_slab_deit"], res["test_deit"]
    assert slab["categories"].get("norm", 0.0) == 0.0  # folded: no norm work left
    assert base["categories"]["norm"] > 0.0
    for r in (slab, base):
        assert r["categories"]["matmul"] > 0.0 and r["latency_ms"] > 0.0
        assert r["traced_total_ms"] == pytest.approx(sum(r["categories"].values()))
        assert r["top"] and r["top"][0]["ms"] >= r["top"][-1]["ms"]
    if backend == "torch":
        assert slab["components"]["attention"] > 0.0 and "norm" not in slab["components"]
        assert base["components"]["norm"] > 0.0
        assert (out / slab["files"]["chrome_trace"]).is_file()
    else:
        assert (out / slab["files"]["ort_profile"]).is_file()
    assert "By category" in (out / "trace.md").read_text()


# --backend: the earlier spelling, still accepted
@pytest.mark.parametrize("option", ["--backends", "--backend"])
def test_trace_rejects_unknown_backend(  # type: ignore[no-untyped-def]
        option: str, tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, err = run_cli(["trace", "--models", "test_slab_deit", option, "tensorrt",
                            "-o", str(tmp_path / "t")], capsys, monkeypatch)
    assert code == 1 and "trace supports the backends" in err and "Traceback" not in err
    assert not (tmp_path / "t" / "trace.json").exists()


@pytest.mark.parametrize("extra, option", [(["--backends", "torch,ort-cpu"], "--backends"),
                                           (["--precision", "fp32,fp16"], "--precision")])
def test_trace_refuses_more_than_one_case_per_model(  # type: ignore[no-untyped-def]
        extra: list[str], option: str, tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, err = run_cli(["trace", "--device", "cpu", "--models", "test_slab_deit", *extra,
                            "-o", str(tmp_path / "t")], capsys, monkeypatch)
    assert code == 1 and f"pass one value to {option}" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_trace_rejects_gpu_backend_on_cpu(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, err = run_cli(["trace", "--device", "cpu", "--models", "test_slab_deit",
                            "--backends", "ort-cuda", "-o", str(tmp_path / "t")], capsys, monkeypatch)
    assert code == 1 and "--device cuda" in err and "Traceback" not in err


@pytest.mark.cuda
def test_trace_cuda_kernels(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "t"
    code, _, err = run_cli(["trace", "--device", "cuda", "--models", "test_slab_swin,test_swin",
                            "--backends", "torch", "--precision", "fp16", "--batch", "8", "--iters", "3",
                            "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    res = {r["model"]: r for r in json.loads((out / "trace.json").read_text())["results"]}
    assert res["test_slab_swin"]["source"].startswith("CUDA kernels")
    assert (res["test_slab_swin"]["categories"]["matmul"] > 0.0
            and res["test_slab_swin"]["categories"].get("norm", 0.0) == 0.0)
    assert res["test_swin"]["categories"]["norm"] > 0.0
    assert res["test_slab_swin"]["components"]["attention"] > 0.0


@pytest.mark.gpu_ort
def test_trace_ort_cuda_kernels(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The torch profiler (CUPTI) also records the kernels ONNX Runtime's CUDA provider launches."""
    out = tmp_path / "t"
    code, _, err = run_cli(["trace", "--device", "cuda", "--models", "test_slab_swin,test_swin",
                            "--backends", "ort-cuda", "--precision", "fp16", "--batch", "8", "--iters", "3",
                            "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    res = {r["model"]: r for r in json.loads((out / "trace.json").read_text())["results"]}
    for r in res.values():
        assert r["categories"]["matmul"] > 0.0 and r["latency_ms"] > 0.0
    assert res["test_slab_swin"]["categories"].get("norm", 0.0) == 0.0
    assert res["test_swin"]["categories"]["norm"] > 0.0


@pytest.mark.gpu_ort
def test_ort_cuda_nhwc_layout_runs_the_same_function(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--ort-cuda-layout nhwc` (the CUDA provider's prefer_nhwc) is measured, recorded in the report's
    profile, and computes what the default layout computes (judged by the ort_cuda rung's tolerance)."""
    import numpy as np

    from slab_deploy.parity import compare, judge
    from slab_deploy.runtime.ort import ORTRunner
    from slab_deploy.tolerances import tolerance_for

    out = tmp_path / "b"
    code, _, err = run_cli(["bench", "--device", "cuda", "--models", "test_slab_swin",
                            "--backends", "ort-cuda", "--precision", "fp32", "--batch", "4",
                            "--iters", "3", "--warmup", "1",
                            "--ort-cuda-layout", "nhwc", "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    rep = json.loads((out / "bench.json").read_text())
    assert rep["profile"]["ort_cuda_layout"] == "nhwc"
    assert [r["status"] for r in rep["results"]] == ["ok"]
    graph = next(out.glob("onnx/*/model.onnx"))
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    ref, got = (ORTRunner(graph, "cuda", layout=lay)(x) for lay in ("nchw", "nhwc"))
    assert judge(compare(ref, got), tolerance_for("ort_cuda", "fp32")).passed


def test_ort_cuda_graph_capture_refusal_is_a_failed_case_naming_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime refuses a CUDA graph when some nodes leave the CUDA provider (DeiT-S with
    prefer_nhwc on an H200): a failed case saying what to measure instead, not a broken artefact.
    This host has no CUDA provider, so its presence and the refusal (ONNX Runtime's own words) are
    stand-ins."""
    from slab_deploy.errors import ArtifactError, BenchCaseError
    from slab_deploy.runtime import ort as ort_runtime

    mod = ort_runtime._ort()
    monkeypatch.setattr(mod, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as requested "
            "by the user  as all compute graph nodes have not been partitioned to the CUDAExecutionProvider")

    monkeypatch.setattr(ort_runtime, "session", refuse)
    with pytest.raises(BenchCaseError, match="--ort-cuda-layout nchw") as info:
        ort_runtime.ORTRunner(tmp_path / "model.onnx", "cuda", cuda_graph=True, layout="nhwc")
    assert not isinstance(info.value, ArtifactError) and info.value.exit_code == 5
    with pytest.raises(BenchCaseError, match="with the ort-cuda backend$"):
        ort_runtime.ORTRunner(tmp_path / "model.onnx", "cuda", cuda_graph=True)
