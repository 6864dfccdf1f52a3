"""The completions' engine loop (scaleforge.serve.completions), without HTTP: the engine stepped on its own thread,
a step that outlives the hang timeout refusing new sequences until it ends, a model error told to its sequences,
the waiting bound, and closing once every admitted sequence has ended."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from scaleforge.generation.engine import Engine, Output
from scaleforge.generation.sampling import SamplingOptions
from scaleforge.serve.batching import Closed, ModelHung, QueueFull
from scaleforge.serve.completions import EngineLoop

OPTIONS = SamplingOptions(max_new_tokens=3, temperature=0)


class Held:
    """A slot model whose prefill waits for `release` (and raises once `fail` is set); token 1 every time."""

    def __init__(self) -> None:
        self.slots, self.context = 1, None
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail = False

    def _logits(self) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("out of memory")
        return torch.tensor([0.0, 1.0])

    def prefill(self, slot: int, tokens: Sequence[int], first: bool) -> torch.Tensor:
        self.entered.set()
        self.release.wait(timeout=10)
        return self._logits()

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        return self._logits()[None].repeat(len(slots), 1)


def wait_for(condition, within_s: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.005)


def test_a_step_past_the_hang_timeout_refuses_new_sequences_until_it_ends() -> None:
    model = Held()
    loop = EngineLoop(Engine(model, [b"a", b"b"], 8), max_waiting=1, timeout_s=60, hung_after_s=0.05)
    loop.start()
    outputs: list[Output | Exception] = []
    loop.submit([0], OPTIONS, outputs.append)
    assert model.entered.wait(timeout=10)
    loop.submit([0], OPTIONS, outputs.append)  # waits for the slot
    with pytest.raises(QueueFull, match="1 sequences are waiting already"):
        loop.admit(1)
    time.sleep(0.1)
    assert loop.hung
    with pytest.raises(ModelHung, match="--batch-timeout-s"):
        loop.admit(1)
    model.release.set()
    wait_for(lambda: loop.engine.idle and not loop.waiting)
    assert not loop.hung and [o.text for o in outputs if isinstance(o, Output)] == ["b"] * 6

    model.fail = True
    failed: list[Output | Exception] = []
    loop.submit([0], OPTIONS, failed.append)
    wait_for(lambda: bool(failed))
    assert isinstance(failed[0], RuntimeError) and loop.engine.idle  # told, and the loop goes on
    asyncio.run(loop.close())
    with pytest.raises(Closed):
        loop.admit(1)
