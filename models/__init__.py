"""Enrichment algorithms: fit artifacts on reference data, transform batches.

Knows nothing of Kafka, Faust, Argo or ClickHouse. `enricher.models.ENRICHMENTS`
(defined in catalog.py) names every enrichment.
"""

from .catalog import ENRICHMENTS

__all__ = ["ENRICHMENTS"]
