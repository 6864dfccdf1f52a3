"""Tests for scaleforge.training.checkpoint on one process: what a save writes, and what it refuses to commit."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from scaleforge.training import checkpoint
from scaleforge.training.checkpoint import (
    Checkpointer,
    DamagedCheckpoint,
    list_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    read_metadata,
    verify,
)


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
    with pytest.raises(DamagedCheckpoint, match=f"{shard} is not in its manifest.json"):
        verify(folder)
    (folder / shard).unlink()  # gone with its entry: the metadata still says it holds tensors
    with pytest.raises(DamagedCheckpoint, match=f"does not list {shard}, which hold its tensors"):
        verify(folder)


@pytest.mark.parametrize(
    "manifest",
    ['{"files": []}', '{"files": {"progress.json": 3}}', '{"files": {"../x": {"bytes": 1, "sha256": "0"}}}', "[1]"],
)
def test_a_manifest_of_the_wrong_shape_is_damage_not_a_crash(tmp_path: Path, manifest: str) -> None:
    model, optimizer = _model_and_optimizer()
    folder = Checkpointer(tmp_path, keep=1).save(model=model, optimizer=optimizer, progress={"step": 1})
    (folder / "manifest.json").write_text(manifest)
    with pytest.raises(DamagedCheckpoint, match="manifest.json (cannot be read|names '../x')"):
        verify(folder)


# ------------------------------------------------------------------------------------------------ crafted metadata


def _text(value: str) -> bytes:
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _call_by_global(module: str, name: str, argument: str) -> bytes:
    """`module.name(argument)` through the GLOBAL opcode (protocol 0), whose name pickle resolves dot by dot."""
    return f"c{module}\n{name}\n(V{argument}\ntR.".encode()


def _call_by_stack_global(module: str, name: str, argument: str) -> bytes:
    """The same call through STACK_GLOBAL (protocol 4 and later)."""
    return b"\x80\x04" + _text(module) + _text(name) + b"\x93(" + _text(argument) + b"tR."


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _payloads(marker: Path) -> dict[str, bytes]:
    """Every kind of crafted `.metadata`: each would create `marker` (or rewrite a class) if it ran."""
    from torch.distributed.checkpoint.metadata import Metadata

    touch = f"touch {marker}"
    payloads = {}
    for module in sorted({module for module, _ in checkpoint._MetadataUnpickler.ALLOWED}):
        payloads[f"GLOBAL {module}.os.system"] = _call_by_global(module, "os.system", touch)
        payloads[f"STACK_GLOBAL {module}.os.system"] = _call_by_stack_global(module, "os.system", touch)
    layout = "torch.serialization", "_get_layout.__globals__"  # an admitted function's attributes
    payloads["attribute of an admitted name"] = _call_by_stack_global(*layout, "os")
    payloads["REDUCE builtins.exec"] = _call_by_global("builtins", "exec", f"open('{marker}', 'w')")
    payloads["REDUCE builtins.eval"] = _call_by_stack_global("builtins", "eval", f"open('{marker}', 'w')")
    payloads["REDUCE posix.system"] = pickle.dumps(_Exploit(marker))
    payloads["nested in real metadata"] = pickle.dumps(Metadata(state_dict_metadata={"model.w": _Exploit(marker)}))
    # BUILD on an admitted class itself (not an instance): would set attributes of that class for the process
    metadata_class = _text("torch.distributed.checkpoint.metadata") + _text("Metadata") + b"\x93"
    payloads["BUILD on a class"] = b"\x80\x04" + metadata_class + b"N}" + _text("crafted") + b"K\x01s\x86b."
    member = _text("torch.distributed.checkpoint.metadata") + _text("_MEM_FORMAT_ENCODING") + b"\x93K\x00\x85R"
    payloads["BUILD on an enum's member"] = b"\x80\x04" + member + b"N}" + _text("crafted") + b"K\x01s\x86b."
    payloads["INST os.system"] = f"(V{touch}\nios\nsystem\n.".encode()
    payloads["OBJ os.system"] = f"(cos\nsystem\nV{touch}\no.".encode()
    call = _text("os") + _text("system") + b"\x93(" + _text(touch) + b"t}"
    payloads["NEWOBJ_EX os.system"] = b"\x80\x04" + call + b"\x92."
    payloads["EXT1"] = b"\x80\x02\x82\x01."
    payloads["PERSID"] = b"Pos.system\n."
    return payloads


@pytest.mark.parametrize("kind", list(_payloads(Path("marker"))))
def test_a_crafted_metadata_is_reported_damaged_and_never_runs(tmp_path: Path, kind: str) -> None:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata

    model, optimizer = _model_and_optimizer()
    saver = Checkpointer(tmp_path / "checkpoints", keep=2)
    good = saver.save(model=model, optimizer=optimizer, progress={"step": 1})
    crafted = saver.save(model=model, optimizer=optimizer, progress={"step": 2})
    marker = tmp_path / "pwned"
    (crafted / ".metadata").write_bytes(_payloads(marker)[kind])
    # whoever can rewrite the metadata can rewrite the manifest that lists it
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["files"][".metadata"] = {
        "bytes": (crafted / ".metadata").stat().st_size,
        "sha256": hashlib.sha256((crafted / ".metadata").read_bytes()).hexdigest(),
    }
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match="its metadata is refused"):
        verify(crafted)
    with pytest.warns(UserWarning, match=f"{crafted.name} is damaged and is skipped: its metadata is refused"):
        assert newest_good_checkpoint(tmp_path / "checkpoints") == good
    assert not marker.exists()
    assert not hasattr(Metadata, "crafted")
    assert not any(hasattr(member, "crafted") for member in _MEM_FORMAT_ENCODING)


def test_metadata_of_every_dtype_and_a_sharded_layout_is_read(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {name: torch.zeros(2, 3, dtype=dtype) for name, dtype in [("f", torch.float32), ("b", torch.bfloat16)]}
    state |= {"i": torch.arange(4), "h": torch.zeros(1, dtype=torch.float16), "flag": torch.ones(1, dtype=torch.bool)}
    state["extra"] = {"step": 3, "name": "x"}  # non-tensor values are kept as bytes entries
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    metadata = read_metadata(tmp_path)
    assert (
        metadata.state_dict_metadata.keys()
        == pickle.load((tmp_path / ".metadata").open("rb")).state_dict_metadata.keys()
    )


def test_a_crafted_value_in_a_shard_is_refused_and_never_runs(tmp_path: Path) -> None:
    import dataclasses
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from scaleforge.errors import UsageError

    model, optimizer = _model_and_optimizer()
    folder = Checkpointer(tmp_path / "checkpoints", keep=1).save(model=model, optimizer=optimizer, progress={"step": 1})
    metadata = read_metadata(folder)
    # a value DCP stores as bytes (the optimizer's hyperparameters), pointed at a pickle that runs a command
    index, where = next(
        (index, where)
        for index, where in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    )
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_Exploit(marker), payload)
    shard = folder / where.relative_path
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(where, offset=offset, length=len(payload.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))  # metadata of the admitted classes only
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in (".metadata", where.relative_path):
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    verify(folder)  # whoever rewrote the files rewrote the manifest too
    fresh, fresh_optimizer = _model_and_optimizer()
    with pytest.raises(UsageError, match=f"checkpoint {folder} cannot be loaded: .*Weights only load failed"):
        load_checkpoint(folder, model=fresh, optimizer=fresh_optimizer)
    assert not marker.exists()
