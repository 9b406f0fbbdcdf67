"""RunFolder: the lock of a run folder (holder named, stale locks taken over), atomic writes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from nnrelief.experiments.runfolder import LOCK, RunFolder, RunLockedError

HOLD = """
import sys, time
from nnrelief.experiments.runfolder import RunFolder
RunFolder(sys.argv[1]).open_for_writing()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_told_which_process_holds_the_folder(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"{tmp_path} is in use by process {holder.pid}"):
            RunFolder(tmp_path).open_for_writing()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file remains, with its pid: a stale lock, taken over
    assert (tmp_path / LOCK).read_text().strip() == str(holder.pid)
    with caplog.at_level(logging.INFO, logger="nnrelief"), RunFolder(tmp_path):
        assert (tmp_path / LOCK).read_text().strip() == str(os.getpid())
    assert f"stale lock of process {holder.pid}" in caplog.text


def test_one_process_may_open_its_folder_twice(tmp_path):
    first = RunFolder(tmp_path).open_for_writing()
    with RunFolder(tmp_path) as second:
        second.write_text("a.txt", "x")
    first.close()
    holder = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", ""), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert holder.returncode == 0 and "locked" in holder.stdout, holder.stderr  # released by close()


def test_a_finished_writer_leaves_no_stale_lock(tmp_path, caplog):
    finished = "with RunFolder(sys.argv[1]):\n    print('locked', flush=True)\n"
    script = HOLD.replace("RunFolder(sys.argv[1]).open_for_writing()\nprint(\"locked\", flush=True)\n", finished)
    holder = subprocess.run([sys.executable, "-c", script.replace("time.sleep(120)", ""), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert holder.returncode == 0 and "locked" in holder.stdout, holder.stderr
    assert (tmp_path / LOCK).read_text() == ""
    with caplog.at_level(logging.INFO, logger="nnrelief"), RunFolder(tmp_path):
        pass
    assert "stale lock" not in caplog.text


def test_unchanged_files_are_not_rewritten(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_text("a.txt", "same")
    inode = (tmp_path / "a.txt").stat().st_ino
    folder.write_text("a.txt", "same")
    assert (tmp_path / "a.txt").stat().st_ino == inode
    folder.write_text("a.txt", "other")
    assert (tmp_path / "a.txt").read_text() == "other"


def test_files_get_the_usual_permissions(tmp_path):
    from nnrelief.fileio import save_text

    old = os.umask(0o022)
    try:
        save_text("x", tmp_path / "a.txt")
        os.umask(0o077)
        save_text("y", tmp_path / "b.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644, "readable by others, as open() would make it"
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
