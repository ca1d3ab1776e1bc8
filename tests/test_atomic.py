import pytest

from pg2_server.atomic import write_atomic, write_bytes_atomic


def test_replaces_the_file_whole_and_readable_by_others(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    write_bytes_atomic(target, b"old")
    assert write_bytes_atomic(target, b"new") == target
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")

    def half(tmp):
        open(tmp, "w").write("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]
