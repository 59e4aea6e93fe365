"""Assign the labelled subjects to stratified, seeded cross-validation folds."""

from lungreg.classify.folds import write_folds
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    write_folds(
        snakemake.params.cohort,
        snakemake.params.folds,
        snakemake.params.seed,
        snakemake.output[0],
        snakemake.params.repeats,
    )
