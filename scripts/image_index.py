"""Write the table of a protocol's preprocessed images (the image input of its chunk jobs)."""

import pandas as pd

from lungreg.io import write_table
from lungreg.workflow import limit_threads, log_to

with log_to(snakemake.log[0]):
    limit_threads(snakemake.threads)
    write_table(pd.DataFrame(snakemake.params.rows), snakemake.output[0])
