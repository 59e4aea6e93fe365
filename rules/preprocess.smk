# Clip, scale and resample both phases of a subject onto one common grid (one job per subject).


rule preprocess:
    input:
        unpack(subject_inputs),
    output:
        **{
            f"{phase}_{item}": f"results/preprocessed/{{subject}}/{phase}_{item}{suffix}"
            for phase in ("inhale", "exhale")
            for item, suffix in (("image", ".nii.gz"), ("mask", ".nii.gz"), ("landmarks", ".csv"))
        },
    params:
        settings=config["preprocess"],
        reference_phase=FIXED_PHASE,
    log:
        "results/logs/preprocess/{subject}.log",
    benchmark:
        "results/benchmarks/preprocess/{subject}.tsv"
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/preprocess.py"
