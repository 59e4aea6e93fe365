# Classical baselines (ANTsPy SyN, SimpleITK) on the same pairs, scored by the same code.


use rule register_unregistered as register_baseline with:
    wildcard_constraints:
        method=alternatives(BASELINES),
    conda:
        "../envs/baselines.yaml"
    threads: config["threads"]["baselines"]
    params:
        inference=config["inference"],
        baseline=baseline_options,
