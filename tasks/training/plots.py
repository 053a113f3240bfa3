"""Training curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io


def curves_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    _train_and_val(ax1, epochs, history, "loss")
    ax1.set_xlabel("epoch")
    if "train_ppl" in history[-1]:  # a language model: perplexity, log scale
        _train_and_val(ax2, epochs, history, "ppl", "perplexity")
        ax2.set_yscale("log")
    elif "val_rmse" in history[-1]:  # a regression: RMSE in the target's units
        ax2.plot(epochs, [h.get("val_rmse") for h in history], color="tab:green")
        ax2.set_ylabel("RMSE (val)")
    else:
        ax2.plot(epochs, [h.get("val_acc") if h.get("val_acc") is not None else h["train_acc"] for h in history],
                 color="tab:green")
        ax2.set_ylabel("accuracy (val)" if any(h.get("val_acc") is not None for h in history) else "accuracy (train)")
        ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _train_and_val(ax, epochs: list, history: list[dict], key: str, label: str | None = None) -> None:
    """``train_<key>`` per epoch, and ``val_<key>`` where any epoch has it, with a legend."""
    ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
    if any(h.get(f"val_{key}") is not None for h in history):
        ax.plot(epochs, [h.get(f"val_{key}") for h in history], label="val")
    ax.set_ylabel(label or key)
    ax.legend()
