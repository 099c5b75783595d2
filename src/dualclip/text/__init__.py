"""Text guidance: prompt ensemble, class names, cached text embeddings."""

from .embeddings import TextEmbeddingCache, text_embeddings
from .prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, build_prompts, readable_class_name

__all__ = [
    "ANOMALOUS_STATES",
    "NORMAL_STATES",
    "TEMPLATES",
    "TextEmbeddingCache",
    "build_prompts",
    "readable_class_name",
    "text_embeddings",
]
