"""`enricher demo` never deletes data it did not create."""

import pytest

from enricher.cli import main
from enricher.demo import MARKER, prepare_data_dir


def test_a_directory_with_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "model.parquet").write_bytes(b"not the demo's")
    assert main(["--data-dir", str(precious), "demo"]) == 2
    err = capsys.readouterr().err
    assert "did not create" in err and str(precious) in err
    assert (precious / "model.parquet").read_bytes() == b"not the demo's"
    assert sorted(p.name for p in precious.iterdir()) == ["model.parquet"]


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    from enricher.errors import UserError

    with pytest.raises(UserError, match="is a file"):
        prepare_data_dir(target)
    assert target.read_text() == "x"


def test_a_previous_demo_directory_is_started_afresh_and_an_empty_one_used(tmp_path):
    previous = prepare_data_dir(tmp_path / "demo")
    (previous / "worker.log").write_text("old run")
    again = prepare_data_dir(tmp_path / "demo")
    assert sorted(p.name for p in again.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (prepare_data_dir(empty) / MARKER).is_file()


def test_a_marked_directory_that_gained_other_files_is_refused(tmp_path):
    from enricher.errors import UserError

    demo = prepare_data_dir(tmp_path / "demo")
    (demo / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        prepare_data_dir(demo)
    assert (demo / "notes.txt").read_text() == "mine"


def test_the_demos_rates_count_a_steps_own_rows_over_its_own_seconds(capsys, monkeypatch):
    """The processed rate of step 6 counts the rows since it began (not the 20,000 streamed
    before training) over the seconds since it began (not since step 4)."""
    import time

    from enricher import demo

    now = time.monotonic()
    monkeypatch.setattr(demo.time, "monotonic", lambda: now + 10.0)
    demo._last_shown["line"] = None
    demo._progress("processed", 30_000, 100_000, started=now, since=20_000)
    assert "30,000/100,000 (1,000/s)" in capsys.readouterr().out
