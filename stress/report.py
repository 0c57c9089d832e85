"""The end of a stress run: summary.json, samples.csv, report.png and a summary table."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from clients.engine import Tally
from clients.lib import drift, percentiles


def send_order_rtts(samples: list[tuple[int, float, float]]) -> list[float]:
    """Round trips in the order their frames were sent."""
    return [rtt for _, _, rtt in sorted(samples, key=lambda s: s[1])]


def summarize(
    results: list[Tally], fps: float, duration: float, settle_s: float = 0.0
) -> dict[str, Any]:
    """Per stream and aggregate figures; latency percentiles skip the first `settle_s` seconds."""
    settle_s = min(settle_s, duration / 4)  # a short run keeps most of its samples

    steady = {r.name: [rtt for _, t, rtt in r.samples if t >= settle_s] for r in results}
    streams = []
    for r in results:
        streams.append(
            {
                "stream": r.name,
                "sent": r.sent,
                "processed": r.results,
                "dropped": sum(r.drops.values()),
                "dropped_by_reason": dict(r.drops),
                "errors": sum(r.errors.values()),
                "processed_fps": round(r.results / duration, 2) if duration else 0.0,
                "rtt_ms": percentiles(steady[r.name]),
                "drift": drift(send_order_rtts(r.samples)),
                "skipped_slots": r.skipped_slots,
                "late_sends": r.late_sends,
                "closed_by_server": r.last_error,  # the daemon's last error, or the lost link
            }
        )
    processed = [r.results for r in results]
    sent = sum(r.sent for r in results)
    drops: Counter[str] = Counter()
    for r in results:
        drops.update(r.drops)
    skipped = sum(r.skipped_slots for r in results)
    late = sum(r.late_sends for r in results)
    expected = round(fps * duration) * len(results)
    aggregate = {
        "streams": len(results),
        "target_fps_per_stream": fps,
        "duration_s": duration,
        "sent": sent,
        "processed": sum(processed),
        "dropped": sum(drops.values()),
        "dropped_by_reason": dict(drops),
        "drop_pct": round(100 * sum(drops.values()) / sent, 2) if sent else 0.0,
        "errors": sum(sum(r.errors.values()) for r in results),
        "unanswered": sent - sum(processed) - sum(drops.values()),
        "processed_fps": round(sum(processed) / duration, 2) if duration else 0.0,
        "rtt_ms": percentiles([x for rtts in steady.values() for x in rtts]),
        "drift": drift(send_order_rtts([s for r in results for s in r.samples])),
        "fairness": round(min(processed) / max(processed), 3) if max(processed, default=0) else 0.0,
        # The load generator itself fell behind when it had to skip slots or send late.
        "generator_behind": skipped > 0 or late > 0.05 * max(1, sent),
        "generator_skipped_slots": skipped,
        "generator_late_sends": late,
        "generator_sent_pct_of_schedule": round(100 * sent / expected, 1) if expected else 0.0,
    }
    return {"aggregate": aggregate, "streams": streams}


def write_samples(path: Path, results: list[Tally]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["stream", "frame_id", "send_time_s", "latency_ms"])
        for r in results:
            for frame_id, t, rtt in r.samples:
                w.writerow([r.name, frame_id, f"{t:.4f}", f"{rtt:.3f}"])


def plot(path: Path, results: list[Tally], duration: float, title: str) -> None:
    """Latency over time per stream, processed fps over time, drops over time."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no font downloads (DejaVu ships with it)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    bins = np.arange(0, max(1.0, duration) + 1.0, 1.0)
    many = len(results) > 12  # past a dozen streams a legend is noise
    for r in results:
        if r.samples:
            t = [s[1] for s in r.samples]
            rtt = [s[2] for s in r.samples]
            axes[0].plot(t, rtt, ".", ms=2, alpha=0.6, label=None if many else r.name)
            counts, _ = np.histogram(t, bins)
            axes[1].plot(bins[:-1], counts, lw=0.8, alpha=0.5)
    all_t = [s[1] for r in results for s in r.samples]
    total, _ = np.histogram(all_t, bins)
    axes[1].plot(bins[:-1], total, "k-", lw=2, label="all streams")
    drop_t = [t for r in results for t in r.drop_times]
    dcounts, _ = np.histogram(drop_t, bins)
    axes[2].bar(bins[:-1], dcounts, width=0.9, color="tab:red", align="edge")
    axes[0].set_ylabel("round trip (ms)")
    axes[1].set_ylabel("processed frames / s")
    axes[2].set_ylabel("dropped frames / s")
    axes[2].set_xlabel("seconds since start")
    axes[0].set_title(title)
    if not many and results:
        axes[0].legend(loc="upper left", fontsize=7, ncol=4, markerscale=4)
    axes[1].legend(loc="upper left", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(out: Path, summary: dict[str, Any], results: list[Tally], title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_samples(out / "samples.csv", results)
    plot(out / "report.png", results, summary["aggregate"]["duration_s"], title)


def table(summary: dict[str, Any]) -> Table:
    t = Table(title="vision-stress summary", title_justify="left")
    for col in ("stream", "sent", "processed", "dropped", "fps", "p50", "p95", "p99", "max"):
        t.add_column(col, justify="left" if col == "stream" else "right")
    rows = [*summary["streams"], {**summary["aggregate"], "stream": "ALL"}]
    for row in rows:
        lat = row["rtt_ms"]
        t.add_row(
            row["stream"],
            str(row["sent"]),
            str(row["processed"]),
            str(row["dropped"]),
            f"{row['processed_fps']:.1f}",
            *(f"{lat[k]:.0f}" for k in ("p50", "p95", "p99", "max")),
        )
    return t
