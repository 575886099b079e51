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
from urllib.parse import urlsplit, urlunsplit

EMBEDDED_BROKER = "kafka://127.0.0.1:9092"


class ConfigError(ValueError):
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
    clickhouse_database: str = "enricher"
    clickhouse_password: str | None = field(default=None, repr=False)
    http_host: str = "127.0.0.1"
    http_port: int = 6066
    batch_size: int = 5000
    batch_timeout: float = 0.2
    batch_bytes: int = 8 * 1024 * 1024
    fetch_max_wait_ms: int = 100
    eager_handover: bool = True
    max_message_bytes: int = 1_048_576
    refresh_interval: float = 2.0
    artifact_key: bytes | None = field(default=None, repr=False)
    runner: str = "local"                # where training runs: local processes or an Argo Server
    argo_url: str = ""
    argo_namespace: str = "argo"
    argo_token: str | None = field(default=None, repr=False)
    argo_ca_file: str | None = None
    argo_insecure: bool = False
    argo_service_account: str | None = None
    image: str = "inference-enricher:latest"
    trigger_debounce: float = 1.0
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
        from models.artifact import ArtifactStore

        return ArtifactStore(self.artifact_store_url or self.artifact_dir, self.artifact_key, self.artifact_keep)

    @property
    def broker_address(self) -> str:
        """host:port list without the kafka:// scheme, as confluent-kafka wants it."""
        return ",".join(u.split("://", 1)[-1] for u in self.broker.split(","))

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
        env = {"ENRICHER_DATA_DIR": str(self.data_dir), "ENRICHER_CLICKHOUSE_URL": self.clickhouse_url,
               "ENRICHER_CLICKHOUSE_DATABASE": self.clickhouse_database,
               "ENRICHER_INFERENCE_TOPIC": self.inference_topic, "ENRICHER_DLQ_TOPIC": self.dlq_topic,
               "ENRICHER_CONTROL_TOPIC": self.control_topic,
               "ENRICHER_TOPIC_PARTITIONS": str(self.topic_partitions),
               "ENRICHER_CONSUMER_GROUP": self.consumer_group,
               "ENRICHER_BROKER_SESSION_TIMEOUT": str(self.session_timeout),
               "ENRICHER_HTTP_HOST": self.http_host, "ENRICHER_HTTP_PORT": str(self.http_port),
               "ENRICHER_BATCH_SIZE": str(self.batch_size), "ENRICHER_BATCH_TIMEOUT": str(self.batch_timeout),
               "ENRICHER_BATCH_BYTES": str(self.batch_bytes),
               "ENRICHER_FETCH_MAX_WAIT_MS": str(self.fetch_max_wait_ms),
               "ENRICHER_EAGER_HANDOVER": "1" if self.eager_handover else "0",
               "ENRICHER_MAX_MESSAGE_BYTES": str(self.max_message_bytes),
               "ENRICHER_REFRESH_INTERVAL": str(self.refresh_interval),
               "ENRICHER_ARTIFACT_KEEP": str(self.artifact_keep),
               "ENRICHER_RUNNER": self.runner, "ENRICHER_ARGO_NAMESPACE": self.argo_namespace,
               "ENRICHER_IMAGE": self.image, "ENRICHER_TRIGGER_DEBOUNCE": str(self.trigger_debounce)}
        if self.argo_url:
            env["ENRICHER_ARGO_URL"] = self.argo_url
        if self.artifact_store_url:
            env["ENRICHER_ARTIFACT_STORE"] = self.artifact_store_url
        if not self.broker_embedded or self.broker != EMBEDDED_BROKER:
            env["ENRICHER_BROKER"] = self.broker
        return env

    def __repr__(self) -> str:
        return f"Settings({self.describe()})"

    def describe(self) -> dict:
        """Settings safe to log: secrets and URL passwords redacted."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("sasl_password", "artifact_key", "clickhouse_password", "api_token", "argo_token"):
                value = "***" if value else None
            elif f.name in ("clickhouse_url", "artifact_store_url"):
                value = redact_url(value)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Settings":
        """Read ENRICHER_* variables; keyword overrides (from flags) win."""
        env = dict(os.environ if env is None else env)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        data_dir = Path(overrides.pop("data_dir", None) or env.get("ENRICHER_DATA_DIR") or ".enricher").resolve()
        broker = overrides.pop("broker", None) or env.get("ENRICHER_BROKER") or ""
        key = _secret(env, "ENRICHER_ARTIFACT_KEY")
        s = cls(
            data_dir=data_dir,
            broker=broker or EMBEDDED_BROKER,
            broker_embedded=not broker,
            security_protocol=env.get("ENRICHER_BROKER_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            sasl_mechanism=env.get("ENRICHER_BROKER_SASL_MECHANISM") or None,
            sasl_username=env.get("ENRICHER_BROKER_SASL_USERNAME") or None,
            sasl_password=_secret(env, "ENRICHER_BROKER_SASL_PASSWORD"),
            ssl_cafile=env.get("ENRICHER_BROKER_SSL_CAFILE") or None,
            ssl_certfile=env.get("ENRICHER_BROKER_SSL_CERTFILE") or None,
            ssl_keyfile=env.get("ENRICHER_BROKER_SSL_KEYFILE") or None,
            inference_topic=env.get("ENRICHER_INFERENCE_TOPIC") or "inferences",
            dlq_topic=env.get("ENRICHER_DLQ_TOPIC") or "inferences-dlq",
            control_topic=env.get("ENRICHER_CONTROL_TOPIC") or "enricher-control",
            topic_partitions=_number(env, "ENRICHER_TOPIC_PARTITIONS", 4, minimum=1),
            consumer_group=env.get("ENRICHER_CONSUMER_GROUP") or "enricher",
            session_timeout=_number(env, "ENRICHER_BROKER_SESSION_TIMEOUT", 10.0, float, minimum=1),
            clickhouse_url=env.get("ENRICHER_CLICKHOUSE_URL") or "",
            clickhouse_database=env.get("ENRICHER_CLICKHOUSE_DATABASE") or "",
            clickhouse_password=_secret(env, "ENRICHER_CLICKHOUSE_PASSWORD"),
            http_host=env.get("ENRICHER_HTTP_HOST") or "127.0.0.1",
            http_port=_number(env, "ENRICHER_HTTP_PORT", 6066, minimum=0),
            batch_size=_number(env, "ENRICHER_BATCH_SIZE", 5000, minimum=1),
            batch_timeout=_number(env, "ENRICHER_BATCH_TIMEOUT", 0.2, float, minimum=0.001),
            batch_bytes=_number(env, "ENRICHER_BATCH_BYTES", 8 * 1024 * 1024, minimum=1024),
            fetch_max_wait_ms=_number(env, "ENRICHER_FETCH_MAX_WAIT_MS", 100, minimum=1),
            eager_handover=_flag(env, "ENRICHER_EAGER_HANDOVER", True),
            max_message_bytes=_number(env, "ENRICHER_MAX_MESSAGE_BYTES", 1_048_576, minimum=64),
            refresh_interval=_number(env, "ENRICHER_REFRESH_INTERVAL", 2.0, float, minimum=0.1),
            artifact_key=key.encode() if key else None,
            artifact_store_url=env.get("ENRICHER_ARTIFACT_STORE") or "",
            runner=(env.get("ENRICHER_RUNNER") or "local").lower(),
            argo_url=env.get("ENRICHER_ARGO_URL") or "",
            argo_namespace=env.get("ENRICHER_ARGO_NAMESPACE") or "argo",
            argo_token=_secret(env, "ENRICHER_ARGO_TOKEN"),
            argo_ca_file=env.get("ENRICHER_ARGO_CA_BUNDLE") or None,
            argo_insecure=_flag(env, "ENRICHER_ARGO_INSECURE", False),
            argo_service_account=env.get("ENRICHER_ARGO_SERVICE_ACCOUNT") or None,
            image=env.get("ENRICHER_IMAGE") or "inference-enricher:latest",
            trigger_debounce=_number(env, "ENRICHER_TRIGGER_DEBOUNCE", 1.0, float, minimum=0),
            artifact_keep=_number(env, "ENRICHER_ARTIFACT_KEEP", 5, minimum=1),
            api_token=_secret(env, "ENRICHER_API_TOKEN"),
        )
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

    def validate(self) -> None:
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
            raise ConfigError(f"ENRICHER_CLICKHOUSE_URL={redact_url(self.clickhouse_url)!r}: use chdb:///PATH "
                              "for the embedded engine or http(s)://USER:PASSWORD@HOST:PORT/DATABASE")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$", self.clickhouse_database):
            raise ConfigError(f"ENRICHER_CLICKHOUSE_DATABASE={self.clickhouse_database!r}: "
                              "use letters, digits and _ only")
        if self.inference_topic == self.dlq_topic:
            raise ConfigError("ENRICHER_INFERENCE_TOPIC and ENRICHER_DLQ_TOPIC must differ")


def redact_url(url: str) -> str:
    from models.artifact import redact

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    return redact(url) if "://" in url else url
