"""docs/method.md §3: the prompt ensemble and readable class names."""

from __future__ import annotations

import re

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
    "an industrial photo of the {}.",
    "an industrial photo of a {}.",
)

# MVTec AD and VisA category folder names -> what the object is called in a sentence.
CLASS_NAMES = {
    # MVTec AD
    "bottle": "bottle",
    "cable": "cable",
    "capsule": "capsule",
    "carpet": "carpet",
    "grid": "grid",
    "hazelnut": "hazelnut",
    "leather": "leather",
    "metal_nut": "metal nut",
    "pill": "pill",
    "screw": "screw",
    "tile": "tile",
    "toothbrush": "toothbrush",
    "transistor": "transistor",
    "wood": "wood",
    "zipper": "zipper",
    # VisA
    "candle": "candle",
    "capsules": "capsules",
    "cashew": "cashew",
    "chewinggum": "chewing gum",
    "fryum": "fryum",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    # MPDD / BTAD / others in this project
    "bracket_black": "black bracket",
    "bracket_brown": "brown bracket",
    "bracket_white": "white bracket",
    "connector": "connector",
    "metal_plate": "metal plate",
    "tubes": "tubes",
    "magnetic_tile": "magnetic tile",
}
FALLBACK_CLASS_NAME = "object"


def readable_class_name(name: str | None) -> str:
    """``"metal_nut"`` -> ``"metal nut"``, ``"pcb1"`` -> ``"printed circuit board"``; ``None``/empty -> ``"object"``.

    Unknown names are cleaned (underscores and dashes to spaces, trailing digits dropped).
    """
    if not name or not name.strip():
        return FALLBACK_CLASS_NAME
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in CLASS_NAMES:
        return CLASS_NAMES[key]
    cleaned = re.sub(r"\d+$", "", key).replace("_", " ").strip()
    return re.sub(r"\s+", " ", cleaned) or FALLBACK_CLASS_NAME


def build_prompts(class_name: str, states: tuple[str, ...]) -> list[str]:
    """Every (state, template) sentence for one class."""
    return [template.format(state.format(class_name)) for state in states for template in TEMPLATES]
