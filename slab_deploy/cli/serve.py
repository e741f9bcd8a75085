"""The serving commands: serve-repo (a Triton model repository from an export), serve (a real
tritonserver on loopback), serve-bench (a bounded load client)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from slab_deploy.cli.app import JsonOpt, app, console, echo_json, print_all


@app.command("serve-repo")
def serve_repo(
    artifacts: Annotated[Path, typer.Argument(
        help=(
            "Output directory of `slab-deploy export` (model.onnx, manifest.json; model.plan "
            "with engine.json for --flavour tensorrt)."))],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help=(
            "Triton model repository to write the model into (created if missing; other models "
            "in it are left alone)."))],
    flavour: Annotated[str, typer.Option(
        "--flavour", help=(
            "onnxruntime (platform onnxruntime_onnx), tensorrt (tensorrt_plan) or python "
            "(model.py running ONNX Runtime on the CPU; what the nvidia-pytriton server can "
            "load).")
    )] = "onnxruntime",
    name: Annotated[str | None, typer.Option(
        "--name", help=(
            "Model name in the repository and in URLs (default: the export's model name).")
    )] = None,
    version: Annotated[int, typer.Option(
        "--model-version", help=(
            "Model version (the folder REPO/<model>/N).")
    )] = 1,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", metavar="N", help=(
            "max_batch_size for a dynamic-batch export (default: the engine's profile for "
            "tensorrt, else 32); a static-batch export is served with max_batch_size 0."), show_default=False
    )] = None,
    preferred_batch: Annotated[str | None, typer.Option(
        "--preferred-batch", metavar="N,M", help=(
            "Comma list of preferred batch sizes for the dynamic batcher, e.g. 4,8.")
    )] = None,
    queue_delay_us: Annotated[int | None, typer.Option(
        "--queue-delay-us", metavar="US", help=(
            "Longest a request waits for others to batch with (default: 100)."), show_default=False
    )] = None,
    no_dynamic_batching: Annotated[bool, typer.Option(
        "--no-dynamic-batching", help=(
            "Run every request as it comes (no dynamic_batching block).")
    )] = False,
    instances: Annotated[int, typer.Option(
        "--instances", help=(
            "Model instances (instance_group count, per GPU with --kind gpu).")
    )] = 1,
    kind: Annotated[str | None, typer.Option(
        "--kind", help=(
            "cpu or gpu instances (default: gpu for tensorrt, else cpu)."), show_default=False
    )] = None,
    fp16_io: Annotated[bool, typer.Option(
        "--fp16-io", help=(
            "FP16 inputs and outputs (fp16 artefacts; the python flavour casts at the "
            "boundary).")
    )] = False,
    accelerator: Annotated[str, typer.Option(
        "--accelerator", help=(
            "onnxruntime on GPU: none, cuda (the CUDA execution provider's options) or "
            "tensorrt (ORT's TensorRT execution provider, with a batch profile).")
    )] = "none",
    threads: Annotated[int | None, typer.Option(
        "--threads", help=(
            "ONNX Runtime intra-op threads per instance (0: its default)."), show_default=False
    )] = None,
    force: Annotated[bool, typer.Option(
        "--force", help=(
            "Replace the model if REPO already holds one of that name.")
    )] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an export as one model of a Triton model repository: REPO/<model>/config.pbtxt,
    the graph (or engine) in REPO/<model>/<version>/, the manifest beside it.

    The model folder appears whole or not at all; it is validated against the export's manifest first."""
    from slab_deploy.serve import RepoOptions, write_triton_repository

    opts = RepoOptions.from_text(
        preferred_batch=preferred_batch, flavour=flavour, name=name, version=version, max_batch=max_batch,
        queue_delay_us=queue_delay_us, dynamic_batching=not no_dynamic_batching, instances=instances,
        kind=kind,
        fp16_io=fp16_io, accelerator=accelerator, threads=threads)
    result = write_triton_repository(artifacts, output, opts, force=force)
    if as_json:
        echo_json(result.to_dict())
        return
    from slab_deploy.render import serve_repo_summary

    print_all(serve_repo_summary(result))


