"""Scoring: text guidance (§4), dual-image visual reference (§5), joint scoring (§6)."""

from .fusion import fuse, gaussian_blur, map_scores, normalize_branch, resize_map, upsample
from .matching import (
    bank_distances,
    bank_distances_batched,
    combine_parts,
    distance_parts,
    match_spaces,
    nearest_distances,
    to_match_space,
)
from .position import centre, positional_offsets
from .reference import aggregate, golden_reference_scores, near_duplicates, pair_references, reference_scores
from .text import text_anomaly_scores

__all__ = [
    "aggregate",
    "bank_distances",
    "bank_distances_batched",
    "centre",
    "positional_offsets",
    "combine_parts",
    "distance_parts",
    "match_spaces",
    "nearest_distances",
    "to_match_space",
    "fuse",
    "gaussian_blur",
    "golden_reference_scores",
    "map_scores",
    "near_duplicates",
    "normalize_branch",
    "pair_references",
    "reference_scores",
    "resize_map",
    "text_anomaly_scores",
    "upsample",
]
