"""Several processes (torch.distributed, gloo on CPU): sharded batches, DDP training,
sharded pruning, one writer, failures that stop every rank.

The multi-process tests start two processes once each (spawn, torchrun, plain env://)
and check several things per start, to stay fast.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import nnrelief
from nnrelief import data as nndata
from nnrelief import distributed
from nnrelief.cli import main
from nnrelief.experiments.config import ConfigError, ExperimentConfig, reproduce_command
from nnrelief.models import get_model
from nnrelief.pruning.masks import state_with_masks
from nnrelief.training import TrainConfig, evaluate, fit, parallel

WORLD = 2
SMALL = [
    "--preset", "demo", "--epochs", "1", "--retrain-epochs", "1", "--train-subset", "480",
    "--val-size", "240", "--prune-samples", "200", "--device", "cpu", "--no-progress", "--threads", "1",
]  # fmt: skip
TABLE_HEADER = "iter  val before"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    src = str(Path(nnrelief.__file__).resolve().parents[1])
    env.update(PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", **extra)
    return env


@functools.lru_cache(maxsize=1)
def small_data() -> tuple[nndata.TensorDataset, nndata.TensorDataset]:
    full = nndata.load_dataset("mnist-sample", None, "train")
    return nndata.subset(full, torch.arange(240)), nndata.subset(full, torch.arange(240, 340))


# ----------------------------------------------------------------------------- one process


def test_shard_bounds_partition_in_order():
    for n in (0, 1, 5, 12, 13):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [stop - start for start, stop in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.shard_bounds(10, 2, 2)


@pytest.mark.parametrize("augment", [False, True])
def test_rank_batches_are_the_parts_of_the_one_process_batches(augment):
    train, _ = small_data()
    train = nndata.subset(train, torch.arange(230))  # last batch of 50 samples

    def loader(rank, world, even):
        batches = nndata.BatchLoader(train, 60, shuffle=True, seed=3, augment=augment,
                                     rank=rank, world_size=world, even_shards=even)  # fmt: skip
        batches.set_epoch(1)
        return batches

    whole = list(loader(0, 1, False))
    for world, even in ((2, True), (3, True), (4, True), (3, False)):
        ranks = [list(loader(r, world, even)) for r in range(world)]
        assert {len(loader(r, world, even)) for r in range(world)} == {len(whole)}
        for i, (x, y) in enumerate(whole):
            parts = [r[i] for r in ranks if i < len(r)]
            kept = len(y) - len(y) % world if even else len(y)
            assert torch.equal(torch.cat([p[0] for p in parts]), x[:kept])
            assert torch.equal(torch.cat([p[1] for p in parts]), y[:kept])
            if even:
                assert {len(p[1]) for p in parts} == {kept // world}


def test_even_shards_need_a_batch_divisible_by_the_processes():
    train, _ = small_data()
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        nndata.BatchLoader(train, 30, shuffle=True, seed=0, rank=1, world_size=4, even_shards=True)


def test_one_process_helpers_are_no_ops():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    values = (torch.tensor(2.0), torch.tensor(3))
    assert parallel.all_reduce_sums(*values) == values
    distributed.check_same_on_all_ranks({"a": torch.ones(3)}, "masks")
    assert distributed.from_main(lambda a, b: a + b, 1, b=2) == 3
    model = torch.nn.Linear(2, 2)
    assert parallel.wrap_model(model) is model
    assert not distributed.init_from_env("cpu")  # no WORLD_SIZE in the environment


def test_mask_digest_sees_every_bit():
    masks = {"a": torch.tensor([True, False, True]), "b": torch.ones(2, 2, dtype=torch.bool)}
    digest = distributed._digest(masks)
    assert distributed._digest(dict(reversed(masks.items()))) == digest
    flipped = {**masks, "a": torch.tensor([True, True, True])}
    renamed = {"c": masks["a"], "b": masks["b"]}
    assert len({digest, distributed._digest(flipped), distributed._digest(renamed)}) == 3


def test_world_size_is_recorded_not_hashed():
    one = ExperimentConfig(dataset="mnist-sample")
    two = ExperimentConfig(dataset="mnist-sample", world_size=2)
    assert one.config_hash() == two.config_hash()
    with pytest.raises(ConfigError, match="multiple of 7"):
        ExperimentConfig(dataset="mnist-sample", batch_size=120, world_size=7)
    with pytest.raises(ConfigError, match="prune_samples must be >= the 8 processes"):
        ExperimentConfig(dataset="mnist-sample", prune_samples=4, world_size=8)
    with pytest.raises(ConfigError, match="world_size must be in"):
        ExperimentConfig(dataset="mnist-sample", world_size=0)
    assert "--world-size" not in reproduce_command(two)


# ----------------------------------------------------------------------------- two processes (spawn)


def _float64_prune(name: str, x: torch.Tensor, shards: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = get_model(name, 10).double()
    if name.startswith("resnet"):  # trained-looking BatchNorm statistics
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
    start, stop = distributed.shard_bounds(len(x)) if shards else (0, len(x))
    nnrelief.prune(model, list(x[start:stop].split(7)), alpha_fc=0.9, alpha_conv=0.85, progress=False)
    return {k: v for k, v in state_with_masks(model).items() if k.endswith("_mask") or k.endswith("gate")}


def _conv_bn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, stride=3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(256, 10),
    )  # fmt: skip


def _fit(rank: int, world: int, build=lambda: get_model("lenet300_100", 10)) -> tuple[dict[str, torch.Tensor], list, tuple]:
    train, val = small_data()
    torch.manual_seed(0)
    model = build()
    shards = {"rank": rank, "world_size": world}
    train_batches = nndata.BatchLoader(train, 60, shuffle=True, seed=1, even_shards=True, **shards)
    val_batches = nndata.BatchLoader(val, 64, shuffle=False, seed=0, **shards)
    result = fit(model, train_batches, val_batches, TrainConfig(epochs=2, device="cpu"), progress=False)
    tested = evaluate(model, val_batches, "cpu")
    return model.state_dict(), [r.val_accuracy for r in result.history], (tested.n, tested.accuracy, tested.loss)


def _spawned(rank: int, world: int, port: int, inputs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      NNRELIEF_DIST_TIMEOUT="120")  # fmt: skip
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    result: dict = {"rank": distributed.rank()}
    try:
        result["lenet5"] = _float64_prune("lenet5", inputs["mnist"], shards=True)
        result["resnet20"] = _float64_prune("resnet20", inputs["cifar"], shards=True)
        result["fit"] = _fit(rank, world)
        result["fit_bn"] = _fit(rank, world, _conv_bn)[0]
        try:
            distributed.check_same_on_all_ranks({"mask": torch.tensor([rank == 0])}, "pruning masks")
        except distributed.DistributedError as error:
            result["mismatch"] = str(error)
        result["from_main"] = distributed.from_main(distributed.rank)
        result["nested"] = distributed.from_main(lambda: distributed.from_main(distributed.rank) + 10)
        try:
            distributed.from_main(lambda: int("not a number"))
        except ValueError as error:
            result["from_main_error"] = str(error)
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        distributed.shutdown()


def test_two_processes_prune_and_train_like_one(tmp_path):
    torch.manual_seed(5)
    inputs = {"mnist": torch.rand(40, 1, 28, 28, dtype=torch.float64),
              "cifar": torch.randn(10, 3, 32, 32, dtype=torch.float64)}  # fmt: skip
    mp.spawn(_spawned, args=(WORLD, free_port(), inputs, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["rank"] for r in ranks] == [0, 1]

    for name, data in (("lenet5", inputs["mnist"]), ("resnet20", inputs["cifar"])):
        single = _float64_prune(name, data, shards=False)
        assert any(not bool(m.all()) for m in single.values()), name  # something was pruned
        for result in ranks:
            assert result[name].keys() == single.keys()
            for key, mask in single.items():
                assert torch.equal(result[name][key], mask), (name, key)

    state, val_history, tested = _fit(0, 1)
    assert torch.equal(torch.tensor(ranks[0]["fit"][1]), torch.tensor(ranks[1]["fit"][1]))
    for key, value in state.items():
        assert torch.equal(ranks[0]["fit"][0][key], ranks[1]["fit"][0][key]), key  # ranks in step
        assert torch.allclose(ranks[0]["fit"][0][key], value, atol=1e-5), key  # = one process
    for key, value in ranks[0]["fit_bn"].items():  # BatchNorm statistics too
        assert torch.equal(ranks[1]["fit_bn"][key], value), key
    one_sample = 1 / 100 + 1e-9  # float rounding may flip one near-tie prediction on some CPU
    assert max(abs(a - b) for a, b in zip(ranks[0]["fit"][1], val_history)) <= one_sample
    assert ranks[0]["fit"][2][0] == tested[0] == 100  # the validation samples of all ranks
    assert abs(ranks[0]["fit"][2][1] - tested[1]) <= one_sample
    assert abs(ranks[0]["fit"][2][2] - tested[2]) < 1e-5

    for result in ranks:
        assert "ranks [0] have" in result["mismatch"] and "ranks [1] have" in result["mismatch"]
        assert result["from_main"] == 0 and result["nested"] == 10
        assert "not a number" in result["from_main_error"]


# ----------------------------------------------------------------------------- torchrun, the command


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               "-m", "nnrelief", *args]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)


def _torchrun_two_nodes(args: list[str], cwds: list[Path]) -> list[subprocess.CompletedProcess]:
    """One process on each of two "machines" that share no folder (different cwd)."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
             "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "nnrelief", *args],
            cwd=cwd, env=child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        for node, cwd in enumerate(cwds)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    return [subprocess.CompletedProcess(n.args, n.returncode, *out) for n, out in zip(nodes, outputs)]


