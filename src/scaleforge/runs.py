"""The finished run directory: the contract between training and everything after it.

`final/` holds `model.safetensors`, `config.yaml`, `data_info.json` and `manifest.json` (the size and SHA-256 of
each other file); a language model trained on text also holds `tokenizer.json`, the tokenizer of its data. A
compressed run also holds `compression.json`, whose `format` says how its tensors map onto the model the config
builds: `state_dict`, or a format whose loader `registry.FORMATS` holds (the int8 ones, from
`scaleforge.compress.quantize`). `final/` is written under a temporary name, fsynced, and renamed into place, so a
run whose `final/` exists finished; it is checked against its manifest each time it is opened.

A run directory opened here is data: its config names components, and only what scaleforge registers and what
installed plugins add can be built from it. A config's `imports:` and `module:Attr` names run code, and are refused
unless the opener trusts the run (`Trust.code`: `--trust-code`, `trust_code=True`). A manifest detects damage, not
tampering: whoever can rewrite a file can rewrite its manifest. With a signing key (`Trust.signing_key_env`,
`checkpoint.signing_key_env` for the runs training writes) each manifest carries an HMAC-SHA256 of its entries, and
a run without the right one is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleforge import registry
from scaleforge.config import RunConfig, dump_yaml, load_config
from scaleforge.data.base import DataInfo
from scaleforge.data.tokenizers import Tokenizer, bytes_tokenizer, load_tokenizer
from scaleforge.errors import DataError, UsageError, first_line, one_of
from scaleforge.files import sha256_of

FINAL_FILES = ("model.safetensors", "config.yaml", "data_info.json")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"  # a text run's tokenizer, beside FINAL_FILES
COMPRESSION = "compression.json"
STATE_DICT = "state_dict"  # the format of a trained run's weights, and of a compressed run's that are float
INT8_FORMATS = ("dynamic-int8", "static-int8", "qat-int8")  # compression.json formats whose weights are int8
SIGNATURE = "hmac_sha256"  # the manifest's key for its signature
TRUST_FLAG = "--trust-code (trust_code=True in load_run)"
# Files hashed at once when a folder is checked, and written at once by each process of a checkpoint: the reads (or
# writes) and the hashing then run in parallel.
HASH_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


@dataclass(frozen=True)
class Trust:
    """What opening a run directory may do beyond reading its files as data."""

    code: bool = False  # import the modules its config names and build its `module:Attr` components
    signing_key_env: str | None = None  # refuse it unless its manifest is signed with the key in this variable


UNTRUSTED = Trust()  # a run directory named by the user
TRUSTED = Trust(code=True)  # for the runs a command created itself (search trials, benchmark runs)


@dataclass(frozen=True)
class LoadedRun:
    """A trained model with the config it was trained from, its dataset's description and, for a language model,
    the tokenizer of its text (None for token ids alone)."""

    config: RunConfig
    model: nn.Module
    info: DataInfo
    tokenizer: Tokenizer | None = None


def find_final(path: str | Path) -> Path:
    """The `final/` folder of a run directory (or the folder itself if it is one)."""
    path = Path(path)
    final = path / "final" if (path / "final").is_dir() else path
    missing = [name for name in FINAL_FILES if not (final / name).is_file()]
    if missing:
        raise UsageError(f"{path} is not a finished run: {', '.join(missing)} missing in {final}")
    return final


def signing_key(variable: str | None, setting: str) -> bytes | None:
    """The key held by environment variable `variable` (None: manifests are not signed); `setting` names where
    the variable was given, for the error when it holds no key."""
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise UsageError(f"{setting} {variable}: that environment variable is unset or empty")
    return key.encode()


def run_signing_key(config: RunConfig) -> bytes | None:
    """The key a run's checkpoints and `final/` are signed with: `checkpoint.signing_key_env`'s."""
    return signing_key(config.checkpoint.signing_key_env, "checkpoint.signing_key_env")


def sign(files: dict[str, Any], key: bytes) -> str:
    """The HMAC-SHA256 of a manifest's entries (names, sizes and digests), in a canonical JSON form."""
    return hmac.new(key, json.dumps(files, sort_keys=True, separators=(",", ":")).encode(), "sha256").hexdigest()


def signature_problem(manifest: dict[str, Any], key: bytes | None) -> str | None:
    """Why `manifest` is not signed with `key` (None when it is, or when no key is asked for)."""
    if key is None:
        return None
    signature = manifest.get(SIGNATURE)
    if not isinstance(signature, str):
        return "its manifest is not signed"
    if not hmac.compare_digest(signature, sign(manifest["files"], key)):
        return "its manifest's signature does not match the signing key"
    return None


