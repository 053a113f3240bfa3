"""Batch occupancy over time as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io


def occupancy_png(series: list[dict]) -> bytes:
    """One line per group (``{"group", "worker", "max_batch", "points": [[s, running, tokens], ...]}``):
    running sequences per engine step over the task's time, against its ``max_batch``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    for s in series:
        points = s["points"]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1,
                label=f"group {s['group']} ({s['worker']})")
    if series:
        ax.axhline(max(s["max_batch"] for s in series), color="grey", linestyle="--", linewidth=1, label="max batch")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("seconds into the task")
    ax.set_ylabel("running sequences")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
