"""A run directory is data: opening one never runs its code unless the user says so, `final/` is checked against its
manifest every time, it is written atomically, and signed manifests are refused without the right key."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleforge import load_config, load_run
from scaleforge.errors import ConfigError, UsageError
from scaleforge.runs import write_manifest
from scaleforge.training.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
QUICK += ["training.max_steps=3", "hardware.threads=1"]

# A user's model whose module, when imported, leaves a file beside itself: the proof that its code ran.
USER_MODULE = """
from pathlib import Path
from torch import nn
from scaleforge.registry import register_model

(Path(__file__).parent / "code-ran").touch()

@register_model("trusted_net")
class TrustedNet(nn.Module):
    def __init__(self, input_shape, num_classes, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)
"""
SELECTIONS = {
    "imports": ["imports=[user_code]", "model.architecture=trusted_net"],
    "module-path": ["model.architecture=user_code:TrustedNet"],
}


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run for each way a config names code, trained from the user's own config (the user's own act)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "user_code.py").write_text(USER_MODULE)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        for name, selection in SELECTIONS.items():
            train(load_config(None, [*selection, *QUICK]), folder / name)
            runs[name] = folder / name
    sys.modules.pop("user_code", None)
    return runs


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`scaleforge ARGS` in a fresh interpreter whose working directory (and so import path) holds the module."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "scaleforge", *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize(
    "command",
    [
        "serve",
        "eval",
        "export",
        "compress",
        "stream",
        "bench-serve",
        "bench-compress",
        "bench-stream",
        "bench-generate",
    ],
)
def test_a_run_that_names_code_is_refused_without_trust(user_runs: dict[str, Path], selection: str, command: str):
    run = user_runs[selection]
    marker = run.parent / "code-ran"
    marker.unlink(missing_ok=True)
    extra = {"serve": ["--port", "0"], "stream": ["--source", "synthetic:8x8", "--duration", "1"]}.get(command, [])
    extra = ["--format", "onnx"] if command == "export" else extra
    if command == "compress":
        extra = ["--method", "dynamic-int8", "--out", str(run.parent / f"{selection}-int8")]
    extra = ["--out", str(run.parent / f"{selection}-bench")] if command.startswith("bench") else extra
    result = run_cli(*command.split("-"), str(run), *extra, cwd=run.parent)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    named = "import 'user_code'" if selection == "imports" else "'user_code:TrustedNet'"
    assert f"the run {run} names code to run ({named})" in line
    assert "--trust-code" in line
    assert not marker.exists()


def test_load_run_refuses_code_unless_trusted(user_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    run = user_runs["imports"]
    monkeypatch.syspath_prepend(str(run.parent))
    marker = run.parent / "code-ran"
    marker.unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"imports: the run .* names code to run \(import 'user_code'\).*trust_code"):
        load_run(run)
    assert not marker.exists()
    loaded = load_run(run, trust_code=True)
    assert marker.exists()
    assert type(loaded.model).__name__ == "TrustedNet"
    sys.modules.pop("user_code", None)


def test_a_trusted_run_is_served_evaluated_and_exported(user_runs: dict[str, Path]) -> None:
    run = user_runs["module-path"]
    evaluated = run_cli("eval", str(run), "--trust-code", cwd=run.parent)
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.search(r"val_accuracy: \d", evaluated.stdout)
    exported = run_cli("export", str(run), "--format", "onnx", "--trust-code", cwd=run.parent)
    assert exported.returncode == 0, exported.stderr
    assert (run / "exported" / "model.onnx").is_file()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "scaleforge", "serve", str(run), "--port", "0", "--trust-code"]
    process = subprocess.Popen(command, cwd=run.parent, env=environment, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert found, banner
        import httpx

        answer = httpx.post(f"{found[0]}/v1/predict", json={"inputs": [[[[0.0] * 8] * 8]]}, timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_a_final_folder_that_does_not_match_its_manifest_is_refused(user_runs: dict[str, Path], tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(user_runs["imports"], run)
    weights = run / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    for command in (["eval"], ["export", "--format", "onnx"], ["serve"]):
        result = run_cli(command[0], str(run), *command[1:], "--trust-code", cwd=user_runs["imports"].parent)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"usage error: {run}/final is damaged: model.safetensors does not match its SHA-256 in manifest.json"
        )
    with pytest.raises(UsageError, match="model.safetensors does not match its SHA-256"):
        load_run(run, trust_code=True)
    (run / "final" / "extra.json").write_text("{}")  # a file the manifest does not list
    write_manifest(run / "final")
    (run / "final" / "compression.json").write_text('{"format": "dynamic-int8"}')
    with pytest.raises(UsageError, match="compression.json is not in its manifest.json"):
        load_run(run, trust_code=True)


def test_signed_runs_need_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUN_KEY", "a secret")
    run = tmp_path / "signed"
    train(load_config(None, [*QUICK, "checkpoint.signing_key_env=RUN_KEY", "checkpoint.every_steps=2"]), run)
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    assert len(manifest["hmac_sha256"]) == 64
    load_run(run, signing_key_env="RUN_KEY")
    monkeypatch.setenv("OTHER_KEY", "another secret")
    with pytest.raises(UsageError, match="signature does not match the signing key"):
        load_run(run, signing_key_env="OTHER_KEY")
    with pytest.raises(UsageError, match="--signing-key-env UNSET_KEY: that environment variable is unset or empty"):
        load_run(run, signing_key_env="UNSET_KEY")
    unsigned = tmp_path / "unsigned"
    train(load_config(None, QUICK), unsigned)
    with pytest.raises(UsageError, match="is refused: its manifest is not signed"):
        load_run(unsigned, signing_key_env="RUN_KEY")
    # a checkpoint signed with another key is passed over on resume, as a damaged one is
    from scaleforge.training.checkpoint import list_checkpoints, newest_good_checkpoint

    (checkpoint,) = list_checkpoints(run / "checkpoints")
    assert newest_good_checkpoint(run / "checkpoints", signing_key=b"a secret") == checkpoint
    with pytest.warns(UserWarning, match="signature does not match the signing key"):
        assert newest_good_checkpoint(run / "checkpoints", signing_key=b"another secret") is None
    with pytest.warns(UserWarning, match="its manifest is not signed"):
        train_dir = tmp_path / "resumed"
        train(load_config(None, [*QUICK, "checkpoint.every_steps=2"]), train_dir)  # unsigned checkpoints
        assert newest_good_checkpoint(train_dir / "checkpoints", signing_key=b"a secret") is None


# Imported by a run that is to pause while it writes final/: once the manifest of the folder being written is
# about to be written, it says so in a file and sleeps, so that the test can kill it there.
PAUSE_IN_FINAL = """
import time
from pathlib import Path
import scaleforge.runs as runs

