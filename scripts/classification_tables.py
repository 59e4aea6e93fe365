"""The classification table of the chosen field source, and all sources side by side with their end-point error."""

from lungreg.classify.summary import write_classification_tables
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    write_classification_tables(
        snakemake.params.method,
        {s: snakemake.input[s] for s in snakemake.params.sources},
        snakemake.input.pairs,
        snakemake.params.labelled,
        snakemake.params.synthetic,
        snakemake.output.table,
        snakemake.output.sources,
    )
