"""Render one subject of the embedded synthetic cohort."""

from pathlib import Path

from lungreg.synthetic.render import synthesize_subject
from lungreg.synthetic.settings import SyntheticCohortSettings
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    settings = SyntheticCohortSettings.from_config(snakemake.params.settings)
    synthesize_subject(settings, snakemake.wildcards.subject, Path(snakemake.output.parameters).parent)