def test_torchrun_prune_writes_one_run_that_one_process_resumes_and_reports(tmp_path, capsys):
    done = _torchrun(["prune", *SMALL, "--num-iters", "1", "--runs-root", "runs"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(TABLE_HEADER) == 1 and done.stdout.count("selected model:") == 1
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "dense"]  # beside it: the shared dense model
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == WORLD
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["iteration"] for r in history["iterations"]] == [0, 1]
    assert not list(run_dir.glob(".*tmp*")) and not list(run_dir.glob("*.ckpt"))

    # one process continues the torchrun run, then torchrun continues that one; config.json
    # keeps the creating run's settings, history.json has those of the latest invocation
    config = (run_dir / "config.json").read_bytes()
    assert main(["prune", *SMALL, "--num-iters", "2", "--run-dir", str(run_dir), "-q"]) == 0
    assert (run_dir / "config.json").read_bytes() == config
    assert json.loads((run_dir / "history.json").read_text())["config"]["world_size"] == 1
    before = json.loads((run_dir / "history.json").read_text())["iterations"]
    trained = (run_dir / "trained.pt").stat().st_mtime_ns
    elsewhere = tmp_path / "second-machine"
    elsewhere.mkdir()
    relative = run_dir.relative_to(tmp_path)  # exists on the first "machine" only
    again = _torchrun_two_nodes(["prune", *SMALL, "--num-iters", "3", "--run-dir", str(relative)],
                                [tmp_path, elsewhere])  # fmt: skip
    assert [node.returncode for node in again] == [0, 0], again[0].stderr + again[1].stderr
    assert again[0].stdout.count(TABLE_HEADER) == 1 and TABLE_HEADER not in again[1].stdout
    assert not any(elsewhere.iterdir())  # rank 1 read nothing from and wrote nothing to its disk
    assert json.loads((run_dir / "history.json").read_text())["config"]["world_size"] == WORLD
    history = json.loads((run_dir / "history.json").read_text())["iterations"]
    assert history[:3] == before and [r["iteration"] for r in history] == [0, 1, 2, 3]
    assert (run_dir / "trained.pt").stat().st_mtime_ns == trained  # continued, not redone
    assert [p for p in (tmp_path / "runs").iterdir() if p.name != "dense"] == [run_dir]

    capsys.readouterr()
    assert main(["report", str(run_dir), "--samples", "50", "-q"]) == 0
    assert (run_dir / "report" / "report.md").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs")
