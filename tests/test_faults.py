"""Faults as a suite: a tiny run (LeNet-300-100 on the MNIST sample, 2 iterations) killed at
every write, its disk full or read-only at every write, each of its files truncated,
garbled, emptied or swapped, parent, sibling and foreign folders, two writers.

Every fault is injected in-process (patched ``os.replace``, file writes, temporary-file
creation): chmod does not stop root. After each fault the run is resumed and compared with
an uninterrupted one: the same history (but wall times) and bit-identical weight files.
The figures in README.md's reliability section come from here (``-s`` prints them).
``os.fsync`` does nothing here: the faults are those of a process, not of the power, and
the suite's ~30 000 syncs took minutes on a busy disk.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnrelief import fileio
from nnrelief.cli import main
from nnrelief.experiments import checksums
from nnrelief.experiments.runfolder import RunFolder

TINY = [
    "--model", "lenet300_100", "--dataset", "mnist-sample", "--epochs", "1", "--retrain-epochs", "1",
    "--milestones", "--retrain-milestones", "--batch-size", "50", "--train-subset", "300", "--val-size", "100",
    "--prune-samples", "100", "--num-iters", "2", "--device", "cpu", "--no-progress", "-q",
]  # fmt: skip
TIMES = {"prune_seconds", "retrain_seconds", "seconds"}
WEIGHTS = ["init.pt", "trained.pt", "model-iter0.pt", "model-iter1.pt", "model-iter2.pt"]
RUN_FILES = ["config.json", *WEIGHTS, "relief_state.pt", "history.csv", "history.json", "checksums.json"]


@pytest.fixture(autouse=True, scope="module")
def no_sync():
    real = os.fsync
    os.fsync = lambda _fd: None
    yield
    os.fsync = real


def prune(run_dir: Path, *extra: str) -> int:
    return main(["prune", *TINY, "--run-dir", str(run_dir), *extra])


def outcome(run_dir: Path) -> dict:
    """What a run must reproduce: the history but its wall times, the weight files' bytes."""
    rows = json.loads((run_dir / "history.json").read_text())["iterations"]
    return {
        "history": [{k: v for k, v in row.items() if k not in TIMES} for row in rows],
        **{name: (run_dir / name).read_bytes() for name in WEIGHTS},
    }


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files, checkpoints and unverifiable files left in a finished run folder."""
    left = [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".lock" or p.suffix == ".ckpt"]
    shared = run_dir.parent / "dense"  # the shared dense model's folder (experiments.dense)
    left += [p.name for p in shared.rglob("*") if p.is_file() and (p.name.startswith(".") and p.name != ".lock" or p.suffix == ".ckpt")]
    folder = RunFolder(run_dir)
    for name in RUN_FILES[:-1]:
        try:
            folder.read_bytes(name)
        except (OSError, ValueError) as error:
            left.append(f"{name}: {error}")
    return left


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0] and " error: " in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict, int]:
    """An uninterrupted run, its outcome and the number of renames (write points) it made."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    renames: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every test (module fixtures come before conftest's one_thread)
    os.replace = killing_at(0, renames)  # counts, never kills
    try:
        assert prune(run_dir) == 0
    finally:
        os.replace = REAL_REPLACE
        torch.set_num_threads(threads)
    return run_dir, outcome(run_dir), len(renames)


class Killed(BaseException):
    """A kill: nothing after it runs (it is no Exception, so nothing catches it)."""


REAL_REPLACE = os.replace
REAL_MKSTEMP = fileio.mkstemp


def killing_at(point: int, calls: list[str]):
    """``os.replace`` that kills the process instead of the ``point``-th rename, leaving
    what a kill leaves: the old target and the complete temporary file."""

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == point:
            os.link(src, Path(src).with_name(f".{Path(dst).stem}.killed.tmp{Path(dst).suffix}"))
            raise Killed
        REAL_REPLACE(src, dst)

    return replace


