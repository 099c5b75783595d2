"""Verdict thresholds: manual, a quantile of normal images' scores, or F1-optimal on a labelled set.

A threshold is never fitted on the images being judged. ``verdict`` is the one place a score becomes a
verdict: ``"defective"`` where ``score >= threshold``, ``"unusable"`` for an image a profile's
out-of-distribution guard refused; a score that is not a finite number has no verdict (:func:`score_error`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .errors import ConfigError, InputError
from .metrics import best_f1_threshold


@dataclass(frozen=True)
class Threshold:
    """A verdict threshold and where it came from (``value=None``: scores only, no verdicts)."""

    value: float | None
    source: str

    def __post_init__(self) -> None:
        if self.value is not None and not math.isfinite(self.value):
            raise ConfigError(f"a threshold must be a finite number, got {self.value}")

    def verdict(self, score: float, unusable: str | None = None) -> str | None:
        """``"unusable"`` where the image is out of distribution (``unusable``: the reason), else ``"defective"``
        if ``score >= value``, else ``"ok"``; ``None`` without a threshold. A score that is not a finite number
        is a ``ValueError`` (see :func:`score_error`): it never becomes a verdict."""
        problem = score_error(score)
        if problem:
            raise ValueError(problem)
        if unusable:
            return UNUSABLE
        if self.value is None:
            return None
        return "defective" if score >= self.value else "ok"

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


UNUSABLE = "unusable"
"""The verdict of an image outside a profile's distribution (a blank frame, another product)."""


def score_error(score: float) -> str | None:
    """Why ``score`` cannot be judged (it is not a finite number), or ``None``: the error of that image."""
    if score is not None and math.isfinite(score):
        return None
    return f"the score is not a finite number ({score}): no verdict (the profile or the image gives no usable score)"


NO_THRESHOLD = Threshold(None, "none (no verdicts: give a threshold, a threshold quantile or validation images)")


def manual_threshold(value: float) -> Threshold:
    """A threshold given by hand (must be finite)."""
    return Threshold(float(value), "manual")


def quantile_threshold(normal_scores: ArrayLike, q: float) -> Threshold:
    """The ``q``-quantile (``numpy.quantile``, linear) of the scores of normal images."""
    if not 0.0 <= q <= 1.0 or not math.isfinite(q):
        raise ConfigError(f"the threshold quantile must lie in [0, 1], got {q}")
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size < 2:
        raise InputError("a quantile threshold needs the scores of at least 2 normal images")
    return Threshold(float(np.quantile(scores, q)), f"quantile {q} of {scores.size} reference scores")


def f1_threshold(labels: ArrayLike, scores: ArrayLike) -> Threshold:
    """The score threshold with the best F1 on labelled images (exact, over all distinct scores)."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0 or labels.min() == labels.max():
        raise InputError("the validation set needs both normal and anomalous images to fit a threshold")
    n_anomalous = int((labels > 0).sum())
    return Threshold(
        best_f1_threshold(labels, scores),
        f"F1-optimal on validation ({labels.size - n_anomalous} normal, {n_anomalous} anomalous)",
    )


def fit_threshold(
    detector,
    normal: Sequence,
    anomalous: Sequence | None = None,
    quantile: float | None = None,
    class_name: str | None = None,
) -> Threshold:
    """Fit a threshold with ``detector``: with ``anomalous``, F1-optimal on ``normal + anomalous`` scored as one
    run; else the ``quantile`` of the ``normal`` images scored among themselves (default 0.99)."""
    if anomalous is not None:
        result = detector.score_images(list(normal) + list(anomalous), class_name=class_name)
        labels = np.array([0] * len(normal) + [1] * len(anomalous))
        return f1_threshold(labels, result.image_scores.numpy())
    result = detector.score_images(list(normal), class_name=class_name)
    return quantile_threshold(result.image_scores.numpy(), 0.99 if quantile is None else quantile)
