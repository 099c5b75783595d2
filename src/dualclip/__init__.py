"""dualclip: zero-shot visual anomaly detection and localization with CLIP.

Implements "Dual-Image Enhanced CLIP for Zero-Shot Anomaly Detection" (arXiv 2405.04782): text guidance
with V-V attention, dual-image visual reference, joint scoring and test-time adaptation.
"""

__version__ = "0.3.0"  # first: submodules read it

from .config import AdaptationConfig, DetectorConfig, ExecutionSettings, MethodSettings  # noqa: E402

__all__ = [
    "AdaptationConfig",
    "DetectorConfig",
    "DualClipDetector",
    "ExecutionSettings",
    "MethodSettings",
    "Prediction",
    "Predictions",
    "ScoreResult",
    "__version__",
]

_DETECTOR = ("DualClipDetector", "Prediction", "Predictions", "ScoreResult")


def __getattr__(name: str):
    """The detector's names, imported on first use (PEP 562): ``import dualclip`` and ``dualclip --help`` stay
    free of torch and open_clip."""
    if name in _DETECTOR:
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'dualclip' has no attribute {name!r}")
