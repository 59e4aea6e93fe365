"""The registration network (Christodoulidis et al. 2018) and its training, all of torch in one place.

Modules, lowest first: ``device`` (where torch runs, a job's threads), ``transform`` (the spatial
transformer and the conversion of its grids to physical displacement fields: the voxel conventions
live there), ``scoring`` (the evaluation's metrics in torch, on the registrar's device), ``model``
(the joint affine + deformable network and how it runs fast), ``losses`` (similarity and
regularisers; they know nothing of data) and ``train`` (the training job).
"""
