"""Tables of the `slab-deploy llm` commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slab_deploy.render.base import key_value, num, table


def llm_models_table(rows: Sequence[dict[str, Any]]) -> Any:
    t = table(
        "Language models",
        [
            "name",
            "norm",
            "layout",
            "hidden",
            "layers",
            "heads",
            "mlp",
            "vocab",
            "params (M)",
            "paper throughput",
        ],
        right=["hidden", "layers", "heads", "mlp", "vocab", "params (M)", "paper throughput"],
    )
    for r in rows:
        t.add_row(
            r["name"],
            r["norm"],
            r["layout"],
            str(r["hidden"]),
            str(r["layers"]),
            str(r["heads"]),
            str(r["mlp"]),
            str(r["vocab"]),
            num(r["params_m"], ".1f"),
            num(r["paper_throughput"], ".1f"),
        )
    return t


def llm_export_summary(result: Any) -> Any:
    m = result.manifest
    folded = m.get("folded")
    nodes = ", ".join(f"{k} {v}" for k, v in m["norm_nodes"].items())
    return key_value(
        f"Exported {m['model']} ({m['precision']})",
        [
            ("graph", str(result.onnx_path)),
            (
                "inputs",
                f"input_ids, {len(m['inputs']) - 1} past key/value tensors (dynamic batch, sequence, past)",
            ),
            ("outputs", "logits (last position, float32), present key/values"),
            ("fold", folded and f"{folded['folded']}/{len(folded['norms'])} norms folded" or "not folded"),
            ("norm nodes", nodes),
            ("nodes", str(sum(m["ops"].values()))),
            ("seconds", f"{result.seconds:.1f}"),
        ],
    )


def llm_check_table(report: Any) -> Any:
    t = table(
        f"Greedy decoding parity: {report.model}, {report.batch} prompts x {report.prompt_tokens} tokens, "
        f"{report.new_tokens} steps",
        ["rung", "runner", "status", "tokens", "max_rel", "cosine", "token agreement", "note"],
        right=["max_rel", "cosine", "token agreement"],
    )
    for r in report.rungs:
        m = r.metrics or {}
        tokens = (
            "-"
            if r.greedy_equal is None
            else "equal"
            if r.greedy_equal
            else f"differ from step {r.first_divergence}"
        )
        note = r.reason or "; ".join(r.failures)
        t.add_row(
            r.rung,
            r.runner,
            r.status,
            tokens,
            num(m.get("max_rel"), ".1e"),
            num(m.get("cosine"), ".6f"),
            num(m.get("top1"), ".3f"),
            note,
        )
    return t


def llm_bench_tables(report: Any) -> list[Any]:
    columns = ["model", "backend", "precision", "batch", "TTFT ms", "prefill tok/s", "decode tok/s",
               "decode step ms (p90)", "CV prefill / decode"]
    t = table("Language-model throughput", columns, right=columns[3:])
    for c in report.cases:
        t.add_row(
            c.model + (" (folded)" if c.folded else ""),
            c.backend,
            c.precision,
            str(c.batch),
            num(c.ttft_ms, ".1f"),
            num(c.prefill_tok_s, ".0f"),
            num(c.decode_tok_s, ".1f"),
            f"{c.decode_step_ms:.2f} ({c.decode_step_p90_ms:.2f})",
            f"{c.prefill_cv:.1%} / {c.decode_cv:.1%}",
        )
    out = [t]
    if report.speedups:
        s = table(
            "SLAB vs twin",
            ["model", "baseline", "backend", "batch", "prefill", "decode", "TTFT"],
            right=["batch", "prefill", "decode", "TTFT"],
        )
        for r in report.speedups:
            s.add_row(
                r["model"],
                r["baseline"],
                r["backend"],
                str(r["batch"]),
                f"{r['prefill']:.2f}x",
                f"{r['decode']:.2f}x",
                f"{r['ttft']:.2f}x",
            )
        out.append(s)
    return out
