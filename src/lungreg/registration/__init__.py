"""Registering pairs with every method of the study, and scoring them the same way.

Modules, lowest first: ``base`` (the `Registrar` contract, `LoadedPair`, `RegistrationResult`,
the identity), ``network`` (the trained network as a registrar), ``baselines`` (the classical
methods: SimpleITK and ANTsPy) and ``chunk`` (a method name to its registrar; register, score
and write a chunk of pairs).
"""