def test_torchrun_on_gpus_uses_nccl_and_one_gpu_per_process(tmp_path):
    done = _torchrun(["prune", *SMALL, "--device", "cuda", "--num-iters", "1", "-v"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nccl" in done.stderr and done.stdout.count(TABLE_HEADER) == 1


def test_commands_that_need_one_process_refuse_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "runs in one process" in capsys.readouterr().err


# ----------------------------------------------------------------------------- failures

def _rank_one_script(second_epoch: str) -> str:
    """A CLI entry point whose rank 1 runs the code ``second_epoch`` as its second epoch starts."""
    return f"""
import os, signal, sys, time
import nnrelief.training.fitting
from nnrelief.cli import main

if os.environ["RANK"] == "1":
    train_epoch = nnrelief.training.fitting.train_epoch
    calls = []

    def changed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
{textwrap.indent(textwrap.dedent(second_epoch).strip(), " " * 12)}
        return train_epoch(*args, **kwargs)

    nnrelief.training.fitting.train_epoch = changed
sys.exit(main(sys.argv[1:]))
"""


# this rank's disk fails in the second epoch (an OSError: a one-line error)
_FAILING_RANK = _rank_one_script('raise OSError("disk lost on rank 1")')


def test_a_failure_on_one_rank_stops_every_rank_with_its_reason(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(_FAILING_RANK))
    port = str(free_port())
    args = ["prune", *SMALL, "--epochs", "3", "--runs-root", str(tmp_path / "runs")]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), *args], cwd=tmp_path, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env(RANK=str(r), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          NNRELIEF_DIST_TIMEOUT="60"),
        )  # fmt: skip
        for r in range(WORLD)
    ]
    outputs = [p.communicate(timeout=240) for p in processes]
    assert [p.returncode for p in processes] == [1, 1], outputs
    errors = [[line for line in err.splitlines() if "error:" in line] for _out, err in outputs]
    assert errors[1] == ["nnrelief prune: error: [rank 1/2] disk lost on rank 1"], outputs[1][1]
    assert errors[0] == [
        "nnrelief prune: error: [rank 0/2] stopped because rank 1 failed: OSError: disk lost on rank 1"
    ], outputs[0][1]
    assert TABLE_HEADER not in outputs[0][0] + outputs[1][0]


# this rank stops (SIGSTOP) in its second epoch and never answers again
_STOPPING_RANK = _rank_one_script("""
    with open("stopped-at", "w") as file:
        file.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGSTOP)
""")


def test_a_stopped_rank_is_given_up_after_the_timeout(tmp_path):
    script = tmp_path / "stopping.py"
    script.write_text(textwrap.dedent(_STOPPING_RANK))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(script),
               "prune", *SMALL, "--epochs", "3", "--runs-root", "runs"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=child_env(NNRELIEF_DIST_TIMEOUT="3"), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    after_stop = time.time() - float((tmp_path / "stopped-at").read_text())
    assert done.returncode != 0
    assert "[rank 0/2] stopped because another rank failed or did not answer" in done.stderr, done.stderr
    # the stopped worker ignores torchrun's SIGTERM: left to torchrun it would be killed only
    # after its 30 s --shutdown-timeout, and the job would end >= 33 s after the stop
    assert after_stop < 15, f"the job ended {after_stop:.1f} s after the stop"
