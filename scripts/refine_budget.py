"""The refinement at smaller budgets, from the network's prediction and from the identity."""

from lungreg.network.device import set_threads
from lungreg.registration.budget import run_budget_curve
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    run_budget_curve(
        budgets=snakemake.params.budgets,
        variant=snakemake.params.variant,
        model_path=snakemake.input.model,
        model=snakemake.params.model,
        refine=snakemake.params.refine,
        inference=snakemake.params.inference,
        threads=snakemake.threads,
        pair_rows=snakemake.params.pairs,
        preprocessed=snakemake.params.preprocessed,
        truth=snakemake.params.truth,
        metrics=snakemake.output.metrics,
    )
