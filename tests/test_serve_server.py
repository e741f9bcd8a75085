"""A real Triton Inference Server (the tritonserver binary of the nvidia-pytriton wheel, Python
backend, CPU) serving the demo model through the python flavour's model.py: health, metadata,
HTTP and gRPC inference against ONNX Runtime run directly on the same model.onnx, dynamic batching
seen in the server's statistics, malformed requests, a client killed mid-request, the `serve` and
`serve-bench` commands. Every server listens on 127.0.0.1 on free ports, every load is bounded in
count and time, and every server is stopped by its own PID."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from slab_deploy.errors import MissingDependencyError
from slab_deploy.parity import compare, judge
from slab_deploy.serve import RepoOptions, write_triton_repository
from slab_deploy.tolerances import tolerance_for

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
from test_serve_repo import demo_export  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from slab_deploy.serve.server import TritonServer, find_tritonserver, free_ports  # noqa: E402

MODEL = "slab_deit_demo"
MAX_BATCH = 8
ROOT = Path(__file__).resolve().parent.parent


def _install():  # type: ignore[no-untyped-def]
    try:
        return find_tritonserver()
    except MissingDependencyError as exc:
        pytest.skip(f"no Triton server on this host: {exc}")


def digits(n: int, folder: Path) -> np.ndarray:
    """The demo model's held-out digits through the preprocessing of the manifest in `folder`
    (an export, or a model of the repository): real images, not noise."""
    from slab_deploy.datasets import demo_heldout

    pre = json.loads((folder / "manifest.json").read_text())["preprocessing"]
    return demo_heldout(MODEL, pre).x[:n].astype(np.float32)


def reference(onnx: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime run directly on the graph the server runs."""
    import onnxruntime as ort  # noqa: TID251 - the test's own reference

    return ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def assert_close(ref: np.ndarray, got: np.ndarray, precision: str = "fp32") -> None:
    v = judge(compare(ref, got), tolerance_for("ort_cpu", precision))
    assert v.passed, v.failures


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    install = _install()
    exported = demo_export(tmp_path_factory)
    repo = tmp_path_factory.mktemp("repo")
    # a long queue delay so that concurrent requests are seen batched together
    write_triton_repository(
        exported,
        repo,
        RepoOptions(
            flavour="python",
            max_batch=MAX_BATCH,
            preferred_batch=(4, MAX_BATCH),
            queue_delay_us=50_000,
            threads=1,
        ),
    )
    server = TritonServer(repo, install=install, log_path=repo.parent / f"{repo.name}.log")
    server.start(ready_timeout=90)
    try:
        yield server, repo / MODEL / "1" / "model.onnx"
    finally:
        server.stop()


def _infer_http(url: str, x: np.ndarray, model: str = MODEL, dtype: str = "FP32") -> np.ndarray:
    c = httpclient.InferenceServerClient(url)
    try:
        inp = httpclient.InferInput("images", list(x.shape), dtype)
        inp.set_data_from_numpy(x)
        return c.infer(model, [inp]).as_numpy("logits")
    finally:
        c.close()


def _stats(url: str) -> tuple[int, int]:
    c = httpclient.InferenceServerClient(url)
    try:
        s = c.get_inference_statistics(MODEL)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])
    finally:
        c.close()


def test_real_server_health_metadata_parity_and_dynamic_batching(served) -> None:  # type: ignore[no-untyped-def]
    server, onnx = served
    manifest = json.loads((onnx.parent.parent / "manifest.json").read_text())
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(MODEL)
        assert g.is_server_ready() and g.is_model_ready(MODEL)
        meta = h.get_model_metadata(MODEL)
        (inp,), (out,) = manifest["io"]["inputs"], manifest["io"]["outputs"]
        assert meta["inputs"] == [{"name": inp["name"], "datatype": "FP32", "shape": [-1, *inp["shape"][1:]]}]
        assert meta["outputs"] == [
            {"name": out["name"], "datatype": "FP32", "shape": [-1, *out["shape"][1:]]}
        ]
        assert g.get_model_metadata(MODEL, as_json=True)["inputs"][0]["name"] == inp["name"]

        x = digits(13, onnx.parent.parent)
        ref = reference(onnx, x)
        assert_close(ref[:5], _infer_http(server.http_url, x[:5]))
        gi = grpcclient.InferInput("images", [3, *x.shape[1:]], "FP32")
        gi.set_data_from_numpy(x[5:8])
        assert_close(ref[5:8], g.infer(MODEL, [gi]).as_numpy("logits"))

        # dynamic batching: five requests of 1-3 images sent at once run in fewer executions, and
        # model.py hands every request back its own rows of the stacked batch
        sizes = [1, 1, 2, 1, 3]
        offsets = np.cumsum([0, *sizes])
        before = _stats(server.http_url)
        results: dict[int, np.ndarray] = {}

        def send(k: int) -> None:
            results[k] = _infer_http(server.http_url, x[offsets[k] : offsets[k + 1]])

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        after = _stats(server.http_url)
        assert sorted(results) == list(range(len(sizes)))
        for k in range(len(sizes)):
            assert_close(ref[offsets[k] : offsets[k + 1]], results[k])
        inferences, executions = after[0] - before[0], after[1] - before[1]
        assert inferences == sum(sizes) and executions < len(sizes), (inferences, executions)
    finally:
        h.close()
        g.close()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "PyCapsule" not in log


