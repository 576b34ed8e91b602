"""fscs.atomic: whole file or the previous one, never a partial file or a stray temporary."""
from __future__ import annotations

import pytest

from fscs.atomic import write_atomic_with, write_bytes_atomic, write_text_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_writes_create_the_folder_and_leave_no_temporary(tmp_path, durable):
    target = tmp_path / "a" / "b" / "f.txt"
    write_text_atomic(target, "héllo\n", durable=durable)
    write_bytes_atomic(tmp_path / "a" / "g.bin", b"\x00\x01", durable=durable)
    assert target.read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "a" / "g.bin").read_bytes() == b"\x00\x01"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_failing_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "f.json"
    write_text_atomic(target, "old")

    def half_then_fail(fh):
        fh.write(b"new but trunc")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic_with(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """What a SIGKILL leaves (`name.tmp-<pid>` files and folders) goes; a live writer's temporary stays."""
    import os
    import subprocess
    import sys

    from fscs.atomic import remove_stale_tmp

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"checkpoint.pt.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f"shards.tmp-{dead}").mkdir()
    (tmp_path / f"shards.tmp-{dead}" / "a.tar").write_bytes(b"x")
    live = tmp_path / f"best.pt.tmp-{os.getppid()}"  # pytest's parent: alive
    live.write_bytes(b"being written")
    (tmp_path / "notes.tmp-draft").write_text("not ours")
    removed = remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f"checkpoint.pt.tmp-{dead}", f"shards.tmp-{dead}"])
    assert live.exists() and (tmp_path / "notes.tmp-draft").exists()
    assert remove_stale_tmp(tmp_path / "missing") == []


def test_an_output_folder_that_cannot_exist_is_a_one_line_error(tmp_path):
    from fscs.atomic import make_output_dir
    from fscs.data.shard_write import write_shards
    from fscs.errors import FSCSError

    assert make_output_dir(tmp_path / "a" / "b", "--out").is_dir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for path in (blocker, blocker / "sub"):
        with pytest.raises(FSCSError, match=rf"--out {path}: cannot create .*; pass a writable --out") as err:
            make_output_dir(path, "--out")
        assert "\n" not in str(err.value)

    def untouched():
        pytest.fail("a sample was read before the output folder was checked")
        yield

    with pytest.raises(FSCSError, match=rf"--out {blocker / 'shards'}: cannot create"):
        write_shards(untouched(), blocker / "shards", dataset="d", class_names=["a"], folds={0: [1]})
