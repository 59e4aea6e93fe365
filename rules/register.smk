# Register every pair of a protocol, in chunks (one job per chunk, never one per pair), and
# score each pair with the same evaluation code for every method.


rule register_network:
    input:
        model="results/model/{method}/model.pt",
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
    log:
        "results/logs/register/{method}_{protocol}_{chunk}.log",
    benchmark:
        "results/benchmarks/register/{method}_{protocol}_{chunk}.tsv"
    threads: config["threads"]["gpu_jobs"]
    wildcard_constraints:
        method=alternatives(NETWORK_METHODS),
    resources:
        gpu=1,
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/register_chunk.py"


rule register_unregistered:
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
        inference={**config["inference"], "save_fields": "none"},
    log:
        "results/logs/register/{method}_{protocol}_{chunk}.log",
    benchmark:
        "results/benchmarks/register/{method}_{protocol}_{chunk}.tsv"
    wildcard_constraints:
        method="unregistered",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/register_chunk.py"