write_manifest = runs.write_manifest

def pausing_write_manifest(final, *args):
    if final.name == "final.partial":
        (final.parent / "paused-in-final").touch()
        time.sleep(600)
    return write_manifest(final, *args)

runs.write_manifest = pausing_write_manifest
"""


def test_a_run_killed_while_it_writes_final_resumes_and_finishes(tmp_path: Path) -> None:
    (tmp_path / "pause_in_final.py").write_text(PAUSE_IN_FINAL)
    run = tmp_path / "run"
    overrides = [*QUICK, "training.max_steps=6", "checkpoint.every_steps=3", "model.hidden_layers=[16]"]
    paused = [*overrides, "imports=[pause_in_final]"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "scaleforge", "train", *paused, "--run-dir", str(run)]
    process = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (run / "paused-in-final").exists():
            assert process.poll() is None, "the run ended before it wrote final/"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (run / "final").exists()  # the partial folder never counts as a finished run
    assert (run / "final.partial" / "model.safetensors").is_file()
    resumed = run_cli("train", *overrides, "--run-dir", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 6" in resumed.stdout
    assert not (run / "final.partial").exists()
    reference = tmp_path / "reference"
    train(load_config(None, overrides), reference)
    written, expected = (
        load_file(str(run / "final" / "model.safetensors")),
        load_file(str(reference / "final" / "model.safetensors")),
    )
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], expected[name]) for name in written)
    load_run(run)  # verified against its manifest


def test_what_a_runs_file_says_of_trust_is_never_taken(user_runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from scaleforge.runs import Trust, run_config

    run = tmp_path / "student"
    shutil.copytree(user_runs["imports"], run)
    config = run / "final" / "config.yaml"
    text = config.read_text().replace("imports: [user_code]\n", "imports: []\n")
    text = text.replace("model: {architecture: trusted_net, width: 8}", "model: {architecture: mlp}")
    teacher = {"name": "distillation", "teacher": str(user_runs["imports"]), "trust_teacher_code": True}
    text = text.replace("  loss: auto\n", f"  loss: {json.dumps(teacher)}\n")
    config.write_text(text.replace("signing_key_env: null", "signing_key_env: HOME"))
    write_manifest(run / "final")
    untrusted = run_config(run / "final", Trust())
    assert untrusted.training.loss.params["trust_teacher_code"] is False  # the teacher's code stays refused
    assert untrusted.checkpoint.signing_key_env is None  # the opener's key, not a variable the file names
    trusted = run_config(run / "final", Trust(code=True, signing_key_env="RUN_KEY"))
    assert trusted.training.loss.params["trust_teacher_code"] is True
    assert trusted.checkpoint.signing_key_env == "RUN_KEY"


def test_init_from_a_damaged_run_is_refused(user_runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "source"
    shutil.copytree(user_runs["imports"], source)
    weights = source / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    config = load_config(None, [*QUICK, f"training.init_from={source}"])
    with pytest.raises(ConfigError, match="training.init_from: .* model.safetensors does not match its SHA-256"):
        train(config, tmp_path / "run")
