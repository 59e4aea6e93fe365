"""The refinement's accuracy against its budget, from the network and from the identity."""

from lungreg.plots import budget_figure
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    budget_figure(snakemake.input.table, snakemake.output[0])
