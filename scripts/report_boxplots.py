"""Dice and landmark-error boxplots of every method from the tables."""

from lungreg.plots import evaluation_figures
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    evaluation_figures(
        snakemake.input.pairs,
        snakemake.input.landmarks,
        snakemake.input.cohort,
        snakemake.output.dice,
        snakemake.output.landmarks,
    )
