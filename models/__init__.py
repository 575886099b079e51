"""Enrichment algorithms: fit artifacts on reference data, transform batches.

Knows nothing of Kafka, Faust, Argo or ClickHouse.
"""

from .anomaly import AnomalyDetection
from .explainability import Explainability

#: Every enrichment by name. A new enrichment is one module and one line here.
ENRICHMENTS = {e.name: e for e in (AnomalyDetection(), Explainability())}
