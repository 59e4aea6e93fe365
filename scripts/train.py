"""Train the registration network; resumes from its checkpoint when one matches."""

from lungreg.network.device import set_threads
from lungreg.network.train import run_training
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    run_training(
        snakemake.params.train_pairs,
        snakemake.params.validation_pairs,
        snakemake.params.preprocessed,
        snakemake.params.model,
        snakemake.params.loss,
        snakemake.params.train,
        snakemake.params.preprocess,
        model_path=snakemake.output.model,
        log_path=snakemake.output.log_table,
        checkpoint_path=snakemake.params.checkpoint,
        curve_path=snakemake.output.curve,
        refine=snakemake.params.refine,
    )