@app.command()
def serve(
    repo: Annotated[Path, typer.Argument(help="Triton model repository (see `slab-deploy serve-repo`).")],
    http_port: Annotated[int, typer.Option(
        "--http-port", help=(
            "HTTP port on 127.0.0.1 (0: a free one).")
    )] = 8000,
    grpc_port: Annotated[int, typer.Option(
        "--grpc-port", help=(
            "gRPC port on 127.0.0.1 (0: a free one).")
    )] = 8001,
    metrics_port: Annotated[int, typer.Option(
        "--metrics-port", help=(
            "Prometheus metrics port on 127.0.0.1 (0: a free one).")
    )] = 8002,
    tritonserver: Annotated[Path | None, typer.Option(
        "--tritonserver", help=(
            "tritonserver binary to run (default: $SLAB_DEPLOY_TRITONSERVER, the "
            "nvidia-pytriton wheel's, or tritonserver on PATH).")
    )] = None,
    log: Annotated[Path | None, typer.Option(
        "--log", help=(
            "Write the server's log to this file (default: stderr).")
    )] = None,
    ready_timeout: Annotated[float, typer.Option(
        "--ready-timeout", help=(
            "Seconds to wait for the server to load every model.")
    )] = 120.0,
) -> None:
    """Run a real Triton Inference Server on the repository, on loopback (127.0.0.1), until Ctrl-C or SIGTERM.

    Every model is checked loadable first (its config.pbtxt parses, this server has its backend).
    Ctrl-C / SIGTERM stop the server (Triton finishes in-flight requests) and exit 130 / 143; a
    server that stops on its own exits 1."""
    from slab_deploy.serve.server import ServerError, TritonServer, find_tritonserver, repository_models

    install = find_tritonserver(tritonserver)
    models = repository_models(repo, install)
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          install=install, log_path=log, verbose=log is None)
    try:
        with console(stderr=True).status(f"starting tritonserver ({len(models)} models)", spinner="dots"):
            server.start(ready_timeout)
        from slab_deploy.render import serve_ready

        print_all(serve_ready(server, models))
        sys.stdout.flush()
        code = server.proc.wait() if server.proc else None
        raise ServerError(f"tritonserver stopped on its own (exit code {code}): {server.log_tail(3)}")
    finally:
        server.stop()


@app.command("serve-bench")
def serve_bench(
    url: Annotated[str, typer.Argument(
        help=(
            "HOST:PORT of the server on this host: HTTP (e.g. 127.0.0.1:8000), or gRPC with "
            "--protocol grpc."))],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name on the server.")],
    concurrency: Annotated[int, typer.Option(
        "--concurrency", help=(
            "Clients sending at once, one request in flight each.")
    )] = 1,
    seconds: Annotated[float, typer.Option("--seconds", help="How long to send requests.")] = 10.0,
    batch: Annotated[int, typer.Option("--batch", help="Images per request.")] = 1,
    protocol: Annotated[str, typer.Option("--protocol", help="http or grpc.")] = "http",
    max_requests: Annotated[int | None, typer.Option(
        "--max-requests", help=(
            "Stop after this many requests in all (default: only --seconds bounds the run)."),
        show_default=False
    )] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random images.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Load a Triton server on loopback: throughput, p50/p99 latency and failed requests; exit 5
    when any request failed (or none completed)."""
    from slab_deploy.serve.load import run_load

    with console(stderr=True).status(f"loading {model} for {seconds:g} s", spinner="dots"):
        report = run_load(url, model, concurrency=concurrency, seconds=seconds, batch=batch,
                          protocol=protocol,
                          max_requests=max_requests, seed=seed)
    if as_json:
        echo_json(report.to_dict())
    else:
        from slab_deploy.render import load_table

        print_all(load_table(report))
    failure = report.failure()
    if failure is not None:
        raise failure


