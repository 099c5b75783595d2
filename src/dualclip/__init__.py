"""dualclip: zero-shot visual anomaly detection and localization with CLIP.

Implements "Dual-Image Enhanced CLIP for Zero-Shot Anomaly Detection" (arXiv 2405.04782): text guidance
with V-V attention, dual-image visual reference, joint scoring and test-time adaptation.
"""

__version__ = "0.3.0"  # first: submodules read it

from .config import AdaptationConfig, DetectorConfig  # noqa: E402
from .detector import DualClipDetector, Prediction, ScoreResult  # noqa: E402

__all__ = ["AdaptationConfig", "DetectorConfig", "DualClipDetector", "Prediction", "ScoreResult", "__version__"]