def write_durably(path: Path, data: bytes) -> dict[str, Any]:
    """Write `path` under a temporary name, fsync it, rename it into place; returns its manifest entry."""
    temporary = path.with_name(path.name + ".part")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temporary.rename(path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fsync_dir(path: Path) -> None:
    """Make the names in folder `path` (files created or renamed there) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(final: Path, key: bytes | None = None, files: dict[str, Any] | None = None) -> None:
    """`final/manifest.json`: the size and SHA-256 of every other file of `final/` (`files`, where the writer
    has them already; else read here), signed with `key` if given, written durably and last."""
    if files is None:
        files = {
            path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
            for path in final.iterdir()
            if path.is_file() and path.name != MANIFEST
        }
    manifest: dict[str, Any] = {"files": dict(sorted(files.items()))}
    if key is not None:
        manifest[SIGNATURE] = sign(manifest["files"], key)
    write_durably(final / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def save_final(
    final: Path,
    state_dict: dict[str, torch.Tensor],
    config: RunConfig,
    info: DataInfo,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Write `final/` atomically: the full state dict as safetensors, the resolved config, the dataset's
    description, its `tokenizer` (if it has one), `extra` files (name: contents) and their manifest (signed with
    `checkpoint.signing_key_env`'s key), each file fsynced, in a folder renamed into place once complete. A
    process killed on the way leaves `final.partial/`, never a `final/`; an earlier `final/` at the same place is
    replaced only by a complete one."""
    from safetensors.torch import save

    key = run_signing_key(config)
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # what a killed earlier attempt left
    staging.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses shared storage (tied weights): such names get their own copy.
        tensors[name] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    contents = {
        "model.safetensors": save(tensors),
        "config.yaml": dump_yaml(config).encode(),
        "data_info.json": (json.dumps(info.to_json(), indent=2) + "\n").encode(),
    }
    if tokenizer is not None:
        contents[TOKENIZER] = tokenizer.to_json().encode()
    contents.update(extra or {})
    files = {name: write_durably(staging / name, data) for name, data in contents.items()}
    write_manifest(staging, key, files)
    fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    fsync_dir(final.parent)


class ManifestMismatch(Exception):
    """A folder whose files do not match its manifest (`signature`: or whose manifest lacks the signature asked
    for); the message says what is wrong."""

    def __init__(self, problem: str, *, signature: bool = False) -> None:
        super().__init__(problem)
        self.signature = signature


def check_manifest(folder: Path, key: bytes | None = None) -> dict[str, Any]:
    """Every file of `folder` against its `manifest.json`: each one there, of its size and SHA-256, and no file
    beside those it lists; its signature too when a `key` is given. Returns its entries; `ManifestMismatch`
    says what is wrong. The one check of checkpoints and `final/` alike."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestMismatch(f"it has no {MANIFEST} (its write did not finish)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
        problem = signature_problem(manifest, key)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ManifestMismatch(f"its {MANIFEST} cannot be read ({type(error).__name__}: {error})") from error
    if problem is not None:
        raise ManifestMismatch(problem, signature=True)
    outside = sorted(name for name in expected if not name or Path(name).name != name or name == MANIFEST)
    if outside:
        raise ManifestMismatch(f"its {MANIFEST} names {outside[0]!r}, which is not a file of the folder")
    unlisted = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in expected)
    if unlisted:
        raise ManifestMismatch(f"{', '.join(unlisted)} {'is' if len(unlisted) == 1 else 'are'} not in its {MANIFEST}")
    for name, (size, _) in expected.items():
        file = folder / name
        if not file.is_file():
            raise ManifestMismatch(f"{name} is missing")
        if file.stat().st_size != size:
            raise ManifestMismatch(f"{name} has {file.stat().st_size} bytes, not {size}")
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        digests = dict(zip(expected, pool.map(sha256_of, [folder / name for name in expected]), strict=True))
    for name, (_, digest) in expected.items():
        if digests[name] != digest:
            raise ManifestMismatch(f"{name} does not match its SHA-256 in {MANIFEST}")
    listed: dict[str, Any] = files
    return listed


def verify_final(path: str | Path, signing_key_env: str | None = None) -> Path:
    """`find_final`, checked against its manifest (`check_manifest`), and its signature when `signing_key_env`
    names a key; a `UsageError` names what does not match."""
    final = find_final(path)
    key = signing_key(signing_key_env, "--signing-key-env")
    try:
        check_manifest(final, key)
    except ManifestMismatch as error:
        raise UsageError(f"{final} is {'refused' if error.signature else 'damaged'}: {error}") from error
    return final


def compression_of(final: Path) -> dict[str, Any] | None:
    """`final/compression.json` of a compressed run (None for a trained one)."""
    path = final / COMPRESSION
    if not path.is_file():
        return None
    try:
        description: dict[str, Any] = json.loads(path.read_text())
        return description
    except ValueError as error:
        raise UsageError(f"{path} is damaged: {error}") from error


def load_description(path: str | Path, trust: Trust = UNTRUSTED) -> tuple[RunConfig, DataInfo]:
    """A finished run's config and its dataset's description, without its weights; `final/` checked first."""
    return _describe(verify_final(path, trust.signing_key_env), trust)


def run_config(final: Path, trust: Trust, overrides: Sequence[str] = ()) -> RunConfig:
    """`final/config.yaml` of a checked `final/` folder, with `overrides`: without `trust.code`, its components
    resolve only to registered ones, and `imports:` and `module:Attr` names are refused. What a run's file says of
    trust is never taken: a distillation loss trusts its teacher's code only when the opener trusts the run, and
    the run's own checkpoints and `final/` are signed with the opener's key, not one its file names."""
    if trust.code:
        config = load_config(final / "config.yaml", overrides)
    else:
        with registry.untrusted(f"the run {final.parent}", TRUST_FLAG):
            config = load_config(final / "config.yaml", overrides)
    loss = config.training.loss
    if loss.params.get("trust_teacher_code") and not trust.code:
        loss = dataclasses.replace(loss, params={**loss.params, "trust_teacher_code": False})
    checkpoint = dataclasses.replace(config.checkpoint, signing_key_env=trust.signing_key_env)
    return dataclasses.replace(config, training=dataclasses.replace(config.training, loss=loss), checkpoint=checkpoint)


def _describe(final: Path, trust: Trust) -> tuple[RunConfig, DataInfo]:
    config = run_config(final, trust)
    try:
        info = DataInfo.from_json(json.loads((final / "data_info.json").read_text()))
    except (ValueError, TypeError) as error:
        raise UsageError(f"{final / 'data_info.json'} is damaged: {error}") from error
    return config, info


def load_run(path: str | Path, *, trust_code: bool = False, signing_key_env: str | None = None) -> LoadedRun:
    """Rebuild a run's model from `final/config.yaml` and load `final/model.safetensors` into it (no pickle); a
    compressed run's model is rebuilt in its compressed form (`compression.json`). `final/` is checked against its
    manifest (and its signature, with `signing_key_env`); the run's own code (`imports:`, `module:Attr`
    components) runs only with `trust_code`."""
    return open_run(path, Trust(trust_code, signing_key_env))


def open_run(path: str | Path, trust: Trust) -> LoadedRun:
    """`load_run` with its trust as one value."""
    from scaleforge.components import build_model

    final = verify_final(path, trust.signing_key_env)
    config, info = _describe(final, trust)
    model = build_model(config.model, info)
    fmt = (compression_of(final) or {}).get("format", STATE_DICT)
    file = final / "model.safetensors"
    if not isinstance(fmt, str):
        raise UsageError(f"{final / COMPRESSION} is damaged: its format is {fmt!r}, not a name")
    if fmt == STATE_DICT:
        load_weights(model, file)
    elif fmt in registry.FORMATS:  # a registered name only: a run's file never names code to import
        model = registry.FORMATS.get(fmt)(model, file, info)
    else:
        raise UsageError(
            f"{final / COMPRESSION} names the format '{fmt}', which no installed component loads; "
            f"{one_of([STATE_DICT, *registry.FORMATS.names()])}"
        )
    model.eval()
    return LoadedRun(config=config, model=model, info=info, tokenizer=run_tokenizer(final, config, info))


def run_tokenizer(final: Path, config: RunConfig, info: DataInfo) -> Tokenizer | None:
    """The tokenizer of a checked `final/`: its `tokenizer.json`; the bytes tokenizer for a run of the `text`
    dataset from before runs saved theirs; None when the model takes token ids alone (or is not a language model).
    `DataError` naming the file when it has more tokens than the model's `vocab_size`."""
    path = final / TOKENIZER
    if path.is_file():
        return load_tokenizer(path, info.vocab_size)
    if info.tokenizer != "bytes":
        raise DataError(f"{path} is missing: the run was trained with the {info.tokenizer} tokenizer")
    if config.data.dataset == "text" and info.vocab_size == bytes_tokenizer().vocab_size:
        return bytes_tokenizer()
    return None


def example_inputs(info: DataInfo, rows: int, seed: int = 0) -> torch.Tensor:
    """A batch of `rows` inputs shaped as the model takes them (token ids for a language model)."""
    generator = torch.Generator().manual_seed(seed)
    if info.task == "language_modeling":
        return torch.randint(info.vocab_size or 2, (rows, info.seq_len or 1), generator=generator)
    return torch.randn(rows, *info.input_shape, generator=generator)


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; `UsageError` when it cannot be read as one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{file} does not hold this model's weights: {first_line(error)}") from error


def load_weights(model: nn.Module, file: Path) -> None:
    """Load a safetensors file into `model` (every tensor, under the model's names); `UsageError` otherwise."""
    state = read_weights(file)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{file} does not hold this model's weights: {first_line(error)}") from error
