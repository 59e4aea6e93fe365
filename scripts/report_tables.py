"""Every table of results/tables/ on one HTML page for the report."""

from lungreg.plots import tables_page
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    tables_page({name: snakemake.input[name] for name in snakemake.input.keys()}, snakemake.output[0])
