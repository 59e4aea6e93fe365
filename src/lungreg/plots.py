"""Figures (matplotlib, written atomically as PNG)."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from . import io  # noqa: E402
from .geometry import Grid  # noqa: E402
from .metrics import jacobian_determinant  # noqa: E402
from .study import PROTOCOLS, evaluation_subjects, method_label, method_rank  # noqa: E402


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


# ------------------------------------------------------------------ report figures
#
# The figures of `snakemake --report`. Slices are shown in array axes of the (preprocessed) fixed
# grid with its physical aspect ratio: axial (z fixed; anterior up), coronal and sagittal
# (y or x fixed; superior up), which is the radiological view for the usual identity direction.

PLANES = ("axial", "coronal", "sagittal")


def _slice(array, plane: str, index: int):
    """One plane of a (z, y, x) array, oriented for imshow(origin='lower')."""
    if plane == "axial":
        return array[index][::-1]  # y down the page: anterior (small y in LPS) at the top
    if plane == "coronal":
        return array[:, index, :]
    return array[:, :, index]


def _aspect(spacing_xyz, plane: str) -> float:
    sx, sy, sz = spacing_xyz
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


def slice_indices(mask) -> dict[str, int]:
    """Slice of each plane with the largest area of `mask` (so that the sagittal slice cuts a lung,
    not the mediastinum between them); the middle of the volume when the mask is empty."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return {plane: n // 2 for plane, n in zip(PLANES, mask.shape)}
    areas = {"axial": mask.sum(axis=(1, 2)), "coronal": mask.sum(axis=(0, 2)), "sagittal": mask.sum(axis=(0, 1))}
    return {plane: int(np.argmax(area)) for plane, area in areas.items()}


