"""docs/method.md §4: text-guided scores, ``softmax(tau * [<f, t_n>, <f, t_a>])[anomalous]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_anomaly_scores(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability of the anomalous state for every feature vector.

    Parameters
    ----------
    features:
        ``(..., D)`` image or patch embeddings in the joint space (normalised here).
    text:
        ``(2, D)`` normalised ``[t_n, t_a]``.
    temperature:
        tau, CLIP's logit scale.

    Returns
    -------
    ``(...)`` scores in (0, 1). Each vector's score is computed on its own (a product and a sum over D, not
    a matrix product whose blocking depends on how many vectors there are): the same in any batch.
    """
    f = F.normalize(features.float(), dim=-1).unsqueeze(-2)  # (..., 1, D)
    logits = temperature * (f * text.to(features.device).float()).sum(dim=-1)  # (..., 2)
    return logits.softmax(dim=-1)[..., 1]
