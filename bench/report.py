"""The comparison: a table on stdout, results.json, and PNG plots."""

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import msgspec  # noqa: E402
import psutil  # noqa: E402

from bench.audit import Verdict  # noqa: E402
from bench.load import LoadResult  # noqa: E402

if TYPE_CHECKING:
    from bench.run import Params

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
BUCKET_S = 0.1


class Side(NamedTuple):
    load: LoadResult
    verdict: Verdict


def throughput(load: LoadResult) -> float:
    """Answered requests per second, from the first send to the last answer."""
    return load.answered / load.elapsed_s if load.elapsed_s else 0.0


def side_json(side: Side) -> dict[str, Any]:
    load = side.load
    return {
        "orders_per_s": round(throughput(load), 1),
        "p50_ms": load.percentile_ms(50), "p90_ms": load.percentile_ms(90),
        "p99_ms": load.percentile_ms(99), "p999_ms": load.percentile_ms(99.9),
        "max_ms": load.max_ms, "answered": load.answered, "created": len(load.created),
        "rejected": dict(load.rejected), "errors_5xx": load.errors_5xx,
        "transport_errors": load.transport_errors, "retries": load.retries,
        "elapsed_s": round(load.elapsed_s, 3), "oversold": side.verdict.oversold,
        "audit_ok": side.verdict.ok, "audit_problems": side.verdict.problems,
    }


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def write_report(params: "Params", sides: dict[str, Side]) -> dict[str, Any]:
    engine, baseline = sides["engine"], sides["baseline"]
    ratio = throughput(engine.load) / max(throughput(baseline.load), 1e-9)
    results = {
        "scenario": params.scenario, "machine": machine(),
        "params": {"shoppers": params.shoppers, "stock": params.stock,
                   "connections": params.connections, "rate": params.rate,
                   "quick": params.quick, "duration_s": params.duration_s, "url": params.url,
                   "mode": "closed loop" if params.rate is None else "open loop"},
        "engine": side_json(engine), "baseline": side_json(baseline),
        "ratio_throughput": round(ratio, 2),
    }
    (params.out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)))
    plot_throughput(sides, params.out / "throughput.png")
    plot_latency(sides, params.out / "latency.png")
    print_table(results)
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = [("orders/s", "orders_per_s", "{:,.0f}"), ("p50 ms", "p50_ms", "{:.1f}"),
            ("p99 ms", "p99_ms", "{:.1f}"), ("max ms", "max_ms", "{:.1f}"),
            ("orders created", "created", "{:,}"), ("5xx", "errors_5xx", "{:,}"),
            ("oversold", "oversold", "{:,}"), ("audit", "audit_ok", "{}")]
    params = results["params"]
    limit = f", for at most {params['duration_s']:g} s" if params["duration_s"] else ""
    print(f"\nscenario {results['scenario']}: {params['shoppers']:,} shoppers, stock "
          f"{params['stock']:,}, {params['connections']} connections, {params['mode']}{limit}")
    print(f"{'':16}{'engine':>14}{'baseline':>14}")
    for name, key, style in rows:
        cells = [style.format(results[side][key]) for side in ("engine", "baseline")]
        print(f"{name:16}{cells[0]:>14}{cells[1]:>14}")
    for side in ("engine", "baseline"):
        rejected = ", ".join(f"{k} {v:,}" for k, v in results[side]["rejected"].items())
        print(f"{side} rejected: {rejected or 'none'}")
    print(f"throughput ratio engine/baseline: {results['ratio_throughput']:.1f}x\n")


def plot_throughput(sides: dict[str, Side], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4))
    for label, side in sides.items():
        times = side.load.completed_at
        if not times:
            continue
        buckets = int(max(times) / BUCKET_S) + 1
        counts = [0] * buckets
        for moment in times:
            counts[int(moment / BUCKET_S)] += 1
        axes.plot([i * BUCKET_S for i in range(buckets)], [c / BUCKET_S for c in counts],
                  label=label)
        if side.load.crashed_at is not None:
            axes.axvline(side.load.crashed_at - side.load.started_at, color="red",
                         linestyle="--", label=f"{label}: kill -9")
    axes.set(xlabel="seconds", ylabel="answers per second", title="Throughput over time")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_latency(sides: dict[str, Side], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 4))
    labels = [f"p{p:g}" for p in PERCENTILES] + ["max"]
    width = 0.38
    for offset, (label, side) in enumerate(sides.items()):
        values = [side.load.percentile_ms(p) for p in PERCENTILES] + [side.load.max_ms]
        positions = [i + (offset - 0.5) * width for i in range(len(labels))]
        axes.bar(positions, values, width, label=label)
    axes.set_xticks(range(len(labels)), labels)
    axes.set(ylabel="milliseconds (log)", title="Latency percentiles", yscale="log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
