"""Summarise one field source's out-of-fold predictions: table with intervals, pooled predictions, ROC figure."""

from lungreg.classify.summary import summarize
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    summarize(
        {c: list(snakemake.input[c]) for c in snakemake.params.classifiers},
        snakemake.output.table,
        snakemake.output.predictions,
        snakemake.output.roc,
        snakemake.params.resamples,
        snakemake.params.permutations,
        snakemake.params.seed,
    )
