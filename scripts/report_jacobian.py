"""Jacobian determinant map of one pair's displacement field inside the fixed lung."""

from lungreg.plots import jacobian_figure
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    jacobian_figure(snakemake.params.pair_folder, snakemake.input.fixed, snakemake.input.fixed_mask,
                    snakemake.output[0], f"Jacobian determinant, {snakemake.wildcards.method}: {snakemake.wildcards.pair}")
