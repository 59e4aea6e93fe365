"""Gather the labelled subjects' inhale-exhale fields (CNN input) and their regional statistics."""

from lungreg.classify.features import build_features
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    build_features(
        snakemake.params.fields,
        snakemake.params.masks,
        snakemake.params.masked,
        snakemake.output.fields,
        snakemake.output.table,
    )