@pytest.mark.slow
def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(served) -> None:  # type: ignore[no-untyped-def]
    server, onnx = served
    x = digits(MAX_BATCH + 1, onnx.parent.parent)
    ref = reference(onnx, x[:2])
    c = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)

    def bad(shape: list[int], dtype: str, data: np.ndarray, name: str = "images") -> str:
        inp = httpclient.InferInput(name, shape, dtype)
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as info:
            c.infer(MODEL, [inp])
        print(info.value.message())  # shown with -s: what a client is told
        return str(info.value.message())

    try:
        # Triton's own checks against config.pbtxt, each naming what was wrong
        assert "unexpected shape for input 'images'" in bad(
            [1, 3, 31, 32], "FP32", np.zeros((1, 3, 31, 32), np.float32)
        )
        assert "data-type is 'FP64', but model" in bad([1, 3, 32, 32], "FP64", x[:1].astype(np.float64))
        assert "unexpected inference input 'pixels'" in bad([1, 3, 32, 32], "FP32", x[:1], name="pixels")
        assert f"batch-size must be <= {MAX_BATCH}" in bad([MAX_BATCH + 1, 3, 32, 32], "FP32", x)
        with pytest.raises(InferenceServerException, match="expected 1 inputs|no input|images"):
            c.infer(MODEL, [])
        gi = grpcclient.InferInput("images", [1, 3, 32, 31], "FP32")
        gi.set_data_from_numpy(np.zeros((1, 3, 32, 31), np.float32))
        with pytest.raises(InferenceServerException, match="shape"):
            g.infer(MODEL, [gi])
        host, port = server.http_url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)  # not even JSON
        try:
            conn.request(
                "POST",
                f"/v2/models/{MODEL}/infer",
                body=b"{not json",
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            assert resp.status >= 400 and "error" in json.loads(resp.read())
        finally:
            conn.close()
        assert c.is_server_ready() and c.is_model_ready(MODEL)
        assert_close(ref, _infer_http(server.http_url, x[:2]))
    finally:
        c.close()
        g.close()


CLIENT = textwrap.dedent("""
    import sys, time, numpy as np, tritonclient.http as h
    url, n = sys.argv[1], int(sys.argv[2])
    c = h.InferenceServerClient(url, concurrency=4)
    x = np.random.default_rng(1).standard_normal((n, 3, 32, 32)).astype(np.float32)
    inp = h.InferInput("images", list(x.shape), "FP32"); inp.set_data_from_numpy(x)
    deadline = time.monotonic() + 60  # bounded even if nobody kills it
    done = 0
    while time.monotonic() < deadline:
        pending = [c.async_infer("slab_deit_demo", [inp]) for _ in range(4)]
        for p in pending:
            p.get_result()
            done += 1
        print(done, flush=True)
""")


@pytest.mark.slow
def test_a_client_killed_mid_request_loses_nothing_for_others(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, onnx = served
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    victim = subprocess.Popen(
        [sys.executable, str(script), server.http_url, str(MAX_BATCH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    x = digits(6, onnx.parent.parent)
    ref = reference(onnx, x)
    got: list[np.ndarray] = []
    errors: list[BaseException] = []

    def others() -> None:
        try:
            for i in range(20):
                got.append((i % 6, _infer_http(server.http_url, x[i % 6 : i % 6 + 1])))  # type: ignore[arg-type]
        except BaseException as exc:  # collected: the test fails on it below
            errors.append(exc)

    try:
        assert victim.stdout is not None
        for _ in range(3):  # the victim has completed requests and has more in flight
            assert victim.stdout.readline().strip(), "the client subprocess sent nothing"
        workers = [threading.Thread(target=others) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        for w in workers:
            w.join(timeout=120)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(timeout=10)
        if victim.stdout is not None:
            victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    assert not errors, errors
    assert len(got) == 60
    for i, logits in got:  # type: ignore[misc]
        assert_close(ref[i : i + 1], logits)
    c = httpclient.InferenceServerClient(server.http_url)
    try:
        assert c.is_server_ready() and c.is_model_ready(MODEL)
    finally:
        c.close()


@pytest.mark.slow
def test_serve_bench(served, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from helpers import run_cli

    server, _ = served
    for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        code, out, err = run_cli(
            [
                "serve-bench",
                url,
                "-m",
                MODEL,
                "--protocol",
                protocol,
                "--concurrency",
                "3",
                "--seconds",
                "1.5",
                "--batch",
                "2",
                "--json",
            ],
            capsys,
            monkeypatch,
        )
        assert code == 0, err
        rep = json.loads(out)
        assert rep["failed"] == 0 and rep["ok"] > 0 and rep["requests"] == rep["ok"]
        assert 0 < rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"] and rep["throughput_rps"] > 0
    # every request over the batch bound fails: counted, and exit 5 as for a failed bench case
    code, out, err = run_cli(
        [
            "serve-bench",
            server.http_url,
            "-m",
            MODEL,
            "--batch",
            str(MAX_BATCH + 1),
            "--seconds",
            "0.5",
            "--max-requests",
            "20",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 5 and "20 failed" in out and "failed" in err
    code, _, err = run_cli(
        ["serve-bench", server.http_url, "-m", "no_such_model", "--seconds", "0.5"], capsys, monkeypatch
    )
    assert code == 1 and "no_such_model" in err


def test_serve_bench_refuses_other_hosts(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from helpers import run_cli

    for url in ("10.1.2.3:8000", "http://192.168.0.1:8000", "8.8.8.8:8001"):  # numeric: no lookup, no traffic
        code, _, err = run_cli(["serve-bench", url, "-m", MODEL, "--seconds", "1"], capsys, monkeypatch)
        assert code == 1 and "not a loopback address" in err


def _group_members(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_stops_the_server_on_a_signal(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, sig: signal.Signals
) -> None:
    _install()
    repo = tmp_path / "repo"
    write_triton_repository(demo_export(tmp_path_factory), repo, RepoOptions(flavour="python"))
    ports = free_ports(3)
    cmd = [
        sys.executable,
        "-m",
        "slab_deploy.cli",
        "serve",
        str(repo),
        "--http-port",
        str(ports[0]),
        "--grpc-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--log",
        str(tmp_path / "server.log"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        server_pid = None
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while server_pid is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"serve exited early: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            cells = line.replace("│", " ").split()
            if cells[:1] == ["pid"]:
                server_pid = int(cells[1])
        assert server_pid is not None
        x = digits(2, repo / MODEL)
        assert _infer_http(f"127.0.0.1:{ports[0]}", x).shape == (2, 10)
        assert _group_members(server_pid)  # the server and its backend stub
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err
    assert not _group_members(server_pid), "tritonserver or its stub outlived `serve`"
    assert not list(Path("/dev/shm").glob(f"slab-deploy-{proc.pid}-*"))


@pytest.mark.slow
def test_fp16_io_and_static_batch_models(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The python flavour's other paths on a real server: FP16 over the wire for an fp16 export
    (model.py casts), and a static-batch export served with max_batch_size 0."""
    install = _install()
    fp16, static = demo_export(tmp_path_factory, precision="fp16"), demo_export(tmp_path_factory, batch=2)
    repo = tmp_path / "repo"
    write_triton_repository(fp16, repo, RepoOptions(flavour="python", name="half", fp16_io=True))
    write_triton_repository(static, repo, RepoOptions(flavour="python", name="static"))
    x = digits(4, static)
    with TritonServer(repo, install=install, log_path=tmp_path / "server.log") as server:
        half = _infer_http(server.http_url, x.astype(np.float16), model="half", dtype="FP16")
        assert half.dtype == np.float16
        ref16 = reference(fp16 / "model.onnx", x.astype(np.float16).astype(np.float32))
        assert_close(ref16, half.astype(np.float32), "fp16")
        assert_close(
            reference(static / "model.onnx", x[:2]), _infer_http(server.http_url, x[:2], model="static")
        )
        with pytest.raises(InferenceServerException, match="shape"):
            _infer_http(server.http_url, x[:3], model="static")


@pytest.mark.slow
def test_a_model_that_fails_to_load_stops_the_start_with_the_servers_reason(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from slab_deploy.serve.server import ServerError

    install = _install()
    repo = tmp_path / "repo"
    res = write_triton_repository(demo_export(tmp_path_factory), repo, RepoOptions(flavour="python"))
    (res.model_dir / "1" / "model.onnx").write_bytes(b"not an onnx graph")  # damaged after writing
    server = TritonServer(repo, install=install, log_path=tmp_path / "server.log")
    with pytest.raises(ServerError, match=f"exited with code 1 before it was ready(.|\n)*{MODEL}"):
        server.start(ready_timeout=60)
    assert server.proc is not None and server.proc.poll() is not None
    assert not _group_members(server.proc.pid)
