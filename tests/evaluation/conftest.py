from __future__ import annotations

import pytest

from inference.evaluation import Settings

# the smallest settings that still exercise every path: tiny answers, two denoising steps
FAST = Settings(max_new_tokens_answer=3, max_new_tokens_report=6, steps=2)


@pytest.fixture(scope="session")
def tiny_engine():
    from inference.engine import load_engine

    return load_engine("tiny")
