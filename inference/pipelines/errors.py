"""The pipelines' error types: bad input is a PipelineError with one readable sentence;
anything else is a bug and propagates with its traceback.

Input errors come from three typed sources only: ``PreprocessError`` (pixels that cannot be
turned into a model image), ``SourceError`` (a source a writer cannot carry) and the engine's
``InputError`` (an image or parameter the engine refuses). A plain ``ValueError`` is NOT an
input error: numpy raises one for a broadcast bug, and recording that as "bad input" would make
a transient or code fault look permanent and skip its retry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from inference.engine.errors import InputError as EngineInputError
from inference.preprocess import PreprocessError
from sr_writers import SourceError

MAX_REASON = 1000


class PipelineError(ValueError):
    """A task that cannot succeed with these inputs (undecodable pixels, bad parameters, a source
    the writer cannot carry, an engine refusal). ``reason`` is one readable sentence for the job's
    failure record; retrying the same job gives the same error, so it is not worth a retry."""

    def __init__(self, reason: str) -> None:
        # One line for the job record: codec errors come as indented multi-line lists.
        reason = " ".join(str(reason).split())
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 3] + "..."
        super().__init__(reason)
        self.reason = reason


# The exception types that mean "this input cannot be processed" (never a bare ValueError).
INPUT_ERRORS: tuple[type[Exception], ...] = (PipelineError, PreprocessError, SourceError, EngineInputError)


@contextlib.contextmanager
def readable_errors(stage: str) -> Iterator[None]:
    """Turn the typed input errors of preprocessing, the engine and the writers into a PipelineError
    naming ``stage``; every other exception (a bug, CUDA out of memory) propagates unchanged so the
    job layer logs its traceback, retries and counts it as a crash.

    Raises: PipelineError (from PreprocessError, SourceError or the engine's InputError)."""
    try:
        yield
    except PipelineError:
        raise
    except PreprocessError as exc:
        raise PipelineError(f"{stage}: cannot prepare the images: {exc}") from exc
    except SourceError as exc:
        raise PipelineError(f"{stage}: the source series cannot carry this result: {exc}") from exc
    except EngineInputError as exc:
        raise PipelineError(f"{stage}: the model refused the input: {exc}") from exc
