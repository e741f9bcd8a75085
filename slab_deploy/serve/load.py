"""Load on a Triton server on loopback: `run_load`, concurrent clients for a bounded time.

Each of `concurrency` threads has its own tritonclient client (HTTP or gRPC) and sends one
request at a time, with seeded random images of the model's own shape and dtype (read from the
server's model metadata), until `seconds` have passed or `max_requests` were sent. Every request
is timed end to end (serialisation, network, queueing, inference); a failed one is counted with its
error. Only loopback addresses are accepted: this measures the server `slab-deploy serve` started
(perf_analyzer is the tool for a remote one).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slab_deploy.errors import BenchCaseError, ConfigError
from slab_deploy.serve.deps import require_serve

PROTOCOLS = ("http", "grpc")
MAX_CONCURRENCY = 256
MAX_SECONDS = 3600.0
MAX_REQUESTS = 1_000_000
REQUEST_TIMEOUT_S = 30.0
NP_DTYPES = {"FP32": np.float32, "FP16": np.float16}


@dataclass
class LoadReport:
    """What one load run measured."""

    url: str
    model: str
    protocol: str
    concurrency: int
    batch: int
    seconds: float  # wall time of the run
    ok: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return self.ok + self.failed

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "batch": self.batch,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed,
            "throughput_rps": round(self.throughput_rps, 2),
            "throughput_images_s": round(self.throughput_rps * self.batch, 2),
            "latency_ms": {
                k: None if v is None else round(v, 3)
                for k, v in (
                    ("p50", self.percentile(50)),
                    ("p90", self.percentile(90)),
                    ("p99", self.percentile(99)),
                    ("mean", float(np.mean(self.latencies_ms)) if self.latencies_ms else None),
                    ("max", max(self.latencies_ms) if self.latencies_ms else None),
                )
            },
            "errors": dict(self.errors.most_common(10)),
        }

    def failure(self) -> BenchCaseError | None:
        """The exit-5 error when a request failed or none succeeded (None: a clean run)."""
        if self.failed:
            top = self.errors.most_common(1)[0][0] if self.errors else "unknown error"
            return BenchCaseError(
                f"{self.failed} of {self.requests} requests to {self.model} failed (first kind: {top})"
            )
        if not self.ok:
            return BenchCaseError(f"no request to {self.model} completed in {self.seconds:.1f} s")
        return None


def loopback_url(url: str) -> tuple[str, str]:
    """`host:port` of `url` (an http:// or grpc:// prefix is dropped) and its host, refused unless
    every address the host resolves to is a loopback one."""
    bare = url.split("://", 1)[1] if "://" in url else url
    bare = bare.rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"URL {url!r} is not HOST:PORT (e.g. 127.0.0.1:8000)")
    name = host.strip("[]")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, int(port), proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot resolve {name!r} in {url}: {exc}") from None
    if not addrs or not all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addrs):
        raise ConfigError(
            f"{url} is not a loopback address: serve-bench measures a server on this host "
            "(127.0.0.1, localhost, [::1]); use perf_analyzer for a remote one"
        )
    return bare, name


def _client(protocol: str, url: str) -> Any:
    module = require_serve(f"tritonclient.{protocol}", "serve-bench")
    if protocol == "http":
        return module.InferenceServerClient(
            url, connection_timeout=REQUEST_TIMEOUT_S, network_timeout=REQUEST_TIMEOUT_S
        )
    return module.InferenceServerClient(url)


def model_io(protocol: str, url: str, model: str) -> tuple[str, str, list[int], str]:
    """(input name, datatype, shape, output name) from the server's metadata of `model`."""
    client = _client(protocol, url)
    errors = require_serve("tritonclient.utils", "serve-bench")
    try:
        meta = (
            client.get_model_metadata(model, as_json=True)
            if protocol == "grpc"
            else client.get_model_metadata(model)
        )
    except errors.InferenceServerException as exc:
        raise ConfigError(
            f"the server at {url} has no ready model {model!r} ({exc.message()}); check --model, "
            "or start it with `slab-deploy serve REPO`"
        ) from None
    except Exception as exc:  # connection refused, reset, timed out: whatever the client library raises
        raise ConfigError(
            f"cannot reach a Triton server at {url} ({type(exc).__name__}: {exc}); start it with "
            "`slab-deploy serve REPO`"
        ) from None
    finally:
        client.close()
    if len(meta["inputs"]) != 1 or len(meta["outputs"]) != 1:
        raise ConfigError(
            f"{model} has {len(meta['inputs'])} inputs and {len(meta['outputs'])} outputs; "
            "serve-bench drives models with one of each (slab-deploy's)"
        )
    inp = meta["inputs"][0]
    return inp["name"], inp["datatype"], [int(d) for d in inp["shape"]], meta["outputs"][0]["name"]


def run_load(
    url: str,
    model: str,
    *,
    concurrency: int = 1,
    seconds: float = 10.0,
    batch: int = 1,
    protocol: str = "http",
    max_requests: int | None = None,
    seed: int = 0,
) -> LoadReport:
    """Drive `model` at `url` with `concurrency` clients for `seconds` (or `max_requests`)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r} is not http or grpc")
    for flag, v, hi in (
        ("--concurrency", concurrency, MAX_CONCURRENCY),
        ("--batch", batch, 4096),
        ("--max-requests", max_requests if max_requests is not None else 1, MAX_REQUESTS),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise ConfigError(f"{flag} must be a whole number from 1 to {hi}, not {v!r}")
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_SECONDS:
        raise ConfigError(f"--seconds must be more than 0 and at most {MAX_SECONDS:.0f}, not {seconds!r}")
    addr, _host = loopback_url(url)
    in_name, dtype, shape, out_name = model_io(protocol, addr, model)
    if dtype not in NP_DTYPES:
        raise ConfigError(f"{model} takes {dtype} input; serve-bench sends FP32 or FP16 images")
    if shape and shape[0] == -1:
        shape = [batch, *shape[1:]]
    elif batch != 1:
        raise ConfigError(f"{model} takes a fixed shape {shape} (no batch dimension); drop --batch")
    if any(d < 0 for d in shape):
        raise ConfigError(f"{model} has an input shape {shape} with variable dimensions besides the batch")
    module = require_serve(f"tritonclient.{protocol}", "serve-bench")
    errors = require_serve("tritonclient.utils", "serve-bench")
    images = np.random.default_rng(seed).standard_normal(shape).astype(NP_DTYPES[dtype])
    report = LoadReport(addr, model, protocol, concurrency, batch, 0.0)
    lock = threading.Lock()
    stop = threading.Event()
    budget = [max_requests if max_requests is not None else MAX_REQUESTS]

    def worker() -> None:
        client = _client(protocol, addr)
        inp = module.InferInput(in_name, shape, dtype)
        inp.set_data_from_numpy(images)
        outputs = [module.InferRequestedOutput(out_name)]
        try:
            while not stop.is_set():
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    kwargs = {"client_timeout": REQUEST_TIMEOUT_S} if protocol == "grpc" else {}
                    client.infer(model, [inp], outputs=outputs, **kwargs)
                    ms, err = (time.perf_counter() - t0) * 1e3, None
                except errors.InferenceServerException as exc:
                    ms, err = 0.0, (exc.message() or str(exc)).splitlines()[0][:200]
                except Exception as exc:  # a dropped connection, a timeout: the request failed
                    ms, err = 0.0, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                with lock:
                    if err is None:
                        report.ok += 1
                        report.latencies_ms.append(ms)
                    else:
                        report.failed += 1
                        report.errors[err] += 1
        finally:
            client.close()

    threads = [
        threading.Thread(target=worker, name=f"serve-bench-{i}", daemon=True) for i in range(concurrency)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        deadline = start + seconds
        while any(t.is_alive() for t in threads) and time.perf_counter() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 5)
    report.seconds = time.perf_counter() - start
    return report
