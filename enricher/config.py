"""Settings: one place, read from ENRICHER_* environment variables and flags.

Defaults run the embedded single-machine setup: a local Tansu broker on
127.0.0.1:9092 (`enricher broker`) and chDB in the data directory. Secrets
(passwords, keys, tokens) may also be given as a file path through the same
name with a `_FILE` suffix, and are never printed: `describe()` redacts them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from enricher.errors import EnricherError, redact
from enricher.windows import parse_window

EMBEDDED_BROKER = "kafka://127.0.0.1:9092"
# The longest wait between tries of a failure that time may mend (the store down, the broker away).
RETRY_MAX_SECONDS = 30.0


class ConfigError(EnricherError, ValueError):
    """A setting that cannot be used; the message names the variable."""


def _secret(env: dict, name: str) -> str | None:
    if env.get(name):
        return env[name]
    path = env.get(name + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path!r} ({exc.strerror})") from exc
    return None


def _number(env: dict, name: str, default, kind=int, minimum=None):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _flag(env: dict, name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


@dataclass
class Settings:
    # Each setting's default is written here once; SETTINGS below says which
    # variable reads it and how.
    data_dir: Path
    broker: str = EMBEDDED_BROKER
    broker_embedded: bool = True
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    inference_topic: str = "inferences"
    dlq_topic: str = "inferences-dlq"
    control_topic: str = "enricher-control"
    topic_partitions: int = 4
    consumer_group: str = "enricher"
    session_timeout: float = 10.0
    clickhouse_url: str = ""
    clickhouse_database: str = ""
    clickhouse_cluster: str = ""  # a replicated, sharded cluster: tables ON CLUSTER, Replicated*, Distributed
    clickhouse_password: str | None = field(default=None, repr=False)
    clickhouse_timeout: float = 30.0      # seconds an insert or query may take before it counts as failed
    retention_days: int = 0               # enriched rows older than this (by timestamp) are dropped; 0: kept
    label_sweep_interval: float = 5.0     # seconds between runs that bring label updates to their rows
    drift_bins: int = 10                  # quantile bins per numeric feature (drift.py)
    drift_window: str = "1h"              # the window the exported drift gauges cover
    drift_interval: float = 60.0          # seconds between drift exports to Prometheus; 0: none
    drift_max_features: int = 20          # features per model exported as gauges (bounded cardinality)
    drift_min_rows: int = 500             # fewer window rows than this: figures marked not significant
    http_host: str = "127.0.0.1"
    http_port: int = 6066
    http_tls_cert: str | None = None
    http_tls_key: str | None = None
    http_insecure: bool = False           # serve off loopback without a token: an explicit opt-out
    batch_size: int = 5000
    batch_timeout: float = 0.2
    batch_bytes: int = 8 * 1024 * 1024
    fetch_max_wait_ms: int = 100
    max_message_bytes: int = 1_048_576
    max_future_skew: float = 300.0        # seconds a timestamp may be ahead of the worker's clock (0: any)
    dlq_max_bytes: int = 900_000          # under the usual 1 MB broker limit, with room for headers
    max_request_bytes: int = 1_048_576    # the worker's producer: keep at or below the broker's message.max.bytes
    shutdown_grace: float = 30.0
    query_max_seconds: float = 30.0
    query_max_rows: int = 100_000
    query_max_memory: int = 512 * 1024 * 1024   # bytes one analyst query may hold in the engine
    query_max_threads: int = 1                  # engine threads per analyst query
    query_max_rows_read: int = 1_000_000_000    # rows one analyst query may read from the tables
    query_max_result_bytes: int = 256 * 1024 * 1024
    query_concurrency: int = 2                  # analyst queries running at once (their own pool)
    query_queue: int = 8                        # more waiting; past that HTTP 429
    query_endpoint: str = "auto"                # /query: on, off, or auto (on for the embedded store only)
    query_user: str | None = None               # on a server: the read-only user /query runs as
    query_password: str | None = field(default=None, repr=False)
    reference_roots: str = ""                   # directories the API may read references and model files from
    object_store_endpoint: str = ""             # host:port of the object store s3:// locations name (default: AWS)
    object_store_scheme: str = ""               # http or https (default https)
    object_store_region: str = ""
    refresh_interval: float = 2.0
    artifact_key: bytes | None = field(default=None, repr=False)
    control_store: str = "directory"     # models, toggles, statuses: directory (<data_dir>/registry) or clickhouse
    runner: str = "local"                # where training runs: local processes or an Argo Server
    argo_url: str = ""
    argo_namespace: str = "argo"
    argo_token: str | None = field(default=None, repr=False)
    argo_ca_file: str | None = None
    argo_insecure: bool = False
    argo_service_account: str | None = None
    image: str = "inference-enricher:latest"
    trigger_debounce: float = 1.0
    trigger_batch: int = 25               # most models one training run trains (toggles that arrive together)
    trigger_metrics_port: int = 6067      # the trigger's /metrics (training runs); 0: not served
    trigger_rescan: float = 30.0          # seconds between the trigger's looks at every model (lost events, schedules)
    step_retries: int = 2                 # retries of a failed training step (not of a permanent failure)
    step_deadline: int = 3600             # seconds one attempt of a training step may take
    artifact_store_url: str = ""  # a directory or s3://bucket/prefix; default <data_dir>/artifacts
    artifact_keep: int = 5
    api_token: str | None = field(default=None, repr=False)

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def artifacts(self):
        """The artifact store these settings name (a directory or an object store)."""
        from enricher.models.artifact import ArtifactStore  # lazy: pyarrow

        return ArtifactStore(self.artifact_store_url or self.artifact_dir, self.artifact_key, self.artifact_keep)

    @property
    def broker_address(self) -> str:
        """host:port list without the kafka:// scheme, as confluent-kafka wants it."""
        return ",".join(u.split("://", 1)[-1] for u in self.broker.split(","))

    def faust_credentials(self):
        """The same security settings as kafka_config, in the form Faust's app takes
        (SASL or SSL credentials; None for PLAINTEXT). Side by side so that the two clients
        (Faust's for the stream, confluent-kafka's for the rest) cannot disagree."""
        import ssl

        import faust  # lazy: faust (the worker's alone; config is imported by every command)

        context = None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        if self.security_protocol.startswith("SASL"):
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         ssl_context=context, mechanism=self.sasl_mechanism or "PLAIN")
        if context is not None:
            return faust.SSLCredentials(context)
        return None

    def kafka_config(self) -> dict:
        """librdkafka settings for confluent-kafka producers and consumers."""
        # log_level 4: librdkafka warnings and errors only, not its connection chatter
        conf = {"bootstrap.servers": self.broker_address, "security.protocol": self.security_protocol,
                "log_level": 4}
        sasl = self.security_protocol.startswith("SASL")
        optional = {"sasl.mechanism": self.sasl_mechanism or ("PLAIN" if sasl else None), "sasl.username": self.sasl_username,
                    "sasl.password": self.sasl_password, "ssl.ca.location": self.ssl_cafile,
                    "ssl.certificate.location": self.ssl_certfile, "ssl.key.location": self.ssl_keyfile}
        conf.update({k: v for k, v in optional.items() if v})
        return conf

    def to_env(self) -> dict[str, str]:
        """ENRICHER_* variables that give a child process these settings (secrets
        excepted: those travel in the parent's own environment or files)."""
        env = {"ENRICHER_DATA_DIR": str(self.data_dir)}
        defaults = {f.name: f.default for f in fields(self)}
        for name, (var, kind, _) in SETTINGS.items():
            value = getattr(self, name)
            if kind == "secret" or (value in (None, "") and defaults[name] in (None, "")):
                continue
            env[var] = ("1" if value else "0") if kind == "flag" else str(value)
        if self.broker_embedded and self.broker == EMBEDDED_BROKER:
            env.pop("ENRICHER_BROKER", None)
        return env

    def __repr__(self) -> str:
        return f"Settings({self.describe()})"

    def describe(self) -> dict:
        """Settings safe to log: secrets and URL passwords redacted."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if SETTINGS.get(f.name, ("", ""))[1] == "secret":
                value = "***" if value else None
            elif f.name in ("clickhouse_url", "artifact_store_url"):
                value = redact(value)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Settings":
        """Read ENRICHER_* variables; keyword overrides (from flags) win."""
        env = dict(os.environ if env is None else env)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        data_dir = Path(overrides.pop("data_dir", None) or env.get("ENRICHER_DATA_DIR") or ".enricher").resolve()
        defaults = {f.name: f.default for f in fields(cls)}
        values = {}
        for name, (var, kind, minimum) in SETTINGS.items():
            default = defaults[name]
            if kind in ("str", "upper", "lower"):
                value = env.get(var) or default
                if isinstance(value, str):
                    value = value.upper() if kind == "upper" else value.lower() if kind == "lower" else value
            elif kind == "int":
                value = _number(env, var, default, int, minimum)
            elif kind == "float":
                value = _number(env, var, default, float, minimum)
            elif kind == "flag":
                value = _flag(env, var, default)
            else:  # secret: the variable, or a file named by VAR_FILE
                value = _secret(env, var)
            values[name] = value
        values["broker_embedded"] = not (overrides.get("broker") or env.get("ENRICHER_BROKER"))
        if values["artifact_key"]:
            values["artifact_key"] = values["artifact_key"].encode()
        s = cls(data_dir=data_dir, **values)
        for name, value in overrides.items():
            if not hasattr(s, name):
                raise ConfigError(f"unknown setting {name!r}")
            setattr(s, name, value)
        if not s.clickhouse_url:
            s.clickhouse_url = f"chdb://{s.data_dir / 'clickhouse'}"
        if not s.clickhouse_database:
            # http(s)://host/DATABASE names the database; chdb:// paths do not.
            parts = urlsplit(s.clickhouse_url)
            path_db = parts.path.strip("/") if parts.scheme in ("http", "https") else ""
            s.clickhouse_database = path_db or "enricher"
        s.validate()
        return s

    @property
    def argo_verify(self):
        """TLS verification for the Argo Server: a CA bundle, on, or off (ENRICHER_ARGO_INSECURE)."""
        if self.argo_insecure:
            return False
        return self.argo_ca_file or True

    @property
    def query_endpoint_on(self) -> bool:
        """Whether the worker serves /query: on the embedded store by default, on a server only when asked."""
        if self.query_endpoint == "auto":
            return self.clickhouse_url.startswith("chdb:")
        return self.query_endpoint == "on"

    def validate(self) -> None:
        if self.query_endpoint not in ("auto", "on", "off"):
            raise ConfigError(f"ENRICHER_QUERY_ENDPOINT={self.query_endpoint!r}: use on, off or auto")
        if self.query_user and not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", self.query_user):
            raise ConfigError(f"ENRICHER_QUERY_USER={self.query_user!r}: use letters, digits and _ only")
        if self.query_endpoint == "on" and not self.clickhouse_url.startswith("chdb:") and not self.query_user:
            raise ConfigError("ENRICHER_QUERY_ENDPOINT=on with a ClickHouse server needs ENRICHER_QUERY_USER (and "
                              "ENRICHER_QUERY_PASSWORD or ENRICHER_QUERY_PASSWORD_FILE): a read-only user whose "
                              "grants and settings profile confine the queries (enricher schema --query-user)")
        if self.control_store not in ("directory", "clickhouse"):
            raise ConfigError(f"ENRICHER_CONTROL_STORE={self.control_store!r}: use directory or clickhouse")
        if self.clickhouse_cluster:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", self.clickhouse_cluster):
                raise ConfigError(f"ENRICHER_CLICKHOUSE_CLUSTER={self.clickhouse_cluster!r}: the cluster's name "
                                  f"as in the server's remote_servers (letters, digits and _)")
            if self.clickhouse_url.startswith("chdb:"):
                raise ConfigError("ENRICHER_CLICKHOUSE_CLUSTER needs ENRICHER_CLICKHOUSE_URL to name a server of "
                                  "that cluster (http(s)://...): the embedded engine is one node")
        if self.runner not in ("local", "argo"):
            raise ConfigError(f"ENRICHER_RUNNER={self.runner!r}: use local or argo")
        if self.runner == "argo" and not self.argo_url.startswith(("http://", "https://")):
            raise ConfigError("ENRICHER_RUNNER=argo needs ENRICHER_ARGO_URL=https://ARGO-SERVER:2746")
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ConfigError(f"ENRICHER_BROKER_SECURITY_PROTOCOL={self.security_protocol!r}: "
                              f"use one of {', '.join(protocols)}")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ConfigError("SASL needs ENRICHER_BROKER_SASL_USERNAME and ENRICHER_BROKER_SASL_PASSWORD "
                              "(or ENRICHER_BROKER_SASL_PASSWORD_FILE)")
        for url in self.broker.split(","):
            if not url.startswith("kafka://") or ":" not in url[len("kafka://"):]:
                raise ConfigError(f"ENRICHER_BROKER={self.broker!r}: use kafka://HOST:PORT[,kafka://HOST:PORT]")
        scheme = urlsplit(self.clickhouse_url).scheme
        if scheme not in ("chdb", "http", "https"):
            raise ConfigError(f"ENRICHER_CLICKHOUSE_URL={redact(self.clickhouse_url)!r}: use chdb:///PATH "
                              "for the embedded engine or http(s)://USER:PASSWORD@HOST:PORT/DATABASE")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$", self.clickhouse_database):
            raise ConfigError(f"ENRICHER_CLICKHOUSE_DATABASE={self.clickhouse_database!r}: "
                              "use letters, digits and _ only")
        try:
            parse_window(self.drift_window)
        except ValueError as exc:
            raise ConfigError(f"ENRICHER_DRIFT_WINDOW: {exc}") from None
        if self.inference_topic == self.dlq_topic:
            raise ConfigError("ENRICHER_INFERENCE_TOPIC and ENRICHER_DLQ_TOPIC must differ")


# Setting -> (environment variable, how it is read, minimum). The default is
# the dataclass field's. Kinds: str, upper/lower (case-folded), int, float,
# flag (1/0, true/false, yes/no, on/off), secret (VAR or a file at VAR_FILE).
SETTINGS: dict[str, tuple[str, str, float | None]] = {
    "broker": ("ENRICHER_BROKER", "str", None),
    "security_protocol": ("ENRICHER_BROKER_SECURITY_PROTOCOL", "upper", None),
    "sasl_mechanism": ("ENRICHER_BROKER_SASL_MECHANISM", "str", None),
    "sasl_username": ("ENRICHER_BROKER_SASL_USERNAME", "str", None),
    "sasl_password": ("ENRICHER_BROKER_SASL_PASSWORD", "secret", None),
    "ssl_cafile": ("ENRICHER_BROKER_SSL_CAFILE", "str", None),
    "ssl_certfile": ("ENRICHER_BROKER_SSL_CERTFILE", "str", None),
    "ssl_keyfile": ("ENRICHER_BROKER_SSL_KEYFILE", "str", None),
    "inference_topic": ("ENRICHER_INFERENCE_TOPIC", "str", None),
    "dlq_topic": ("ENRICHER_DLQ_TOPIC", "str", None),
    "control_topic": ("ENRICHER_CONTROL_TOPIC", "str", None),
    "topic_partitions": ("ENRICHER_TOPIC_PARTITIONS", "int", 1),
    "consumer_group": ("ENRICHER_CONSUMER_GROUP", "str", None),
    "session_timeout": ("ENRICHER_BROKER_SESSION_TIMEOUT", "float", 1),
    "clickhouse_url": ("ENRICHER_CLICKHOUSE_URL", "str", None),
    "clickhouse_database": ("ENRICHER_CLICKHOUSE_DATABASE", "str", None),
    "clickhouse_password": ("ENRICHER_CLICKHOUSE_PASSWORD", "secret", None),
    "clickhouse_timeout": ("ENRICHER_CLICKHOUSE_TIMEOUT", "float", 0.1),
    "retention_days": ("ENRICHER_RETENTION_DAYS", "int", 0),
    "label_sweep_interval": ("ENRICHER_LABEL_SWEEP_INTERVAL", "float", 0.1),
    "drift_bins": ("ENRICHER_DRIFT_BINS", "int", 2),
    "drift_window": ("ENRICHER_DRIFT_WINDOW", "str", None),
    "drift_interval": ("ENRICHER_DRIFT_INTERVAL", "float", 0),
    "drift_max_features": ("ENRICHER_DRIFT_MAX_FEATURES", "int", 1),
    "drift_min_rows": ("ENRICHER_DRIFT_MIN_ROWS", "int", 1),
    "http_host": ("ENRICHER_HTTP_HOST", "str", None),
    "http_port": ("ENRICHER_HTTP_PORT", "int", 0),
    "http_tls_cert": ("ENRICHER_HTTP_TLS_CERT", "str", None),
    "http_tls_key": ("ENRICHER_HTTP_TLS_KEY", "str", None),
    "http_insecure": ("ENRICHER_HTTP_INSECURE", "flag", None),
    "batch_size": ("ENRICHER_BATCH_SIZE", "int", 1),
    "batch_timeout": ("ENRICHER_BATCH_TIMEOUT", "float", 0.001),
    "batch_bytes": ("ENRICHER_BATCH_BYTES", "int", 1024),
    "fetch_max_wait_ms": ("ENRICHER_FETCH_MAX_WAIT_MS", "int", 1),
    "max_message_bytes": ("ENRICHER_MAX_MESSAGE_BYTES", "int", 64),
    "max_future_skew": ("ENRICHER_MAX_FUTURE_SKEW", "float", 0),
    "dlq_max_bytes": ("ENRICHER_DLQ_MAX_BYTES", "int", 1024),
    "max_request_bytes": ("ENRICHER_MAX_REQUEST_BYTES", "int", 4096),
    "shutdown_grace": ("ENRICHER_SHUTDOWN_GRACE", "float", 1),
    "query_max_seconds": ("ENRICHER_QUERY_MAX_SECONDS", "float", 0.1),
    "query_max_rows": ("ENRICHER_QUERY_MAX_ROWS", "int", 1),
    "query_max_memory": ("ENRICHER_QUERY_MAX_MEMORY", "int", 16 * 1024 * 1024),
    "query_max_threads": ("ENRICHER_QUERY_MAX_THREADS", "int", 1),
    "query_max_rows_read": ("ENRICHER_QUERY_MAX_ROWS_READ", "int", 1),
    "query_max_result_bytes": ("ENRICHER_QUERY_MAX_RESULT_BYTES", "int", 1024 * 1024),
    "query_concurrency": ("ENRICHER_QUERY_CONCURRENCY", "int", 1),
    "query_queue": ("ENRICHER_QUERY_QUEUE", "int", 0),
    "query_endpoint": ("ENRICHER_QUERY_ENDPOINT", "lower", None),
    "query_user": ("ENRICHER_QUERY_USER", "str", None),
    "query_password": ("ENRICHER_QUERY_PASSWORD", "secret", None),
    "reference_roots": ("ENRICHER_REFERENCE_ROOTS", "str", None),
    "object_store_endpoint": ("ENRICHER_OBJECT_STORE_ENDPOINT", "str", None),
    "object_store_scheme": ("ENRICHER_OBJECT_STORE_SCHEME", "lower", None),
    "object_store_region": ("ENRICHER_OBJECT_STORE_REGION", "str", None),
    "refresh_interval": ("ENRICHER_REFRESH_INTERVAL", "float", 0.1),
    "artifact_key": ("ENRICHER_ARTIFACT_KEY", "secret", None),
    "artifact_store_url": ("ENRICHER_ARTIFACT_STORE", "str", None),
    "artifact_keep": ("ENRICHER_ARTIFACT_KEEP", "int", 1),
    "control_store": ("ENRICHER_CONTROL_STORE", "lower", None),
    "clickhouse_cluster": ("ENRICHER_CLICKHOUSE_CLUSTER", "str", None),
    "runner": ("ENRICHER_RUNNER", "lower", None),
    "argo_url": ("ENRICHER_ARGO_URL", "str", None),
    "argo_namespace": ("ENRICHER_ARGO_NAMESPACE", "str", None),
    "argo_token": ("ENRICHER_ARGO_TOKEN", "secret", None),
    "argo_ca_file": ("ENRICHER_ARGO_CA_BUNDLE", "str", None),
    "argo_insecure": ("ENRICHER_ARGO_INSECURE", "flag", None),
    "argo_service_account": ("ENRICHER_ARGO_SERVICE_ACCOUNT", "str", None),
    "image": ("ENRICHER_IMAGE", "str", None),
    "trigger_debounce": ("ENRICHER_TRIGGER_DEBOUNCE", "float", 0),
    "trigger_batch": ("ENRICHER_TRIGGER_BATCH", "int", 1),
    "trigger_rescan": ("ENRICHER_TRIGGER_RESCAN", "float", 0.1),
    "trigger_metrics_port": ("ENRICHER_TRIGGER_METRICS_PORT", "int", 0),
    "step_retries": ("ENRICHER_STEP_RETRIES", "int", 0),
    "step_deadline": ("ENRICHER_STEP_DEADLINE", "int", 1),
    "api_token": ("ENRICHER_API_TOKEN", "secret", None),
}
