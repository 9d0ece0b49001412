"""The transfer-learning ground truth: classifiers (:mod:`.classifiers`), transfer (:mod:`.learning`) and
the cached ground truth (:mod:`.ground_truth`). Import from the modules: this package re-exports nothing,
so the study protocol (:mod:`simex_ray.protocol`) can sit between them without a cycle."""
