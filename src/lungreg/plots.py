"""Figures (matplotlib, written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from . import io  # noqa: E402


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)


def training_curve(history: pd.DataFrame, path: str | Path) -> None:
    """Training and validation loss, and validation Dice against the unregistered Dice."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    loss_axis.plot(history["epoch"], history["train_loss"], label="training")
    loss_axis.plot(history["epoch"], history["val_loss"], label="validation")
    loss_axis.set(xlabel="epoch", ylabel="loss", yscale="log", title="Loss")
    loss_axis.legend()
    dice_axis.plot(history["epoch"], 100 * history["val_dice"], label="registered")
    dice_axis.plot(history["epoch"], 100 * history["val_dice_unregistered"], "--", label="unregistered")
    dice_axis.set(xlabel="epoch", ylabel="Dice (%)", title="Validation lung Dice")
    dice_axis.legend()
    save_figure(figure, path)
