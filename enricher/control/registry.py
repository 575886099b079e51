"""The model registry the settings name (ENRICHER_CONTROL_STORE): its state in a
directory (the default), or in ClickHouse and the artifact store
(enricher/store/control_state.py). Every process opens it here, so the
workers, the trigger, the training steps and the CLI always agree."""

from __future__ import annotations

from enricher.config import Settings
from enricher.models.registry import ModelRegistry


def open_registry(settings: Settings) -> ModelRegistry:
    if settings.control_store == "clickhouse":
        from enricher.store.control_state import ClickHouseState  # lazy: clickhouse_connect

        return ModelRegistry(ClickHouseState(settings))
    return ModelRegistry(settings.registry_dir)