class _FailingFile:
    """A file whose first write fails with ``code`` after writing half of it."""

    def __init__(self, file, code: int) -> None:
        self.file, self.code = file, code

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.file.close()

    def write(self, data) -> int:
        self.file.write(bytes(data)[: len(data) // 2])
        raise OSError(self.code, os.strerror(self.code))

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def failing_open_at(point: int, code: int, calls: list[str]):
    """``open`` for nnrelief.fileio whose ``point``-th file fills the disk (or its size limit)."""

    def failing(path, mode="r", *args, **kwargs):
        calls.append(path)
        file = open(path, mode, *args, **kwargs)
        return _FailingFile(file, code) if len(calls) == point else file

    return failing


def failing_mkstemp_at(point: int, code: int, calls: list[str]):
    """``mkstemp`` for nnrelief.fileio that fails with ``code`` (a read-only file system) at
    the ``point``-th temporary file."""

    def failing(*args, **kwargs):
        calls.append(kwargs["prefix"])
        if len(calls) == point:
            raise OSError(code, os.strerror(code))
        return REAL_MKSTEMP(*args, **kwargs)

    return failing


def test_a_kill_at_every_write_point_resumes_identically(reference, tmp_path, monkeypatch, capsys):
    _, expected, points = reference
    failures = []
    for point in range(1, points + 1):
        run_dir = tmp_path / f"kill{point}" / "run"  # its own shared dense folder beside it
        calls: list[str] = []
        monkeypatch.setattr(os, "replace", killing_at(point, calls))
        with pytest.raises(Killed):
            prune(run_dir)
        monkeypatch.setattr(os, "replace", REAL_REPLACE)
        capsys.readouterr()
        resumed = prune(run_dir, "-v")  # -q -v: warnings shown; a kill is never taken for damage
        err = capsys.readouterr().err
        if resumed != 0 or "damaged" in err or outcome(run_dir) != expected or leftovers(run_dir):
            failures.append((point, Path(calls[-1]).name, leftovers(run_dir), err[-300:]))
    print(f"\nkills: {points} points tried, {points - len(failures)} resumed identical")
    assert not failures


FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file-size limit", errno.EROFS: "read-only"}
# (first write point, step): every write meets a full disk or a read-only folder, alternately
# (both take the same path up to the error: mkstemp for EROFS, the file's writes for ENOSPC);
# EFBIG takes ENOSPC's path: every 4th write.
POINTS = {errno.ENOSPC: (1, 2), errno.EFBIG: (1, 4), errno.EROFS: (2, 2)}


@pytest.mark.parametrize("code", list(FULL), ids=[errno.errorcode[code] for code in FULL])
def test_a_full_disk_or_read_only_folder_at_every_write_names_the_file_and_resumes(
    code, reference, tmp_path, monkeypatch, capsys
):
    _, expected, points = reference
    failures = []
    first, step = POINTS[code]
    tried = range(first, points + 1, step)
    for point in tried:
        run_dir = tmp_path / f"{errno.errorcode[code]}{point}" / "run"
        calls: list[str] = []
        if code == errno.EROFS:  # no temporary file can be created
            monkeypatch.setattr(fileio, "mkstemp", failing_mkstemp_at(point, code, calls))
        else:  # the disk fills up (or the file reaches the size limit) while the file is written
            monkeypatch.setattr(fileio, "open", failing_open_at(point, code, calls), raising=False)
        capsys.readouterr()
        assert prune(run_dir) == 1
        line = error_line(capsys)
        monkeypatch.undo()
        where = (f"cannot write {run_dir}/", f"cannot write {run_dir.parent}/dense")  # the run's or its shared dense folder
        named = any(prefix in line for prefix in where) and FULL[code] in line and "run again" in line
        resumed = prune(run_dir, "-v")
        err = capsys.readouterr().err
        if not named or resumed != 0 or "damaged" in err or outcome(run_dir) != expected or leftovers(run_dir):
            failures.append((point, line, leftovers(run_dir), err[-300:]))
    print(f"\n{errno.errorcode[code]}: {len(tried)} points tried, {len(tried) - len(failures)} named the file and resumed identical")
    assert not failures


# ----------------------------------------------------------------------------- damaged files


def garbled(data: bytes) -> bytes:
    out = bytearray(data)
    rng = random.Random(0)
    for index in rng.sample(range(len(out)), max(1, len(out) // 50)):  # 2% of the bytes
        out[index] ^= 1 + rng.randrange(255)
    return bytes(out)


DAMAGES = {
    "truncated": lambda data, _other: data[: len(data) // 2],
    "garbled": lambda data, _other: garbled(data),
    "emptied": lambda data, _other: b"",
    "swapped": lambda _data, other: other,  # the same file of a run with another seed
}
# What `nnrelief prune` does with each damaged file of a finished run: rebuilt exactly (the
# same bytes), rewritten (same content, e.g. a rebuilt state), or refused naming it.
REBUILT = {"config.json", "init.pt", "trained.pt", "model-iter0.pt", "model-iter2.pt", "history.csv", "history.json"}
REWRITTEN = {"relief_state.pt"}


@pytest.fixture(scope="module")
def other_seed(reference, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("other") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert prune(run_dir, "--seed", "1") == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_each_damaged_file_is_rebuilt_or_named(reference, other_seed, tmp_path, capsys):
    source, expected, _ = reference
    failures, cases = [], 0
    for name in RUN_FILES:
        for damage, make in DAMAGES.items():
            cases += 1
            run_dir = tmp_path / f"{name}-{damage}"
            shutil.copytree(source, run_dir)
            (run_dir / name).write_bytes(make((source / name).read_bytes(), (other_seed / name).read_bytes()))
            capsys.readouterr()
            # a reader refuses the damaged file it needs, naming it, and writes nothing
            before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
            code = main(["eval", str(run_dir / "model-iter2.pt"), "-q"])
            err = capsys.readouterr().err
            reader_ok = (code == 0 and not err) if name not in ("model-iter2.pt", "config.json", "checksums.json") else (
                code == 1 and str(run_dir / name) in err)  # fmt: skip
            reader_ok = reader_ok and before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
            # the writer rebuilds what the run holds the means to rebuild, and names the rest
            code = prune(run_dir)
            err = capsys.readouterr().err
            if name in REBUILT | REWRITTEN:
                writer_ok = code == 0 and outcome(run_dir) == expected and not leftovers(run_dir)
                writer_ok = writer_ok and (name in REWRITTEN or (run_dir / name).read_bytes() == (source / name).read_bytes())
            elif name == "model-iter1.pt":  # not the run's latest model: the run goes on, eval names it
                writer_ok = code == 0 and main(["eval", str(run_dir / name), "-q"]) == 1
                err = capsys.readouterr().err
                writer_ok = writer_ok and str(run_dir / name) in err and "restore it from a copy" in err
            else:  # checksums.json: damaged (delete it), or swapped (no file matches it)
                writer_ok = code == 1 and str(run_dir / name) in err
            if not (reader_ok and writer_ok):
                failures.append((name, damage, reader_ok, writer_ok, err[-300:]))
    print(f"\ndamaged files: {cases} cases, {cases - len(failures)} rebuilt or named")
    assert not failures


def test_a_model_file_with_non_finite_weights_is_refused_naming_the_tensor(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    (run_dir / "checksums.json").unlink()  # as written before checksums: only the values can tell
    state = torch.load(run_dir / "model-iter1.pt", weights_only=True)
    state["fc1.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 3.3e38])
    torch.save(state, run_dir / "model-iter1.pt")
    assert main(["eval", str(run_dir / "model-iter1.pt"), "-q"]) == 1
    line = error_line(capsys)
    assert f"{run_dir / 'model-iter1.pt'} is damaged: tensor 'fc1.weight' holds 2 non-finite value(s)" in line


def test_a_folder_from_before_checksums_resumes_and_gets_them(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    (run_dir / "checksums.json").unlink()
    assert prune(run_dir) == 0 and not (run_dir / "checksums.json").exists()  # a finished run writes nothing
    assert prune(run_dir, "--num-iters", "3") == 0  # extended: the new files are recorded
    recorded = checksums.read_entries(run_dir)
    assert {"model-iter3.pt", "relief_state.pt", "history.json"} <= set(recorded) and "model-iter1.pt" not in recorded


def test_a_reader_racing_the_writer_is_not_told_of_damage(tmp_path):
    writer = checksums.Checksums(tmp_path)
    writer.start()
    try:
        fileio.save_text("one", tmp_path / "a.txt")
        reader = checksums.Checksums(tmp_path)
        assert reader.check("a.txt", b"one") == b"one"  # the reader now holds the old entries
        fileio.save_text("two", tmp_path / "a.txt")
        assert reader.check("a.txt", b"two") == b"two"  # read anew, not called damaged
        (tmp_path / "a.txt").write_text("three")  # changed behind the writer's back
        with pytest.raises(checksums.DamagedFileError, match="does not match its checksum"):
            reader.check("a.txt", b"three")
    finally:
        writer.stop()


# ----------------------------------------------------------------------------- folders


def test_a_foreign_folder_is_refused_before_anything_is_touched(tmp_path, capsys):
    user = tmp_path / "u"
    (user / "p" / "sub").mkdir(parents=True)
    (user / ".notes.tmp.txt").write_text("x")
    (user / ".config.ab12cd34.tmp.json").write_text("looks like ours, is not in a run folder")
    (user / "p" / "sub" / ".report.tmp").write_text("y")
    before = sorted(str(p.relative_to(user)) for p in user.rglob("*"))
    assert prune(user) == 1
    line = error_line(capsys)
    assert f"{user} is not a run folder" in line and "nothing was changed" in line
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == before  # no lock, nothing removed
    (tmp_path / "file").write_text("mine")
    assert prune(tmp_path / "file") == 1
    assert "is a file, not a folder" in error_line(capsys) and (tmp_path / "file").read_text() == "mine"


def test_parent_and_sibling_folders_of_a_live_run_are_left_alone(reference, tmp_path, capsys):
    runs = tmp_path / "runs"
    live = runs / "b"
    shutil.copytree(reference[0], live)
    with RunFolder(live):  # b is being written: its lock is held, a write under way
        temp = live / ".init.x8y7z6w5.tmp.pt"
        temp.write_bytes(b"half of a write")
        assert prune(runs) == 1  # the parent of a run
        assert "is not a run folder" in error_line(capsys)
        assert temp.exists() and not (runs / ".lock").exists()
        assert prune(runs / "a") == 0  # a sibling
        assert temp.exists()
    baseline = runs / "a" / "compare" / "random"
    baseline.mkdir(parents=True)
    (baseline / ".model-iter1.q1w2e3r4.tmp.pt").write_bytes(b"a baseline's write")
    (runs / "a" / "report").mkdir()
    (runs / "a" / "report" / ".report.a1b2c3d4.tmp.md").write_text("the report's write")
    assert prune(runs / "a") == 0  # its subfolders are run folders (or outputs) of their own
    assert (baseline / ".model-iter1.q1w2e3r4.tmp.pt").exists() and (runs / "a" / "report" / ".report.a1b2c3d4.tmp.md").exists()


HOLD = """
import sys, time
from nnrelief.experiments.runfolder import RunFolder
RunFolder(sys.argv[1]).open_for_writing()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_process_is_refused_and_touches_nothing(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        temp = run_dir / ".relief_state.a1b2c3d4.tmp.pt"
        temp.write_bytes(b"the holder's write under way")
        assert prune(run_dir, "--num-iters", "3") == 1
        assert f"in use by process {holder.pid}" in error_line(capsys)
        assert temp.exists() and not (run_dir / "model-iter3.pt").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_read_only_folder_with_work_left_is_refused_before_any_work(reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    real_open = os.open

    def read_only(path, *args, **kwargs):  # the lock file cannot be created or opened for writing
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert prune(run_dir) == 0  # finished: shown, nothing to write
    capsys.readouterr()
    assert prune(run_dir, "--num-iters", "3") == 1
    line = error_line(capsys)
    assert f"run folder {run_dir} is not writable, and iterations 3-3 are left" in line
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert prune(tmp_path / "new") == 1  # a new run where nothing can be written
    assert f"run folder {tmp_path / 'new'} is not writable, and the run has not started" in error_line(capsys)
    assert not list((tmp_path / "new").iterdir())


def test_each_run_file_of_the_wrong_structure_is_named(reference, tmp_path, capsys):
    failures = []
    wrong = [("history.json", {"iterations": "x"}), ("history.json", {"iterations": [{"iteration": "0"}]}),
             ("config.json", {"model": "lenet300_100"}), ("config.json", [1, 2])]  # fmt: skip
    for index, (name, content) in enumerate(wrong):
        run_dir = tmp_path / f"{index}-{name}"
        shutil.copytree(reference[0], run_dir)
        (run_dir / "checksums.json").unlink()  # so that only the structure can tell
        (run_dir / name).write_text(json.dumps(content))
        for argv in (["report", str(run_dir), "--json", str(tmp_path / "r.json"), "-q"],
                     ["eval", str(run_dir / "model-iter2.pt"), "-q"]):  # fmt: skip
            code = main(argv)
            err = capsys.readouterr().err
            if name == "history.json" and argv[0] == "eval":
                continue  # eval does not read the history
            if code != 1 or str(run_dir / name) not in err or "Traceback" in err:
                failures.append((name, content, argv[0], err[-300:]))
    assert not failures


def test_config_json_is_rewritten_from_the_command_the_run_records(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    (run_dir / "config.json").write_text("{}")
    assert main(["eval", str(run_dir / "model-iter2.pt"), "-q"]) == 1
    line = error_line(capsys)
    command = line.split("`")[1]
    assert command.startswith("nnrelief prune --model lenet300_100 --dataset mnist-sample") and "--seed" not in command
    assert prune(run_dir, "--seed", "1") == 1  # another run's settings do not rewrite it
    assert "seed: stored=0 now=1" in error_line(capsys)
    assert main(["prune", *shlex.split(command)[2:], "-q", "--no-progress"]) == 0
    assert (run_dir / "config.json").read_bytes() == (reference[0] / "config.json").read_bytes()


def test_a_damaged_checkpoint_is_dropped_and_its_phase_redone(reference, tmp_path, monkeypatch, capsys):
    _, expected, _ = reference
    renames: list[str] = []
    monkeypatch.setattr(os, "replace", killing_at(0, renames))  # counts
    assert prune(tmp_path / "count" / "run") == 0
    shared = tmp_path / "count" / "dense"  # the dense model is trained in the shared folder
    point = [Path(dst).parent.parent == shared and Path(dst).name for dst in renames].index("trained.pt")
    run_dir = tmp_path / "killed" / "run"
    monkeypatch.setattr(os, "replace", killing_at(point, []))  # at trained.pt's checksum: dense.ckpt written
    with pytest.raises(Killed):
        prune(run_dir)
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    (checkpoint,) = (tmp_path / "killed" / "dense").glob("*/dense.ckpt")
    assert not (checkpoint.parent / "trained.pt").exists() and not (run_dir / "trained.pt").exists()
    checkpoint.write_bytes(garbled(checkpoint.read_bytes()))
    capsys.readouterr()
    assert prune(run_dir, "-v") == 0  # -q -v: warnings shown
    err = capsys.readouterr().err
    assert f"{checkpoint} is damaged or was replaced" in err and "restarts from the beginning" in err
    assert outcome(run_dir) == expected
