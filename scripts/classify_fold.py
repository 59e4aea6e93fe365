"""Train one classifier on the other folds and predict each fold of this job (a repeat, or one fold of it)."""

from lungreg.classify.crossval import run_parts
from lungreg.network.device import set_threads
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    run_parts(
        snakemake.wildcards.classifier,
        snakemake.params.folds,
        snakemake.input.folds,
        snakemake.input.features,
        snakemake.params.options,
        snakemake.params.seed,
        snakemake.output.predictions,
        snakemake.output.model,
    )
