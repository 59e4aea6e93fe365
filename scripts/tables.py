"""Gather every method's per-pair rows into the summary tables."""

from lungreg.tables import build_tables
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    build_tables(
        snakemake.input.cohort,
        snakemake.input.metrics,
        snakemake.input.landmarks,
        {name: snakemake.output[name] for name in snakemake.output.keys()},
        snakemake.input.qc,
        budget_curve=next(iter(snakemake.input.budget_curve), None),
        variant=snakemake.params.variant,
        refine=snakemake.params.refine,
    )
