"""Register, score and write one chunk of pairs with one method."""

from lungreg.network.device import set_threads
from lungreg.registration.chunk import register_chunk_job
from lungreg.workflow import log_to

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    register_chunk_job(
        method=snakemake.wildcards.method,
        protocol=snakemake.wildcards.protocol,
        pair_rows=snakemake.params.pairs,
        preprocessed=snakemake.params.preprocessed,
        truth=snakemake.params.truth,
        options=snakemake.params.inference,
        threads=snakemake.threads,
        model_path=snakemake.input.get("model"),
        folder=snakemake.output.folder,
        metrics=snakemake.output.metrics,
        landmarks=snakemake.output.landmarks,
        baseline_options=snakemake.params.get("baseline"),
        refine=snakemake.params.get("refine"),
        model=snakemake.params.get("model"),
    )
