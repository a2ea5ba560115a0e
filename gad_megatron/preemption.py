"""Stop cleanly when the scheduler asks: SIGUSR1 -> finish the step, checkpoint, exit 75.

slurm/'s batch scripts ask for ``--signal=B:USR1@120`` and forward the signal to every
training process; a stage that stops early exits with :data:`PREEMPTED_EXIT_CODE`, and the
batch script requeues the job, which resumes from the newest complete checkpoint.

Engine-agnostic: a trainer calls :func:`install` before its models load, then
:func:`should_stop` once per step, on every rank at the same point (it is a collective), and
if it says so saves a checkpoint, stops, and exits with :data:`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL ("try again later"); no failure of Python, torch or the CLI uses it.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNAL = signal.SIGUSR1

_requested = threading.Event()


def _handler(signum: int, frame: object) -> None:
    # Only set a flag: the step in flight (maybe inside a collective) must finish normally.
    _requested.set()


def install() -> None:
    """Catch :data:`STOP_SIGNAL` in this process. Call from the main thread (Python's rule)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, _handler)


def requested() -> bool:
    """Whether this process has received the signal."""
    return _requested.is_set()


def should_stop() -> bool:
    """Whether any process of the job received the signal: every rank gets the same answer.

    Ranks can receive the signal on either side of a step boundary; stopping on the local flag
    alone would leave one rank waiting in the next step's collectives for the others.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return requested()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(requested())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop = bool(flag.item())
    if stop:
        log.warning("stop requested (%s): checkpointing after this step, then exiting %d",
                    STOP_SIGNAL.name, PREEMPTED_EXIT_CODE)
    return stop
