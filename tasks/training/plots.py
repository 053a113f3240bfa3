"""Training curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io


def curves_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax1.plot(epochs, [h.get("val_loss") for h in history], label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    if "train_ppl" in history[-1]:  # a language model: perplexity, log scale
        ax2.plot(epochs, [h["train_ppl"] for h in history], label="train")
        if any(h.get("val_ppl") is not None for h in history):
            ax2.plot(epochs, [h.get("val_ppl") for h in history], label="val")
        ax2.set_yscale("log")
        ax2.set_ylabel("perplexity")
        ax2.legend()
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
