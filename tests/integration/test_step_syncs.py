"""The steps between two log lines hold no collective beyond the strategy's own and read nothing back to the host.

A script trains through `scaleforge.training.trainer.train` and counts, from the end of one log line to the start
of the next, every `torch.distributed` collective that scaleforge's own code calls (the strategy's are torch's:
DDP's gradient all-reduce, FSDP's gathers) and every call of scaleforge's that reads a tensor back to the host
(`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `float()`, `int()`, through a `TorchFunctionMode`).
The same counters around a window that holds a log line count that line's syncs, so they are shown to count.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(300)

SCRIPT = r"""
import functools, json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from scaleforge import load_config
from scaleforge.training.callbacks import Callback
from scaleforge.training.trainer import Trainer, train

import scaleforge

SOURCE = str(Path(scaleforge.__file__).parent)  # scaleforge's package: the code whose reads are counted
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"}
COLLECTIVES = [
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "barrier", "all_to_all", "send", "recv",
    "isend", "irecv", "monitored_barrier",
]


class Counts:
    def __init__(self):
        self.on = False
        self.reads, self.collectives = [], []


COUNTS = {"between": Counts(), "across": Counts()}


class HostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(SOURCE):
                for counts in COUNTS.values():
                    if counts.on:
                        counts.reads.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


def counted(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1)
        for counts in COUNTS.values():
            if counts.on and caller.f_code.co_filename.startswith(SOURCE):  # the strategy's own are torch's
                counts.collectives.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return function(*args, **kwargs)
    return wrapper


for name in COLLECTIVES:
    for module in (dist, dist.distributed_c10d):
        if hasattr(module, name):
            setattr(module, name, counted(name, getattr(module, name)))

MODE = HostReads()
MODE.__enter__()
FIRST, SECOND = 10, 20
log = Trainer.log


def logged(self):
    step = self.state.step
    if step == SECOND:
        COUNTS["between"].on = False  # the window ends where the next log line starts
    result = log(self)
    if step == FIRST:
        COUNTS["between"].on = COUNTS["across"].on = True  # from the end of one log line
    if step == SECOND:
        COUNTS["across"].on = False  # the other window holds the log line of step 20 whole
    return result


Trainer.log = logged
config = load_config(None, sys.argv[2:])
train(config, Path(sys.argv[1]))
rank = int(os.environ.get("RANK", "0"))  # the process group is gone once train() returns
out = {key: {"reads": c.reads, "collectives": c.collectives} for key, c in COUNTS.items()}
Path(sys.argv[1]).with_name(f"counts-{rank}.json").write_text(json.dumps(out))
"""

CONFIG = [
    "data.dataset=synthetic",
    "data.num_samples=4000",  # one epoch holds every step: no evaluation between the log lines
    "training.batch_size=32",
    "training.max_steps=40",
    "training.optimizer=sgd",  # torch's Adam reads its step counters (kept on the CPU on a GPU) with .item()
    "training.scheduler=cosine",
    "logging.every_steps=10",
    "logging.progress=plain",
    "checkpoint.every_steps=0",
    "hardware.threads=1",
]


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_steps_between_log_lines_hold_no_collective_and_read_nothing_back(tmp_path: Path, nproc: int) -> None:
    script = tmp_path / "count_syncs.py"
    script.write_text(SCRIPT)
    if nproc == 1:
        command = [sys.executable, str(script)]
        overrides = CONFIG
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        assert torchrun is not None
        command = [torchrun, "--standalone", "--nproc-per-node", "2", str(script)]
        overrides = [*CONFIG, "parallel.strategy=ddp"]
    result = subprocess.run(
        [*command, str(tmp_path / "run"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(nproc):
        counts = json.loads((tmp_path / f"counts-{rank}.json").read_text())
        assert counts["between"] == {"reads": [], "collectives": []}, counts["between"]
        # the window with a log line in it sees that line's reduction and its one read back (the counters count)
        assert counts["across"]["reads"], counts["across"]
        assert len(counts["across"]["collectives"]) == (0 if nproc == 1 else 2), json.dumps(counts["across"], indent=1)
