# Register every pair of a protocol, in chunks (one job per chunk, never one per pair), and
# score each pair with the same evaluation code for every method. One rule: the identity
# ("unregistered") here, the network variants below and the classical baselines
# (rules/baselines.smk) are the same rule with their own inputs, threads, resources and
# environment.


rule register_unregistered:
    input:
        pairs=chunk_inputs,
    output:
        folder=directory(CHUNK),
        metrics=f"{CHUNK}_metrics.tsv",
        landmarks=f"{CHUNK}_landmarks.tsv",
    log:
        log_path("register/{method}_{protocol}_{chunk}"),
    benchmark:
        benchmark_path("register/{method}_{protocol}_{chunk}")
    wildcard_constraints:
        method="unregistered",
    conda:
        "../envs/torch.yaml"
    params:
        pairs=chunk_pair_rows,
        truth=chunk_truth,
        preprocessed=str(PREPROCESSED.root),
        inference={**config["inference"], "save_fields": "none"},
    script:
        "../scripts/register_chunk.py"


use rule register_unregistered as register_network with:
    input:
        model=network_model,
        pairs=chunk_inputs,
    wildcard_constraints:
        method=alternatives(study.NETWORK_METHODS),
    threads: config["threads"]["gpu_jobs"]
    resources:
        gpu=1,
    params:
        inference=config["inference"],
        refine=refine_section,


use rule register_unregistered as register_identity_refined with:
    wildcard_constraints:
        method=study.IDENTITY_REFINED,
    threads: config["threads"]["gpu_jobs"]
    resources:
        gpu=1,
    params:
        inference=config["inference"],
        refine=refine_section,
        model=config["model"],


rule refine_budget:
    input:
        unpack(budget_curve_inputs),
    output:
        metrics=BUDGET_CURVE,
    log:
        log_path("register/refine_budget"),
    benchmark:
        benchmark_path("register/refine_budget")
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]["gpu_jobs"]
    resources:
        gpu=1,
    params:
        budgets=config["refine"]["budget_curve"],
        variant=BUDGET_VARIANT,
        model=config["model"],
        refine=refine_settings(),
        inference=config["inference"],
        pairs=pair_rows(budget_pairs()),
        preprocessed=str(PREPROCESSED.root),
        truth=budget_curve_truth,
    script:
        "../scripts/refine_budget.py"
