"""Files: output folders never replaced unless ichpipe's own, never an input, whole after a kill; one writer per
folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ichpipe.base.errors import InputError
from ichpipe.base.files import OUTPUT_MARKER, atomic_dir, check_output_dir, recover_dir, writer_lock


def _user_folder(folder: Path, n: int = 5) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"IM{i:04d}.dcm").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text("my notes")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_output_folder_that_is_or_holds_an_input_or_a_users_files_is_never_replaced(tmp_path):
    study = tmp_path / "patients" / "study"
    files = _user_folder(study)
    for out, inputs, message in (
            (study, [study], "holds the input"),  # was: the study's DICOMs deleted, three CSVs in their place
            (study.parent, [study], "holds the input"),  # the study's parent
            (tmp_path, [study], "holds the input"),
            (study, [], "holds files ichpipe did not write"),  # a user's folder, whatever it holds
    ):
        with pytest.raises(InputError, match=rf"^{out}: {message}"):
            with atomic_dir(out, inputs, "--out") as tmp:
                (tmp / "slices.csv").write_text("x")
        assert {p.name: p.read_bytes() for p in study.iterdir()} == files
    assert sorted(p.name for p in study.parent.iterdir()) == ["study"]  # no staging folder left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # an empty folder holds nothing to lose
        (tmp / "a.csv").write_text("1")
    with atomic_dir(empty) as tmp:  # and now it is ours: replaced as a whole
        (tmp / "b.csv").write_text("2")
    assert sorted(p.name for p in empty.iterdir()) == [OUTPUT_MARKER, "b.csv"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "a_file")


_KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from ichpipe.base import files as io
    out, step = Path(sys.argv[1]), sys.argv[2]
    renames = []
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(a, b):
        real_rename(a, b)
        renames.append(b)
        if step == f"rename{len(renames)}":
            os.kill(os.getpid(), signal.SIGKILL)

    def rmtree(path, *args, **kwargs):  # the former folder's deletion, killed halfway
        if step == "delete":
            for p in sorted(Path(path).iterdir())[:len(list(Path(path).iterdir())) // 2]:
                p.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        real_rmtree(path, *args, **kwargs)

    os.rename, shutil.rmtree = rename, rmtree
    with io.atomic_dir(out) as tmp:
        for i in range(40):
            (tmp / f"new{i:02d}.csv").write_text("new")
""")


@pytest.mark.parametrize("step", ["rename1", "rename2", "delete"])
def test_a_kill_while_an_output_folder_is_swapped_leaves_the_old_or_the_new_whole(tmp_path, step):
    out = tmp_path / "predictions"
    with atomic_dir(out) as tmp:
        for i in range(30):
            (tmp / f"old{i:02d}.csv").write_text("old")
    res = subprocess.run([sys.executable, "-c", _KILLER, str(out), step])
    assert res.returncode == -signal.SIGKILL
    recover_dir(out)  # what the next run does first
    names = sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER)
    assert names in ([f"old{i:02d}.csv" for i in range(30)], [f"new{i:02d}.csv" for i in range(40)]), names
    if step != "rename1":  # once renamed in, the new folder is the one
        assert names[0] == "new00.csv"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions"]  # nothing hidden left beside it
    with atomic_dir(out) as tmp:  # and it is still ours
        (tmp / "x.csv").write_text("1")


def test_a_second_writer_of_a_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "runs" / "exp" / "fold0"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from ichpipe.base.files import writer_lock
        with writer_lock({str(folder)!r}, "stage 2 (train) of exp fold 0"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"^{folder}: stage 2 \(train\) of exp fold 0 \(process {holder.pid}\) "
                                             r"is writing this folder; wait until it ends"):
            with writer_lock(folder, "stage 3"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(folder, "stage 3"):  # the holder is gone: the lock is free, whatever state it left
        pass
