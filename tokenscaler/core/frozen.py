"""The pydantic base of every typed document and config: immutable, unknown fields refused.

Pure. Used at every boundary that validates input (the config, the limits and usage documents,
the state file, budgets, the scaler's trigger metadata, scrape configs, scenarios, simulator
profiles), so a misspelt key is an error naming it, never silently ignored, and a validated
value cannot change after it was checked.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Immutable, and a field it does not declare is an error naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")
