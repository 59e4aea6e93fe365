"""A figure of one registered pair for the report: its overlay or its Jacobian determinant map."""

from lungreg.plots import pair_figure
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    pair_figure(
        snakemake.params.figure,
        snakemake.params.pair_folder,
        snakemake.input.fixed,
        snakemake.input.moving,
        snakemake.input.fixed_mask,
        snakemake.output[0],
        f"{snakemake.wildcards.method}: {snakemake.wildcards.pair}",
    )
