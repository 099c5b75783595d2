"""docs/method.md §1: resize to S x S (bicubic), 8-bit RGB, normalise with the backbone's mean and std."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError


def to_tensor(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Turn RGB PIL images into a normalised ``(B, 3, size, size)`` float tensor.

    The whole image is resized (no centre crop): a defect near the border must stay visible.
    """
    arrays = []
    for img in images:
        if img.mode != "RGB":
            raise InputError(f"expected an RGB image, got mode {img.mode!r}; load images with dualclip.data.load_image")
        arrays.append(np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - m) / s
