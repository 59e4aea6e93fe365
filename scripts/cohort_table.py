"""Write the cohort table: subject, label, split."""

from lungreg.io import write_table
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    write_table(snakemake.params.cohort, snakemake.output[0])