def checkerboard(a, b, tiles: int = 6):
    """`a` and `b` in alternating square tiles (about `tiles` across the larger side)."""
    side = max(1, max(a.shape) // tiles)
    rows, columns = np.indices(a.shape)
    return np.where(((rows // side) + (columns // side)) % 2 == 0, a, b)


def registration_overlay(fixed, moving, warped, spacing_xyz, path: str | Path, mask=None, title: str = "") -> None:
    """Fixed, moving and warped moving image, a fixed/warped checkerboard and the differences
    fixed - moving (before) and fixed - warped (after): one row per plane through the lung.

    Arrays (z, y, x) on one grid (a subject's two phases share the preprocessed grid), [0, 1].
    """
    indices = slice_indices(fixed > 0 if mask is None else mask)
    fixed, moving, warped = (np.asarray(a, float) for a in (fixed, moving, warped))
    limit = max(
        1e-6, float(np.percentile(np.abs(np.concatenate([(fixed - moving).ravel(), (fixed - warped).ravel()])), 99.5))
    )
    columns = [
        ("fixed", lambda p, i: _slice(fixed, p, i), "gray", (0, 1)),
        ("moving", lambda p, i: _slice(moving, p, i), "gray", (0, 1)),
        ("warped moving", lambda p, i: _slice(warped, p, i), "gray", (0, 1)),
        (
            "checkerboard fixed / warped",
            lambda p, i: checkerboard(_slice(fixed, p, i), _slice(warped, p, i)),
            "gray",
            (0, 1),
        ),
        ("fixed - moving", lambda p, i: _slice(fixed - moving, p, i), "RdBu_r", (-limit, limit)),
        ("fixed - warped", lambda p, i: _slice(fixed - warped, p, i), "RdBu_r", (-limit, limit)),
    ]
    figure, axes = plt.subplots(
        len(PLANES), len(columns), figsize=(2.1 * len(columns), 2.2 * len(PLANES)), squeeze=False
    )
    for row, plane in enumerate(PLANES):
        for column, (name, image, cmap, (low, high)) in enumerate(columns):
            axis = axes[row, column]
            shown = axis.imshow(
                image(plane, indices[plane]),
                cmap=cmap,
                vmin=low,
                vmax=high,
                origin="lower",
                aspect=_aspect(spacing_xyz, plane),
                interpolation="nearest",
            )
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
            if column == 0:
                axis.set_ylabel(f"{plane} {indices[plane]}", fontsize=9)
        if row == 0:
            figure.colorbar(shown, ax=axes[:, -2:].ravel().tolist(), shrink=0.6, label="intensity difference")
    if title:
        figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def jacobian_map(determinant, background, mask, spacing_xyz, path: str | Path, title: str = "") -> None:
    """det J of a field inside the fixed lung mask over the fixed image, a slice in each plane;
    blue: local compression (< 1), red: expansion (> 1), black contour: det J <= 0 (folding)."""
    mask = np.asarray(mask, bool)
    inside = determinant[mask] if mask.any() else np.asarray(determinant).ravel()
    spread = max(1e-3, float(np.percentile(np.abs(inside - 1.0), 99)))
    norm = TwoSlopeNorm(vcenter=1.0, vmin=1.0 - spread, vmax=1.0 + spread)
    shown_determinant = np.where(mask, determinant, np.nan)
    indices = slice_indices(mask)
    figure, axes = plt.subplots(1, len(PLANES), figsize=(3.2 * len(PLANES), 3.3), squeeze=False)
    for axis, plane in zip(axes[0], PLANES):
        aspect = _aspect(spacing_xyz, plane)
        axis.imshow(
            _slice(background, plane, indices[plane]),
            cmap="gray",
            vmin=0,
            vmax=1,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
        shown = axis.imshow(
            _slice(shown_determinant, plane, indices[plane]),
            cmap="RdBu_r",
            norm=norm,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
        folded = _slice(np.where(mask, determinant <= 0, False), plane, indices[plane])
        if folded.any():
            axis.contour(folded.astype(float), levels=[0.5], colors="black", linewidths=0.8)
        axis.set(xticks=[], yticks=[], title=f"{plane} {indices[plane]}")
    figure.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="Jacobian determinant")
    figure.suptitle(title or "Jacobian determinant inside the fixed lung mask", fontsize=10)
    save_figure(figure, path)


def _evaluated(pairs: pd.DataFrame, cohort: pd.DataFrame) -> pd.DataFrame:
    """Pairs between evaluation subjects (as in `tables.summary_tables`)."""
    evaluation = set(evaluation_subjects(cohort))
    return pairs[pairs["moving_subject"].isin(evaluation) & pairs["fixed_subject"].isin(evaluation)]


def _method_boxes(axis, groups: dict[str, "pd.Series"], ylabel: str, title: str) -> None:
    """A box per method with its points jittered on top (cohorts can be small)."""
    names = list(groups)
    axis.set(ylabel=ylabel, title=title)
    if not names:
        axis.text(0.5, 0.5, "no values", ha="center", va="center", transform=axis.transAxes)
        return
    values = [groups[m].dropna().to_numpy(float) for m in names]
    axis.boxplot(values, showfliers=False, widths=0.6)
    jitter = np.random.default_rng(0)
    for position, points in enumerate(values, start=1):
        axis.plot(position + jitter.uniform(-0.15, 0.15, len(points)), points, ".", color="tab:blue", alpha=0.6, ms=4)
    axis.set_xticks(range(1, len(names) + 1), [method_label(m) for m in names], rotation=25, ha="right", fontsize=8)


def _ordered_methods(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["method"]))
    return sorted(present, key=method_rank)


def dice_boxplot(pairs: pd.DataFrame, cohort: pd.DataFrame, path: str | Path) -> None:
    """Lung Dice (%) of the evaluation pairs, a box per method, one panel per protocol."""
    scored = _evaluated(pairs, cohort)
    protocols = [p for p in PROTOCOLS if (scored["protocol"] == p).any()]
    figure, axes = plt.subplots(
        1, max(1, len(protocols)), figsize=(3.6 * max(1, len(protocols)), 3.6), squeeze=False, layout="constrained"
    )
    for axis, protocol in zip(axes[0], protocols):
        rows = scored[scored["protocol"] == protocol]
        _method_boxes(
            axis,
            {m: 100 * rows.loc[rows["method"] == m, "dice"] for m in _ordered_methods(rows)},
            "Dice (%)",
            f"{protocol} ({rows['pair'].nunique()} pairs)",
        )
    save_figure(figure, path)


def landmark_boxplot(landmarks: pd.DataFrame, pairs: pd.DataFrame, cohort: pd.DataFrame, path: str | Path) -> None:
    """Landmark errors |dx|, |dy|, |dz| and ds (mm) of the evaluation subjects' inhale-exhale
    pairs, in-view landmarks only, a box per method."""
    scored = _evaluated(pairs, cohort)
    chosen = set(scored.loc[scored["protocol"] == "inhale_exhale", "pair"])
    rows = landmarks[
        landmarks["pair"].isin(chosen) & (landmarks["protocol"] == "inhale_exhale") & landmarks["in_view"].astype(bool)
    ]
    figure, axes = plt.subplots(1, 4, figsize=(13, 3.6), squeeze=False, layout="constrained")
    for axis, column in zip(axes[0], ("dx", "dy", "dz", "ds")):
        _method_boxes(
            axis,
            {m: rows.loc[rows["method"] == m, column] for m in _ordered_methods(rows)},
            "mm",
            f"|{column}|" if column != "ds" else "ds (Euclidean)",
        )
    figure.suptitle(f"Landmark errors, {len(chosen)} inhale-exhale pairs", fontsize=10)
    save_figure(figure, path)


BUDGET_METRICS = (("dice_mean", "Dice (%)"), ("ds_mean", "landmark ds (mm)"), ("epe_mean", "end-point error (mm)"))
BUDGET_STARTS = {"network": "from the network's prediction", "identity": "from the identity (no network)"}


def refine_budget_figure(table: pd.DataFrame, path: str | Path) -> None:
    """Accuracy against the refinement's budget (results/tables/refine_budget.tsv), from the
    network's prediction and from the identity: against the steps (top) and the seconds per pair
    (bottom); a metric without values (e.g. the end-point error on real data) is left out."""
    metrics = [(column, label) for column, label in BUDGET_METRICS if table[column].notna().any()]
    figure, axes = plt.subplots(2, len(metrics), figsize=(3.6 * len(metrics), 6.4), squeeze=False, layout="constrained")
    for column_axes, (column, label) in zip(axes.T, metrics):
        for axis, x, xlabel in zip(
            column_axes, ("steps", "seconds_per_pair"), ("refinement steps", "seconds per pair")
        ):
            for start, name in BUDGET_STARTS.items():
                rows = table[table["start"] == start].sort_values("steps")
                axis.plot(rows[x], rows[column], "o-", label=name)
            axis.set(xlabel=xlabel, ylabel=label)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(f"Refinement budget, {int(table['pairs'].max())} inhale-exhale pairs", fontsize=10)
    save_figure(figure, path)


def budget_figure(table_path: str | Path, path: str | Path) -> None:
    refine_budget_figure(io.read_table(table_path), path)


# ----------------------------------------------------------- report jobs (file paths)


def overlay_figure(
    pair_folder: str | Path,
    fixed_image: str | Path,
    moving_image: str | Path,
    fixed_mask: str | Path,
    path: str | Path,
    title: str = "",
) -> None:
    """The overlay of one registered pair from the workflow's files (pair folder: warped.nii.gz)."""
    images = {
        name: io.read_intermediate_image(p)
        for name, p in (
            ("fixed", fixed_image),
            ("moving", moving_image),
            ("warped", Path(pair_folder) / "warped.nii.gz"),
            ("mask", fixed_mask),
        )
    }
    arrays = {name: sitk.GetArrayFromImage(image) for name, image in images.items()}
    registration_overlay(
        arrays["fixed"],
        arrays["moving"],
        arrays["warped"],
        images["fixed"].GetSpacing(),
        path,
        mask=arrays["mask"] > 0,
        title=title or Path(pair_folder).name,
    )


def jacobian_figure(
    pair_folder: str | Path, fixed_image: str | Path, fixed_mask: str | Path, path: str | Path, title: str = ""
) -> None:
    """The Jacobian determinant map of one pair's displacement field, inside the fixed lung."""
    field = io.read_intermediate_image(Path(pair_folder) / "displacement.nii.gz")
    determinant = jacobian_determinant(sitk.GetArrayFromImage(field).astype(float), Grid.of(field))
    background = sitk.GetArrayFromImage(io.read_intermediate_image(fixed_image))
    mask = sitk.GetArrayFromImage(io.read_intermediate_image(fixed_mask)) > 0
    jacobian_map(
        determinant,
        background,
        mask,
        field.GetSpacing(),
        path,
        title or f"Jacobian determinant, {Path(pair_folder).name}",
    )


def pair_figure(
    kind: str,
    pair_folder: str | Path,
    fixed_image: str | Path,
    moving_image: str | Path,
    fixed_mask: str | Path,
    path: str | Path,
    label: str,
) -> None:
    """A report figure of one registered pair: its `overlay` or its `jacobian` map (label: "method: pair")."""
    if kind == "overlay":
        overlay_figure(pair_folder, fixed_image, moving_image, fixed_mask, path, label)
    elif kind == "jacobian":
        jacobian_figure(pair_folder, fixed_image, fixed_mask, path, f"Jacobian determinant, {label}")
    else:
        raise ValueError(f"unknown pair figure {kind!r}: expected overlay or jacobian")


def evaluation_figures(
    pairs_table: str | Path,
    landmarks_table: str | Path,
    cohort_table: str | Path,
    dice_path: str | Path,
    landmarks_path: str | Path,
) -> None:
    """Dice and landmark-error boxplots from the workflow's tables."""
    pairs, cohort = io.read_table(pairs_table), io.read_table(cohort_table)
    dice_boxplot(pairs, cohort, dice_path)
    landmark_boxplot(io.read_table(landmarks_table), pairs, cohort, landmarks_path)


TABLE_STYLE = """body{font-family:sans-serif;font-size:13px;margin:12px}h2{font-size:15px;margin:18px 0 4px}
p{color:#444;margin:2px 0 6px}table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 6px;
text-align:right;white-space:nowrap}th{background:#f0f0f0}div.scroll{overflow-x:auto;max-height:420px}"""


def tables_page(tables: dict[str, str | Path], path: str | Path, max_rows: int = 200) -> None:
    """Every table in one self-contained HTML page (the report shows TSVs only as downloads)."""
    sections = []
    for name, table_path in tables.items():
        frame = io.read_table(table_path)
        shown = frame.head(max_rows)
        note = f"{len(frame)} rows" + (f", the first {max_rows} shown" if len(frame) > max_rows else "")
        sections.append(
            f"<h2>{html.escape(name)}</h2><p>{html.escape(Path(table_path).name)}: {note}</p>"
            f"<div class='scroll'>{shown.to_html(index=False, na_rep='', float_format=lambda v: f'{v:.4g}')}</div>"
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lungreg tables</title>"
        f"<style>{TABLE_STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )
    io.write_text(page, path)
