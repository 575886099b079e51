"""Reference data: the sample of a model's inputs and outputs that enrichments
are fitted on. Read from Parquet or CSV, checked against the model's spec and
normalised to one Arrow layout (numeric -> float64, categorical -> string)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from enricher.errors import EnricherError, redact

from .spec import Column, ModelSpec


class ReferenceDataError(EnricherError, ValueError):
    """Reference data that does not fit the model's schema; says which column and why."""


# A reference file is read whole (Arrow reads Parquet and CSV from memory); past this, ask for a sample.
MAX_REFERENCE_BYTES = 8 << 30


def read_table(path: str | Path) -> pa.Table:
    """A .parquet or .csv file: a local path, or a URL pyarrow.fs reads (s3://bucket/key?endpoint_override=...)."""
    text = str(path)
    suffix = Path(text.split("?", 1)[0]).suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise ReferenceDataError(f"reference file {text!r}: use a .parquet or .csv file")
    data = pa.BufferReader(read_bytes(text, "reference file", MAX_REFERENCE_BYTES))
    try:
        return pq.read_table(data) if suffix != ".csv" else pacsv.read_csv(data)
    except pa.ArrowException as exc:
        raise ReferenceDataError(f"reference file {redact(text)!r} could not be read: {exc}") from exc


def read_bytes(location: str | Path, what: str, limit: int) -> bytes:
    """A whole file from a local path or a URL pyarrow.fs reads, at most `limit` bytes."""
    text = str(location)
    if "://" in text:
        import pyarrow.fs as pafs

        try:
            fs, inner = pafs.FileSystem.from_uri(text)
            with fs.open_input_file(inner) as fh:
                if fh.size() > limit:
                    raise ReferenceDataError(f"{what} {redact(text)!r}: {fh.size():,} bytes, more than {limit:,}")
                return fh.read()
        except FileNotFoundError:
            raise ReferenceDataError(f"{what} {redact(text)!r} does not exist") from None
        except (pa.ArrowException, OSError) as exc:
            raise ReferenceDataError(f"{what} {redact(text)!r} could not be read: {exc}") from exc
    local = Path(text)
    if not local.is_file():
        raise ReferenceDataError(f"{what} {text!r} does not exist")
    if local.stat().st_size > limit:
        raise ReferenceDataError(f"{what} {text!r}: {local.stat().st_size:,} bytes, more than {limit:,}")
    return local.read_bytes()


def normalise(spec: ModelSpec, table: pa.Table) -> pa.Table:
    """Check `table` against `spec`; return it with canonical column types."""
    if table.num_rows == 0:
        raise ReferenceDataError("reference data has no rows")
    out: dict[str, pa.Array] = {}
    for col in spec.features:
        if col.name not in table.column_names:
            raise ReferenceDataError(f"reference column {col.name!r}: missing (it is a feature in the schema)")
        out[col.name] = _convert(table.column(col.name), col, nan_is_missing=col.nullable)
    for col in spec.attributes:
        if col.name in table.column_names:
            out[col.name] = _convert(table.column(col.name), col, allow_all_null=True)
    if "prediction" not in table.column_names:
        raise ReferenceDataError("reference column 'prediction': missing (the model's output on each row)")
    target = Column("prediction", spec.prediction_type)
    out["prediction"] = _convert(table.column("prediction"), target)
    if "label" in table.column_names:
        out["label"] = _convert(table.column("label"), Column("label", spec.prediction_type), allow_all_null=True)
    return pa.table(out)


def _convert(column: pa.ChunkedArray, col: Column, allow_all_null: bool = False,
             nan_is_missing: bool = False) -> pa.ChunkedArray:
    if not allow_all_null and column.null_count == len(column):
        raise ReferenceDataError(f"reference column {col.name!r}: every value is empty")
    if col.numeric:
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type) or pa.types.is_null(column.type)):
            sample = next((v for v in column.to_pylist() if v is not None), None)
            raise ReferenceDataError(
                f"reference column {col.name!r}: expected numeric values, found {column.type} (e.g. {sample!r})"
            )
        converted = pc.cast(column, pa.float64())
        if nan_is_missing:  # a nullable feature: pandas writes its gaps as NaN
            converted = pc.if_else(pc.fill_null(pc.is_nan(converted), False), pa.scalar(None, pa.float64()),
                                   converted)
        finite = pc.is_finite(converted)
        if pc.any(pc.invert(pc.fill_null(finite, True))).as_py():
            raise ReferenceDataError(f"reference column {col.name!r}: contains NaN or infinite values (a feature "
                                 "with gaps: mark it \"nullable\": true in the schema, and NaN is read as missing)")
        return converted
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    try:
        return pc.cast(column, pa.string())
    except pa.ArrowException as exc:
        raise ReferenceDataError(f"reference column {col.name!r}: cannot be read as categories ({exc})") from exc
