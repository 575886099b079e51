import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from enricher.models.reference import ReferenceDataError, normalise, read_table
from enricher.models.registry import ModelRegistry
from enricher.models.spec import ModelSpec

from enricher import sample

SPEC = ModelSpec.from_json(sample.MODEL_ID, sample.SCHEMA)


def test_csv_reference_is_read_and_normalised(tmp_path):
    path = tmp_path / "ref.csv"
    pacsv.write_csv(sample.reference_table(200), path)
    table = normalise(SPEC, read_table(path))
    assert table.num_rows == 200
    assert table.schema.field("f0").type == pa.float64()
    assert table.schema.field("region").type == pa.string()
    assert set(table.column_names) >= {"prediction", "label", "sex"}


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop_columns(["f3"]), "'f3': missing"),
    (lambda t: t.drop_columns(["prediction"]), "'prediction': missing"),
    (lambda t: t.set_column(t.column_names.index("f1"), "f1", pa.array(["x"] * t.num_rows)),
     "'f1': expected numeric values, found string"),
    (lambda t: t.set_column(0, "f0", pa.array([float("nan")] * t.num_rows)), "'f0': contains NaN"),
    (lambda t: t.slice(0, 0), "no rows"),
])
def test_reference_that_does_not_match_the_schema_is_refused_with_column_and_problem(mutate, message):
    with pytest.raises(ReferenceDataError, match=message):
        normalise(SPEC, mutate(sample.reference_table(50)))


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "ref.json").write_text("{}")
    with pytest.raises(ReferenceDataError, match=".parquet or .csv"):
        read_table(tmp_path / "ref.json")


def test_a_refused_registration_leaves_no_model_behind(tmp_path):
    path = tmp_path / "ref.csv"
    pacsv.write_csv(sample.reference_table(50).drop_columns(["f2"]), path)
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(ReferenceDataError):
        registry.register("m", sample.SCHEMA, path)
    assert registry.ids() == []
