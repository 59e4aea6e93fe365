"""ILD classification (healthy vs ILD) from the residual motion of each patient's own registration.

What the classifiers see (Christodoulidis et al. 2018, "Clinical relevance"): for every labelled
subject, the residual deformation G - G_I of its inhale -> exhale registration by the trained
network, i.e. the displacement field (3 components x, y, z, mm, ITK convention) on the fixed
phase's common grid, optionally multiplied by the fixed lung mask.  The registration never sees
a label.

Two classifiers, cross-validated on exactly the same folds:

* ``cnn``: a shallow 3D CNN on the field (average-pooled by ``pool`` inside the network), binary
  cross-entropy -- class-weighted by default (``pos_weight`` = healthy / ILD count of the
  *training* fold, so the majority class does not win by default) -- Adam, learning rate 1e-4
  halved every 50 epochs (``StepLR``), a fixed number of epochs (no early stopping, so nothing is
  tuned on the test fold), seeded: on CPU two runs give the same weights.  By default each
  field is centred on its own lung mean (``center_fields``, per subject, label-free) and
  training mirrors subjects left-right at random (``flip``); both helped on the synthetic
  cohort (ground-truth fields, 36 subjects, 3x the default effect: balanced accuracy 0.72 ->
  0.86-0.89).
* ``logistic`` (and optionally ``random_forest``): scikit-learn on pooled regional statistics of
  the field (``regional_features``), standardised inside a ``Pipeline`` so that the scaler is
  fitted on the training fold only.

No information from a test fold reaches its model: the fold split is fixed before training
(``make_folds``: stratified, patient level, seeded), the CNN's input scaling (``FieldScaler``)
and the class weights are fitted on the training fold, and the decision threshold is a fixed 0.5.

Modules, lowest first: ``folds`` (the patient-level folds and the labels' encoding),
``features`` (what the classifiers read), ``cnn`` and ``tabular`` (the two kinds of classifier),
``crossval`` (one fold job: train on the other folds, predict this one) and ``summary`` (the
classification table and the ROC figure). Which classifiers exist, and what each reads, is
``lungreg.study.CLASSIFIERS``.

Files (see rules/classify.smk): ``folds.tsv`` (subject, label, fold); ``fields.pt`` (the CNN
input of every labelled subject) and ``regional_features.tsv`` (subject + statistics, no
labels); per classifier and fold ``predictions.tsv`` (subject, label, fold, probability,
predicted) and ``classifier.pt``; the summary ``results/tables/classification.tsv``
(``summary_table``) and a ROC figure of the pooled out-of-fold predictions.
"""
