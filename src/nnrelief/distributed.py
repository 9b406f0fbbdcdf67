"""Several processes, one experiment: torch.distributed plumbing for ``torchrun``.

``torchrun --nproc-per-node N -m nnrelief prune ...`` starts N processes with the
``env://`` variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init_from_env` joins them into one process group (gloo on CPU,
NCCL on CUDA, every collective bounded by a timeout); without those variables every
function here is a no-op for one process, so the library code calls them unconditionally.

The rules the rest of nnrelief follows in a run of several processes:

* Training: every torch.distributed call of training is in :mod:`nnrelief.training.parallel`
  (``DistributedDataParallel``, sums over ranks, BatchNorm statistics, the checkpoint read);
  each rank gets its part of every batch (:func:`shard_bounds`).
* Pruning: each rank streams its part of the pruning set, the statistics are summed,
  and the masks are compared by hash on all ranks before they are applied
  (:func:`check_same_on_all_ranks`).
* Files: rank 0 alone reads and writes the run folder; what it reads reaches the other
  ranks through :func:`from_main`, so the run folder need not be on a shared filesystem.
* Failures: :func:`failing_together` turns an error on one rank into an error on all of
  them, each saying which rank failed and why, instead of a hang; a rank that stopped
  answering is given up after ``$NNRELIEF_DIST_TIMEOUT`` seconds, and the job ends then.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedError",
    "TIMEOUT_ENV",
    "check_same_on_all_ranks",
    "env_rank",
    "env_world_size",
    "failing_together",
    "from_main",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "shard_bounds",
    "shutdown",
    "world_size",
]

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "NNRELIEF_DIST_TIMEOUT"
"""Environment variable: seconds a collective may wait for the other ranks (default 600)."""
_DEFAULT_TIMEOUT_S = 600.0
_FAILURE_KEY = "nnrelief/failure"
_inside_from_main = False  # rank 0 is running a from_main function (nested calls run directly)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks disagree (e.g. on the pruning masks)."""


# ----------------------------------------------------------------------------- who am I


def env_world_size() -> int:
    """Processes announced by the launcher (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as announced by the launcher (``RANK``; 0 without torchrun);
    known before :func:`init_from_env`."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes of the default group (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 outside one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the process that alone writes files and prints."""
    return rank() == 0


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text}")
    return datetime.timedelta(seconds=seconds)


# ----------------------------------------------------------------------------- start and stop


def init_from_env(device: str | torch.device = "auto") -> bool:
    """Join the process group described by the ``env://`` variables, if there is one.

    Does nothing (returns ``False``) when ``WORLD_SIZE`` is unset or 1, or when a group
    exists already. On CUDA (``device`` ``"auto"`` with CUDA available, or ``"cuda"``)
    the backend is NCCL (gloo for CPU tensors) and this process takes GPU
    ``LOCAL_RANK``; otherwise gloo.
    Collectives time out after ``$NNRELIEF_DIST_TIMEOUT`` seconds (default 600).
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    name = str(device)
    if name.startswith("cuda:"):
        raise ValueError(
            f"device {name!r} names one GPU, but each of the {env_world_size()} processes needs "
            "its own: use --device cuda (process k takes GPU LOCAL_RANK=k)"
        )
    cuda = torch.cuda.is_available() and name in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # NCCL for CUDA tensors; gloo still carries the odd CPU tensor (e.g. a count)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=_timeout())
    logger.info("process %d of %d joined (%s)", rank(), world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank_``'s contiguous part of ``n`` items.

    The parts of ranks 0..world-1 cover ``range(n)`` in order; their sizes differ by at
    most one. Defaults: this process's rank and the world size.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank_} of {world}")
    return rank_ * n // world, (rank_ + 1) * n // world


# ----------------------------------------------------------------------------- collectives


def _digest(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}:".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def check_same_on_all_ranks(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`DistributedError` on every rank unless ``tensors`` are bit-identical
    on all ranks (compared by an all-gathered SHA-256 of names, dtypes, shapes, values)."""
    if not is_distributed():
        return
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, _digest(tensors))
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for index, value in enumerate(digests):
            groups.setdefault(value, []).append(index)
        ranks_ = "; ".join(f"ranks {members} have {value[:12]}" for value, members in groups.items())
        raise DistributedError(
            f"the ranks computed different {what} ({ranks_}); they must see the same model "
            "and the same settings"
        )


