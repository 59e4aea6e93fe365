"""The embedded synthetic cohort: inhale/exhale lung MRI-like volumes with exact ground truth.

Why it exists: the workflow must run end to end (training, registration, evaluation, ILD
classification) without any real data, and its registration metrics must be checkable
against a known answer.  Each subject has an inhale and an exhale 3D volume, lung masks,
11 corresponding landmarks per phase and the exact displacement field between the phases.

Modules, lowest first: ``settings`` (what defines the cohort, and its subject table: cheap,
read when the workflow is planned), ``anatomy`` (the analytic anatomy, poses and breathing of
one subject), ``render`` (its images, masks, landmarks and exact fields, written to files) and
``calibration`` (how well the ground-truth motion separates ILD from healthy).

Grid: all images of all subjects lie on one scanner grid: identity direction, spacing =
field_of_view_mm / shape, centred on the world origin.  Arrays are (z, y, x); vector images
hold (x, y, z) components in mm.  Displacement fields are stored as float32 to halve their
size; ``sitk.DisplacementFieldTransform`` needs float64, so cast first:
``sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))``.
"""
