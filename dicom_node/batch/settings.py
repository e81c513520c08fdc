"""The `[batch]` config section: defaults of `unimedvl batch` (command-line flags override them).

```toml
[batch]
max_fetch = 2            # concurrent retrievals per source
window = 4               # items in flight at most (clinical jobs never wait behind more)
lease_seconds = 60       # a worker silent this long loses its item
max_attempts = 3
retry_backoff_seconds = 1.0
scratch_dir = ""         # where workers fetch studies ("" = the system temp folder)
[batch.deidentify]       # PS3.15 E.3 options (all false by default)
retain_longitudinal = false
retain_patient_characteristics = false
clean_descriptors = false
retain_uids = false
allow_burned_in = false
```
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DeidSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retain_longitudinal: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    retain_uids: bool = False
    allow_burned_in: bool = False


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_fetch: int = Field(2, ge=0)
    window: int = Field(4, ge=1)
    lease_seconds: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)
    retry_backoff_seconds: float = Field(1.0, ge=0)
    scratch_dir: str = ""
    deidentify: DeidSettings = DeidSettings()


def batch_settings(settings: Any) -> BatchSettings:
    """The `[batch]` section of the loaded config (defaults when absent); ValueError when invalid."""
    return BatchSettings.model_validate(getattr(settings, "batch", None) or {})