def from_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on rank 0 only; every rank returns its result.

    Used for everything that reads (or checks) the run folder, which only rank 0 may
    touch. If ``fn`` raises on rank 0, the same exception is raised on every rank.
    The result is pickled (tensors included) and broadcast. Calls nest: inside ``fn``
    (on rank 0 alone) a further ``from_main`` just calls its function.
    """
    global _inside_from_main
    if not is_distributed() or _inside_from_main:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main():
        _inside_from_main = True
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, error)
        finally:
            _inside_from_main = False
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


# ----------------------------------------------------------------------------- failures


def _store() -> Any:
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    return get() if get is not None else None


def _announce(error: BaseException) -> None:
    """Leave this rank's error in the rendezvous store for the other ranks to report."""
    try:
        store = _store()
        if store is not None and not store.check([_FAILURE_KEY]):
            store.set(_FAILURE_KEY, f"rank {rank()} failed: {type(error).__name__}: {_first_line(error)}")
    except Exception:  # noqa: BLE001 - best effort: the store may be gone already
        logger.debug("could not announce the failure", exc_info=True)


def _announced() -> str | None:
    # The store lives in rank 0 (plain env://) or in torchrun's agent; asking a store that
    # died with its rank only prints a long C++ warning.
    if rank() != 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        store = _store()
        if store is not None and store.check([_FAILURE_KEY]):
            return store.get(_FAILURE_KEY).decode()
    except Exception:  # noqa: BLE001 - the store may have died with the failing rank
        logger.debug("could not read a failure announcement", exc_info=True)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _stopped_siblings() -> list[int]:
    """Process ids of the other workers of this machine's torchrun agent (the children of
    our parent) that are stopped (SIGSTOP: state ``T``); none outside torchrun or Linux."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return []
    parent, stopped = os.getppid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rpartition(")")[2].split()  # after "pid (name)": state, ppid, ...
        except OSError:
            continue
        if fields[:1] == ["T"] and int(fields[1]) == parent:
            stopped.append(int(entry))
    return stopped


def _end_stopped_siblings() -> None:
    """End the stopped workers that made this one time out, as torchrun would (SIGTERM),
    now rather than after torchrun's --shutdown-timeout (30 s): a stopped process acts on
    SIGTERM only once continued."""
    for pid in _stopped_siblings():
        logger.warning("ending process %d, a stopped worker of this torchrun", pid)
        try:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
        except OSError:  # gone meanwhile, or not ours
            logger.debug("could not end process %d", pid, exc_info=True)


def _is_collective_failure(error: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        needle in text for needle in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo")
    )


@contextmanager
def failing_together() -> Iterator[None]:
    """Make an error on one rank an error on all ranks, with the failing rank's reason.

    The failing rank leaves its message in the rendezvous store and exits the block;
    the others, waiting in a collective, see the connection close (gloo) or time out
    (``$NNRELIEF_DIST_TIMEOUT``, NCCL) and raise :class:`DistributedError` naming the
    failing rank and its message. A rank that timed out waiting also ends the workers of
    its torchrun that are stopped (SIGSTOP): they would ignore torchrun's SIGTERM and keep
    the job alive for torchrun's ``--shutdown-timeout`` (30 s) more. Outside a process group
    the block runs unchanged.
    """
    try:
        yield
    except Exception as error:
        if not is_distributed():
            raise
        if isinstance(error, DistributedError) or not _is_collective_failure(error):
            _announce(error)
            raise
        cause = _announced()
        if cause is None:
            _end_stopped_siblings()
        reason = f"{cause}" if cause else f"another rank failed or did not answer ({_first_line(error)})"
        raise DistributedError(f"stopped because {reason}") from error
