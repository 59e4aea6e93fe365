# Classical baselines (ANTsPy SyN, SimpleITK) on the same pairs, scored by the same code.


rule register_baseline:
    input:
        pairs=chunk_inputs,
    output:
        folder=directory("results/registration/{method}/{protocol}/chunk-{chunk}"),
        metrics="results/registration/{method}/{protocol}/chunk-{chunk}_metrics.tsv",
        landmarks="results/registration/{method}/{protocol}/chunk-{chunk}_landmarks.tsv",
    params:
        method=method_name,
        pairs=chunk_pair_rows,
        truth=chunk_truth,
        preprocessed=str(PREPROCESSED.root),
        inference=config["inference"],
        baseline=baseline_options,
    log:
        "results/logs/register/{method}_{protocol}_{chunk}.log",
    benchmark:
        "results/benchmarks/register/{method}_{protocol}_{chunk}.tsv"
    threads: config["threads"]["baselines"]
    wildcard_constraints:
        method=alternatives(BASELINES) if BASELINES else "^$",
    conda:
        "../envs/baselines.yaml"
    script:
        "../scripts/register_chunk.py"
