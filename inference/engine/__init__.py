"""Pure PyTorch UniMedVL engine (no DICOM, no database, no Celery).

from inference.engine import load_engine
engine = load_engine("tiny")            # or a checkpoint folder; device="cuda", dtype=None -> bf16
engine.answer([image], "What is shown?").text
engine.generate_image("a chest X-ray", size=(256, 256), steps=20)   # H x W x 3 uint8
"""

from .api import (
    DEFAULT_REPORT_INSTRUCTION,
    Answer,
    Engine,
    NoTokenizerError,
    build_random,
    build_tiny,
    load_engine,
)
from .loader import CheckpointError

__all__ = [
    "DEFAULT_REPORT_INSTRUCTION",
    "Answer",
    "CheckpointError",
    "Engine",
    "NoTokenizerError",
    "build_random",
    "build_tiny",
    "load_engine",
]
