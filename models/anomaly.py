"""Anomaly detection: an Isolation Forest fitted on the reference data.

Training half and scoring half sit side by side here. The score is the one of
Liu, Ting and Zhou (2008), s(x) = 2^(-E[h(x)] / c(n)), on a 0-1 scale: about
0.5 for ordinary rows, near 1 for rows the forest isolates quickly; it equals
scikit-learn's `-score_samples`. scikit-learn fits the forest; the artifact
keeps it as flat arrays (models/forest.py) that score a whole batch in one
vectorised walk, and that load without unpickling anything.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from .artifact import Manifest
from .encoding import EncoderPool, FeatureEncoder
from .enrichment import InferenceBatch, Output
from .forest import CompactForest
from .spec import ModelSpec

NAME = "anomaly_detection"
DEFAULTS = {"n_estimators": 100, "max_samples": 256, "random_state": 0}


class AnomalyArtifact:
    def __init__(self, encoder: FeatureEncoder, forest: CompactForest, parameters: dict):
        self.encoder = encoder
        self.forest = forest
        self.parameters = parameters
        self.quality: dict = {}  # nothing measured beyond the bounds every run checks

    def transform(self, batch: InferenceBatch) -> dict[str, pa.Array]:
        X = self.encoder.transform(batch.columns, batch.num_rows)
        return {"anomaly_score": pa.array(self.forest.score(X), pa.float64())}

    def to_blobs(self) -> dict[str, bytes]:
        return {"encoder.json": json.dumps(self.encoder.to_json()).encode(), "forest.npz": self.forest.to_bytes()}


class AnomalyPool:
    """Anomaly artifacts of one layout and tree count scored together: one encoding and one
    forest walk for the rows of all of them (a stream spread over many models pays one
    model's per-batch cost). Scores equal each artifact's own `transform`."""

    def __init__(self, artifacts: list[AnomalyArtifact]):
        from .forestpool import ForestPool  # lazy: numba

        self.encoders = EncoderPool([a.encoder for a in artifacts])
        self.forests = ForestPool([a.forest for a in artifacts])

    def __len__(self) -> int:
        return len(self.forests)

    @property
    def features(self) -> list[str]:
        """The columns `transform` reads."""
        return self.encoders.names

    def transform(self, batch: InferenceBatch, member: np.ndarray) -> dict[str, pa.Array]:
        """The outputs for rows of several models: `batch` all the rows (its columns hold
        `features` at least), `member[i]` the position of row i's artifact in the list this
        pool was built from."""
        X = self.encoders.transform(batch.columns, batch.num_rows, member)
        return {"anomaly_score": pa.array(self.forests.score(X, member), pa.float64())}


class AnomalyDetection:
    name = NAME
    reserved = ("anomaly_*",)

    def outputs(self, spec: ModelSpec) -> list[Output]:
        # The bounds are checked on reference rows before an artifact is published.
        return [Output("anomaly_score", pa.float64(), "anomaly_score", bounds=(0.0, 1.0),
                       doc="how unusual the row's features are: about 0.5 typical, near 1 anomalous")]

    def check_model(self, spec: ModelSpec, reference: pa.Schema | None = None) -> None:
        """Any model can use it: the forest needs the features only."""

    def check_config(self, config: dict) -> dict:
        """Validate an enrichment config when it is set, before any training."""
        return _parameters(config)

    def check_quality(self, quality: dict, config: dict) -> None:
        """No bar beyond the score's bounds, which validation checks on reference rows."""

    def fit(self, spec: ModelSpec, reference: pa.Table, config: dict, model_file=None) -> AnomalyArtifact:
        """`model_file` plays no part: the forest learns the inputs, not the model."""
        from sklearn.ensemble import IsolationForest  # here: training only, ~2 s of imports a worker never needs

        params = _parameters(config)
        encoder = FeatureEncoder.fit(spec, reference)
        X = encoder.transform({n: reference.column(n) for n in spec.feature_names}, reference.num_rows)
        forest = IsolationForest(
            n_estimators=params["n_estimators"],
            max_samples=min(params["max_samples"], reference.num_rows),
            random_state=params["random_state"],
            n_jobs=1,
        ).fit(X)
        return AnomalyArtifact(encoder, CompactForest.from_sklearn(forest), params)

    def load(self, spec: ModelSpec, manifest: Manifest, blobs: dict[str, bytes]) -> AnomalyArtifact:
        encoder = FeatureEncoder.for_spec(json.loads(blobs["encoder.json"]), spec)
        forest = CompactForest.from_bytes(blobs["forest.npz"])
        if forest.n_features != len(encoder.names):
            raise ValueError(f"forest has {forest.n_features} features, the encoder {len(encoder.names)}")
        return AnomalyArtifact(encoder, forest, manifest.parameters)

    def pool(self, artifacts: list[AnomalyArtifact]) -> list[tuple[AnomalyPool, list[int]]]:
        """Serving many models: the artifacts (by position in the list) that can be scored
        together, each group as one pool. Artifacts pool with those of the same features
        and kinds and the same number of trees."""
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(artifacts):
            key = (tuple(a.encoder.names), tuple(a.encoder.kinds), len(a.forest.roots), a.forest.n_features)
            groups.setdefault(key, []).append(i)
        # a group of one is a pool too: the compiled walk is ~3x the vectorised one on one model
        return [(AnomalyPool([artifacts[i] for i in idx]), idx) for idx in groups.values()]


def _parameters(config: dict) -> dict:
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"anomaly_detection: unknown setting(s) {sorted(unknown)}; "
                         f"known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **config}
    for key in ("n_estimators", "max_samples"):
        if not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1:
            raise ValueError(f"anomaly_detection.{key}: must be a positive integer, got {params[key]!r}")
    if not isinstance(params["random_state"], int):
        raise ValueError("anomaly_detection.random_state: must be an integer")
    return params

