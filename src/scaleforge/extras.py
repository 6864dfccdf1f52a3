"""The optional parts of the install (pyproject.toml's extras) and the check that a command's part is there.

`pip install scaleforge` holds what training needs; serving, ONNX export and int8 quantization, video streams,
search and the benchmarks' baselines each come with an extra. A command whose extra is missing says so in one line
(`require`) before any work, instead of failing on an import halfway through.
"""

from __future__ import annotations

import importlib.util

from scaleforge.errors import UsageError

# Each extra and the modules whose absence means it is not installed (the import names of the packages a command
# cannot run without; optional speed-ups such as uvloop are left out).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "orjson", "python_multipart"),
    "export": ("onnx", "onnxscript", "onnxruntime", "torchao"),
    "stream": ("cv2",),
    "search": ("optuna",),
    "data": ("datasets", "tokenizers", "boto3"),
    "federated": ("flwr", "ray"),
    "bench": ("aiohttp",),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, command: str) -> None:
    """Raise `UsageError` naming the extra to install when a module of `extra` is missing."""
    absent = missing(extra)
    if absent:
        raise UsageError(
            f"{command} needs the [{extra}] extra: pip install 'scaleforge[{extra}]' (missing: {', '.join(absent)})"
        )
