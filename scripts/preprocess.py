"""Preprocess both phases of one subject onto one common grid."""

from pathlib import Path

from lungreg.preprocess import PreprocessSettings, preprocess_subject
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    settings = PreprocessSettings.from_config(snakemake.params.settings, snakemake.params.reference_phase)
    inputs = {key: snakemake.input[key] for key in snakemake.input.keys()}
    preprocess_subject(snakemake.wildcards.subject, inputs, settings, Path(snakemake.output.inhale_image).parent)
