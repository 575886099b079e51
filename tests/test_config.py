import pytest

from enricher.config import ConfigError, Settings


def test_defaults_are_the_embedded_setup(tmp_path):
    s = Settings.from_env(env={"ENRICHER_DATA_DIR": str(tmp_path)})
    assert s.broker == "kafka://127.0.0.1:9092" and s.broker_embedded
    assert s.clickhouse_url == f"chdb://{tmp_path}/clickhouse"
    assert (s.inference_topic, s.dlq_topic, s.clickhouse_database) == ("inferences", "inferences-dlq", "enricher")


def test_environment_is_read_and_flags_win(tmp_path):
    env = {"ENRICHER_DATA_DIR": str(tmp_path), "ENRICHER_BROKER": "kafka://k1:9092,kafka://k2:9092",
           "ENRICHER_BATCH_SIZE": "100", "ENRICHER_BATCH_TIMEOUT": "0.1", "ENRICHER_INFERENCE_TOPIC": "in"}
    s = Settings.from_env(env=env, batch_size=7)
    assert s.broker_address == "k1:9092,k2:9092" and not s.broker_embedded
    assert (s.batch_size, s.batch_timeout, s.inference_topic) == (7, 0.1, "in")


def test_the_database_comes_from_a_server_url():
    s = Settings.from_env(env={"ENRICHER_CLICKHOUSE_URL": "https://u:p@ch.example:8443/analytics"})
    assert s.clickhouse_database == "analytics"


@pytest.mark.parametrize("env, message", [
    ({"ENRICHER_BATCH_SIZE": "many"}, "ENRICHER_BATCH_SIZE='many': expected an integer"),
    ({"ENRICHER_BATCH_SIZE": "0"}, "at least 1"),
    ({"ENRICHER_BROKER": "localhost:9092"}, "kafka://HOST:PORT"),
    ({"ENRICHER_CLICKHOUSE_URL": "mysql://x"}, "chdb:///PATH"),
    ({"ENRICHER_BROKER_SECURITY_PROTOCOL": "TLS"}, "SASL_SSL"),
    ({"ENRICHER_BROKER_SECURITY_PROTOCOL": "SASL_SSL"}, "ENRICHER_BROKER_SASL_USERNAME"),
    ({"ENRICHER_DLQ_TOPIC": "inferences"}, "must differ"),
])
def test_bad_settings_say_which_variable_and_what_to_do(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env=env)


def test_secrets_come_from_files_and_never_show(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    env = {"ENRICHER_BROKER_SECURITY_PROTOCOL": "SASL_SSL", "ENRICHER_BROKER_SASL_USERNAME": "u",
           "ENRICHER_BROKER_SASL_PASSWORD_FILE": str(tmp_path / "pw"),
           "ENRICHER_CLICKHOUSE_URL": "http://alice:hunter2@ch:8123/db", "ENRICHER_ARTIFACT_KEY": "k3y"}
    s = Settings.from_env(env=env)
    assert s.sasl_password == "s3cret" and s.kafka_config()["sasl.password"] == "s3cret"
    shown = repr(s) + str(s.describe())
    for secret in ("s3cret", "hunter2", "k3y"):
        assert secret not in shown
    assert "alice:***@ch:8123" in s.describe()["clickhouse_url"]
