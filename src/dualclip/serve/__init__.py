"""The inspection service: ``dualclip serve --profile PROFILE`` (FastAPI + uvicorn, extra ``dualclip[serve]``)."""

from .app import ServeSettings, create_app
from .batching import MicroBatcher

__all__ = ["MicroBatcher", "ServeSettings", "create_app"]
