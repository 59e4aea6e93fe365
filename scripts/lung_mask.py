"""The automatic lung mask of a phase without one (CT in Hounsfield units)."""

from lungreg.lungmask import AutoMaskSettings
from lungreg.preprocess import auto_lung_mask
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    settings = AutoMaskSettings.from_config(snakemake.params.settings)
    auto_lung_mask(
        snakemake.wildcards.subject,
        snakemake.wildcards.phase,
        snakemake.input.image,
        settings,
        snakemake.output.mask,
        snakemake.output.qc,
    )
