import pytest
from enricher.models.spec import ModelSpec, SpecError, check_model_id

from enricher import sample


@pytest.mark.parametrize("good", ["a", "credit_default", "m1", "a" * 63])
def test_model_ids_that_follow_the_rule_are_accepted(good):
    assert check_model_id(good) == good


@pytest.mark.parametrize("bad", ["", "1abc", "Credit", "credit-default", "a" * 64, "a b", "é", None, 7])
def test_model_ids_that_break_the_rule_are_refused_with_the_rule(bad):
    with pytest.raises(SpecError, match=r"\^\[a-z\]\[a-z0-9_\]\{0,62\}\$"):
        check_model_id(bad)


def test_the_issue_example_schema_is_accepted():
    doc = {"task": "binary_classification",
           "features": [{"name": "age", "type": "numeric"}, {"name": "region", "type": "categorical"}],
           "attributes": [{"name": "sex", "type": "categorical", "sensitive": True}],
           "positive_threshold": 0.5}
    spec = ModelSpec.from_json("credit", doc)
    assert spec.feature_names == ["age", "region"]
    assert spec.attributes[0].sensitive
    assert spec.prediction_type == "numeric"
    assert ModelSpec.from_json("credit", spec.to_json()) == spec


def test_multiclass_predictions_default_to_class_labels():
    doc = {**sample.SCHEMA, "task": "multiclass_classification"}
    assert ModelSpec.from_json("m", doc).prediction_type == "categorical"


@pytest.mark.parametrize("change, where", [
    ({"task": "clustering"}, "schema.task"),
    ({"features": []}, "schema.features"),
    ({"features": [{"name": "age", "type": "float"}]}, r"schema.features\[0\].type"),
    ({"features": [{"name": "my age", "type": "numeric"}]}, r"schema.features\[0\].name"),
    ({"features": [{"name": "prediction", "type": "numeric"}]}, "reserved"),
    ({"features": [{"name": "a", "type": "numeric"}, {"name": "a", "type": "numeric"}]}, "used twice"),
    ({"attributes": [{"name": "sex", "type": "categorical", "sensitive": "yes"}]}, r"attributes\[0\].sensitive"),
    ({"positive_threshold": 2}, "positive_threshold"),
])
def test_schema_errors_name_the_key_at_fault(change, where):
    with pytest.raises(SpecError, match=where):
        ModelSpec.from_json("m", {**sample.SCHEMA, **change})


@pytest.mark.parametrize("change, message", [
    ({"positive_treshold": 0.3}, "schema.positive_treshold: unknown key; did you mean 'positive_threshold'?"),
    ({"owner": "team-a"}, "schema.owner: unknown key; a schema takes task, features"),
    ({"features": [{"name": "age", "type": "numeric", "nulable": True}]},
     "schema.features[0].nulable: unknown key; did you mean 'nullable'?"),
    ({"attributes": [{"name": "sex", "type": "categorical", "sensitve": True}]},
     "schema.attributes[0].sensitve: unknown key; did you mean 'sensitive'?"),
])
def test_an_unknown_key_is_refused_by_name_with_the_nearest_known_one(change, message):
    with pytest.raises(SpecError) as caught:
        ModelSpec.from_json("m", {**sample.SCHEMA, **change})
    assert str(caught.value).startswith(message)


def test_a_stored_schema_with_keys_of_an_older_release_still_loads():
    doc = {**sample.SCHEMA, "owner": "team-a"}
    assert ModelSpec.from_json("m", doc, stored=True) == ModelSpec.from_json("m", sample.SCHEMA)
