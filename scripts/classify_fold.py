"""Train one classifier on the other folds and predict this fold."""

from lungreg.classify.crossval import run_fold
from lungreg.network.device import set_threads
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    run_fold(
        snakemake.wildcards.classifier,
        int(snakemake.wildcards.fold),
        snakemake.input.folds,
        snakemake.input.features,
        snakemake.params.options,
        snakemake.params.seed,
        snakemake.output.predictions,
        snakemake.output.model,
    )
