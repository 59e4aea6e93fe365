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


# The preprocessed images of an inter-patient protocol in one table: the single image input of
# that protocol's chunk jobs (see INTER_PATIENT_PROTOCOLS in common.smk), so that planning stays
# O(chunks + subjects) for the cohort protocol's tens of thousands of pairs.
rule image_index:
    input:
        image_index_inputs,
    output:
        "results/preprocessed/{protocol}_images.tsv",
    params:
        rows=image_index_rows,
    log:
        "results/logs/image_index/{protocol}.log",
    benchmark:
        "results/benchmarks/image_index/{protocol}.tsv"
    localrule: True
    conda:
        "../envs/imaging.yaml"
    script:
        "../scripts/image_index.py"
