"""Write the table of a protocol's preprocessed images (the image input of its chunk jobs)."""

import pandas as pd

from lungreg.io import write_table
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    write_table(pd.DataFrame(snakemake.params.rows), snakemake.output[0])
