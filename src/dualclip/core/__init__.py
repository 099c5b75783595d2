"""The tensor-level core: features -> branch scores -> maps, with no files, settings objects or modes in it.

- :mod:`dualclip.core.branches`: :class:`BranchScores` (each branch's patch scores) and the text branch.
- :mod:`dualclip.core.maps`: fusion of the branches into maps and image scores, in the run's units or a
  profile's fixed ones (:class:`Fusion` holds the weights), and the normal units of a fit.
- :mod:`dualclip.scoring.sources`: the visual branch, one reference source per mode.

Every function runs on the device of the tensors it is given.
"""

from .branches import BranchScores, text_scores
from .maps import Fusion, fuse_branches, fused_maps, image_scores, normal_scale

__all__ = ["BranchScores", "Fusion", "fuse_branches", "fused_maps", "image_scores", "normal_scale", "text_scores"]
