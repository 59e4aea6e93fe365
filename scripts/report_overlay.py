"""Overlay figure of one registered pair: fixed, moving, warped, checkerboard, differences."""

from lungreg.plots import overlay_figure
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    overlay_figure(snakemake.params.pair_folder, snakemake.input.fixed, snakemake.input.moving,
                   snakemake.input.fixed_mask, snakemake.output[0],
                   f"{snakemake.wildcards.method}: {snakemake.wildcards.pair}")
