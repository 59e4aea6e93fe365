# Clip, scale and resample both phases of a subject onto one common grid (one job per subject).


# The lung mask of a manifest's phase whose mask cell is empty (CT only): on the image's own grid,
# then preprocessed like a given mask; its checks (volume, lungs found) go to qc.tsv.
rule lung_mask:
    input:
        image=auto_mask_image,
    output:
        mask=str(PREPROCESSED.auto_mask("{subject}", "{phase}")),
        qc=str(PREPROCESSED.auto_mask_qc("{subject}", "{phase}")),
    log:
        log_path("lung_mask/{subject}_{phase}"),
    benchmark:
        benchmark_path("lung_mask/{subject}_{phase}")
    conda:
        "../envs/imaging.yaml"
    params:
        settings=AUTO_MASK,
    script:
        "../scripts/lung_mask.py"


rule preprocess:
    input:
        unpack(subject_inputs),
    output:
        **{
            f"{phase}_{item}": str(getattr(PREPROCESSED, item)("{subject}", phase))
            for phase in ("inhale", "exhale")
            for item in ("image", "mask", "landmarks")
        },
        qc=str(PREPROCESSED.qc("{subject}")),
    log:
        log_path("preprocess/{subject}"),
    benchmark:
        benchmark_path("preprocess/{subject}")
    conda:
        "../envs/imaging.yaml"
    params:
        settings=PREPROCESS,
        reference_phase=FIXED_PHASE,
    script:
        "../scripts/preprocess.py"


# The preprocessed images of an inter-patient protocol in one table: the single image input of
# that protocol's chunk jobs (see INTER_PATIENT_PROTOCOLS in common.smk), so that planning stays
# O(chunks + subjects) for the cohort protocol's tens of thousands of pairs.
rule image_index:
    input:
        image_index_inputs,
    output:
        IMAGE_INDEX,
    log:
        log_path("image_index/{protocol}"),
    benchmark:
        benchmark_path("image_index/{protocol}")
    localrule: True
    conda:
        "../envs/imaging.yaml"
    params:
        rows=image_index_rows,
    script:
        "../scripts/image_index.py"
