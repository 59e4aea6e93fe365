# Train the registration network on the training split (a GPU job; falls back to CPU).


rule train:
    input:
        train_inputs,
    output:
        model=model_path("{variant}"),
        log_table=f"{MODEL}/training_log.tsv",
        curve=report(
            f"{MODEL}/training_curve.png",
            caption="../report/training_curve.rst",
            category="Training",
            labels={"variant": "{variant}"},
        ),
    log:
        log_path("train/{variant}"),
    benchmark:
        benchmark_path("train/{variant}")
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]["gpu_jobs"]
    resources:
        gpu=1,
    params:
        train_pairs=pair_rows(training_pairs()),
        validation_pairs=pair_rows(study.validation_pairs(COHORT, FIXED_PHASE)),
        preprocessed=str(PREPROCESSED.root),
        checkpoint=f"{MODEL}/checkpoint.pt",
        model=model_settings,
        loss=LOSS,
        train=config["train"],
        refine=training_refine_section,
        preprocess=PREPROCESS,
    script:
        "../scripts/train.py"
