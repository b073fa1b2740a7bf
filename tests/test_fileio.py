import pytest

from fileio import atomic_write


def test_atomic_write_replaces_the_file_only_once_written(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("old")
    with atomic_write(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old" and tmp.suffix == ".json"
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_atomic_write_keeps_the_old_file_and_no_temporary_one_on_error(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.csv"]
