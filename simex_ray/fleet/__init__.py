"""A fleet: one trained autoencoder per reference part, on disk (:mod:`.manifest`), in memory
(:mod:`.fleet`), and its answer to unknown data (:mod:`.result`). Planning and writing a fleet are in
:mod:`.plan`, training one here in :mod:`.build`."""

from .fleet import Fleet, load_member_model
from .manifest import (FORMAT_VERSION, HASH_CHARS, MANIFEST, WEIGHTS, FleetError, Member, StaleWeightsError,
                       atomic_write_bytes, collect_weights, read_manifest, save_weights, sha256_file, slug,
                       write_manifest)
from .result import (DEFAULT_RANKING, IN_DISTRIBUTION_LEVEL, QUANTILES, RANKINGS, SCORE_FIELDS, ScoreResult,
                     calibration_of, mean_l2_norm, per_sample_scores, percentile_in, score_result)

__all__ = [
    "Fleet", "load_member_model", "FORMAT_VERSION", "HASH_CHARS", "MANIFEST", "WEIGHTS", "FleetError", "Member",
    "StaleWeightsError", "atomic_write_bytes", "collect_weights", "read_manifest", "save_weights", "sha256_file",
    "slug", "write_manifest", "DEFAULT_RANKING", "IN_DISTRIBUTION_LEVEL", "QUANTILES", "RANKINGS", "SCORE_FIELDS",
    "ScoreResult", "calibration_of", "mean_l2_norm", "per_sample_scores", "percentile_in", "score_result",
]
