"""Classical registration baselines: ANTsPy SyN, SimpleITK affine + B-spline / demons, ConvexAdam, elastix.

Every method here is a `registration.base.Registrar`: it receives the preprocessed fixed and moving
phases (physical geometry in the `sitk.Image` headers) and returns, per pair, the displacement
field on the fixed grid in the project's convention -- (z, y, x, 3) mm, components physical
(x, y, z), T(x) = x + u(x) maps a fixed point to its moving point (ITK's resampling direction) --
plus the affine part, the library's own warped image and notes that become table columns.
Scoring is left to `registration.chunk.run_chunk`, the same for every method.

Modules, lowest first: ``common`` (options every method shares, and the pitfalls each handled
by one small function: masks, initialisation, pyramid, optimiser, flags), ``sitk`` (the
SimpleITK stages), ``ants`` (ANTsPy SyN), ``convexadam`` (PyPI convexadam, on the CPU),
``elastix`` (PyPI itk-elastix, converted through transformix) and ``registrar`` (a method name to
its options and function, as a `Registrar`). Each tool's own conventions and pitfalls are in its
module's docstring, and tests/test_baselines.py checks each converted field against the tool's
own warp. The defaults of every option are those of the workflow's schema
(config/schemas/config.schema.yaml, `baselines:`); tests/test_config.py keeps them equal.

Timing (`seconds`): the registration itself, from the in-memory images to the final transform;
not the conversion to a field, the warped image or any file I/O (for ANTs, the antsRegistration
call, which writes its transforms to a temporary folder internally; for ConvexAdam the
convex_adam_pt call; for elastix the registration call, its log written to a temporary folder).
"""
