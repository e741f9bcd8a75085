"""Tables of the serving commands: serve-repo, serve, serve-bench."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape

if TYPE_CHECKING:
    pass


from slab_deploy.render.base import key_value, num


def serve_repo_summary(result: Any) -> Any:
    """What `serve-repo` wrote, from a `RepoResult`."""
    c = result.config
    batching = "off" if c.dynamic_batching is None else (
        "dynamic, preferred " + (",".join(map(str, c.dynamic_batching["preferred_batch_size"])) or "any")
        + f", queue delay {c.dynamic_batching['max_queue_delay_microseconds']} us")
    rows = [
        ("runs with", f"platform {c.platform}" if c.platform else f"backend {c.backend}"),
        ("max_batch_size", str(c.max_batch_size) + ("  (static-batch export: full shape, no batching)"
                                                     if c.max_batch_size == 0 else "")),
        ("input", f"{c.input.name} {c.input.dtype} {list(c.input.dims)}"),
        ("output", f"{c.output.name} {c.output.dtype} {list(c.output.dims)}"),
        ("batching", batching),
        ("instances", f"{c.instance_count} x {c.instance_kind}"),
    ]
    if c.accelerator is not None:
        rows.append(("accelerator", c.accelerator["name"]))
    rows += [(f"note {i + 1}", n) for i, n in enumerate(result.notes)]
    rows.append(("written", f"{result.model_dir}/ ({', '.join(sorted(result.files))})"
                 + (", replacing the previous model" if result.replaced else "")))
    return key_value(f"triton model: {escape(result.name)} ({result.flavour})",
                      [(k, escape(v)) for k, v in rows])


def serve_ready(server: Any, models: dict[str, str]) -> Any:
    """Where a started `TritonServer` listens and what it serves."""
    rows = [("HTTP", server.http_url), ("gRPC", server.grpc_url), ("metrics", server.metrics_url),
            ("models", ", ".join(f"{m} ({b})" for m, b in models.items())), ("pid", str(server.pid)),
            ("stop", "Ctrl-C or SIGTERM")]
    return key_value(f"tritonserver ready on {server.repo}", [(k, escape(v)) for k, v in rows])


def load_table(report: Any) -> Any:
    """What `serve-bench` measured, from a `LoadReport`."""
    d = report.to_dict()
    lat = d["latency_ms"]
    rows = [
        ("server", f"{d['url']} ({d['protocol']}), model {d['model']}"),
        ("load", f"{d['concurrency']} clients, batch {d['batch']}, {d['seconds']:.1f} s"),
        ("requests", f"{d['ok']} ok, {d['failed']} failed"),
        ("throughput", f"{d['throughput_rps']:.1f} requests/s ({d['throughput_images_s']:.1f} images/s)"),
        ("latency", "ms: " + ", ".join(f"{k} {num(lat[k], '.2f')}"
                                       for k in ("p50", "p90", "p99", "mean", "max"))),
    ]
    rows += [(f"error x{n}", msg) for msg, n in d["errors"].items()]
    title = "serve-bench" + (" [red]FAILED REQUESTS[/red]" if d["failed"] else "")
    return key_value(title, [(k, escape(v)) for k, v in rows])


