"""Tests for scaleforge.train.checkpoint on one process: what a save writes, and what it refuses to commit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from scaleforge.train import checkpoint
from scaleforge.train.checkpoint import Checkpointer, DamagedCheckpoint, list_checkpoints, load_checkpoint, verify


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()  # so that the optimizer holds state
    return model, optimizer


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_the_manifest_lists_every_file_with_the_digest_of_what_is_on_disk(tmp_path: Path, use_async: bool) -> None:
    model, optimizer = _model_and_optimizer()
    with Checkpointer(tmp_path, keep=2, use_async=use_async).open() as saver:
        saver.save(model=model, optimizer=optimizer, progress={"step": 1})
    (folder,) = list_checkpoints(tmp_path)
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    assert listed.keys() == on_disk and {".metadata", "progress.json", "rng-0.json"} <= on_disk
    assert len([name for name in on_disk if name.endswith(".distcp")]) == checkpoint.WRITER_THREADS
    verify(folder)  # hashed as written, checked by reading back
    fresh, fresh_optimizer = _model_and_optimizer()
    for parameter in fresh.parameters():
        parameter.data.zero_()
    assert load_checkpoint(folder, model=fresh, optimizer=fresh_optimizer) == {"step": 1}
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)


def test_a_save_whose_writer_fails_commits_nothing_and_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = _model_and_optimizer()
    saver = Checkpointer(tmp_path, keep=1)
    saver.save(model=model, optimizer=optimizer, progress={"step": 1})
    write = checkpoint._HashingStream.write

    def full_disk(self: checkpoint._HashingStream, data: object) -> int:
        if threading.current_thread() is not threading.main_thread():  # DCP's second writer thread
            raise OSError(28, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(checkpoint._HashingStream, "write", full_disk)
    with pytest.raises(CheckpointException, match="were not written .* No space left on device"):
        saver.save(model=model, optimizer=optimizer, progress={"step": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    verify(tmp_path / "step-00000001")


def test_a_manifest_that_leaves_out_a_shard_is_refused(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    Checkpointer(tmp_path, keep=1).save(model=model, optimizer=optimizer, progress={"step": 1})
    (folder,) = list_checkpoints(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = next(name for name in manifest["files"] if name.endswith(".distcp"))
    del manifest["files"][shard]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match=f"does not list {shard}, which hold its tensors"):
        verify(folder)
