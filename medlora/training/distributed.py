"""torchrun support: who we are, and doing work once on rank 0 and sharing the result."""

import contextlib
import functools
import os

import torch

from medlora.errors import MedLoRAError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's GPU index on its node (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def init_distributed() -> None:
    """Start the process group early (the Trainer reuses it), so ranks can share prepared data."""
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def run_once_and_share(work):
    """Run work() on rank 0 only and give every rank its result.

    Validation and tokenization then happen once; a MedLoRAError on rank 0 is raised on every rank
    (instead of leaving the others waiting forever)."""
    if world_size() == 1:
        return work()
    import torch.distributed as dist

    init_distributed()
    payload = [None]
    if is_main_process():
        try:
            payload = [("ok", work())]
        except MedLoRAError as error:
            payload = [("error", str(error))]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise MedLoRAError(value)
    return value


@contextlib.contextmanager
def closing_process_group():
    """Close the process group when the work ends. Left open, gloo's threads can abort the process
    (SIGABRT) while Python shuts down. After success every rank first waits for the others, since
    rank 0 may still be saving; after an error the group is closed at once."""
    import torch.distributed as dist

    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stage_command(stage):
    """A stage's train function as the `fire` command: the process group closed at the end, and the
    return value not displayed (fire would print it)."""
    @functools.wraps(stage)
    def command(*args, **kwargs):
        with closing_process_group():
            stage(*args, **kwargs)

    return command
