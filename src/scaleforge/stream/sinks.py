"""Where a stream's results go: `jsonl:FILE` (one line per processed frame), `video:FILE` (the frames with the
prediction drawn on them) or `none`. A sink is written from one thread, in frame order, and `close` flushes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from scaleforge.errors import UsageError
from scaleforge.extras import require
from scaleforge.stream.sources import Frame

VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "MJPG"}


class Sink(Protocol):
    """What the pipeline writes each processed frame's result to."""

    def write(self, frame: Frame, result: dict[str, Any]) -> None:
        """`result`: seq, captured_at, latency_ms, top_class, probability (and label, where classes are named)."""

    def close(self) -> None:
        """Flush and release."""


class NullSink:
    """Results are counted and timed, not kept."""

    def write(self, frame: Frame, result: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per line and frame, flushed every `flush_every` lines and at the end: a stream stopped by
    a signal leaves whole lines only."""

    def __init__(self, path: Path, flush_every: int = 32) -> None:
        try:
            self.file = path.open("w", encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--sink jsonl:{path}: cannot be written ({error.strerror})") from None
        self.flush_every = flush_every
        self.unflushed = 0

    def write(self, frame: Frame, result: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(result) + "\n")
            self.unflushed += 1
            if self.unflushed >= self.flush_every:
                self.file.flush()
                self.unflushed = 0
        except OSError as error:  # a full disk, say
            raise UsageError(f"--sink jsonl:{self.file.name}: writing failed ({error.strerror})") from None

    def close(self) -> None:
        self.file.close()


class VideoSink:
    """The processed frames, at the source's rate, with the top class and its probability drawn in the corner;
    the writer opens at the first frame's size (later frames of another size are resized to it)."""

    def __init__(self, path: Path, fps: float | None) -> None:
        require("stream", "writing video")
        if path.suffix.lower() not in VIDEO_CODECS:
            raise UsageError(f"--sink video:{path}: expected a file ending in {', '.join(VIDEO_CODECS)}")
        if not path.parent.is_dir():
            raise UsageError(f"--sink video:{path}: the folder {path.parent} does not exist")
        self.path, self.fps = path, fps or 30.0
        self.writer: Any = None
        self.size: tuple[int, int] | None = None

    def write(self, frame: Frame, result: dict[str, Any]) -> None:
        import cv2

        image = frame.image
        assert image is not None  # only decoded frames are processed
        if self.writer is None:
            self.size = (image.shape[1], image.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[self.path.suffix.lower()])
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                raise UsageError(f"--sink video:{self.path}: OpenCV cannot write this file")
        same_size = (image.shape[1], image.shape[0]) == self.size
        image = image.copy() if same_size else cv2.resize(image, self.size)  # drawn on: not the frame itself
        self.writer.write(_annotated(image, _caption(result)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def _caption(result: dict[str, Any]) -> str:
    name = result.get("label", result.get("top_class"))
    return f"{name} {result.get('probability', 0.0):.0%}"


def _annotated(image: np.ndarray, text: str) -> np.ndarray:
    """`text` drawn on `image` (in place), white on a dark band, sized to the frame."""
    import cv2

    scale = max(0.3, image.shape[0] / 480)
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(image, (0, 0), (width + 6, height + baseline + 6), (0, 0, 0), thickness=-1)
    cv2.putText(image, text, (3, height + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def open_sink(spec: str, fps: float | None) -> Sink:
    """The sink `spec` names: `jsonl:FILE`, `video:FILE` or `none`."""
    kind, _, target = spec.partition(":")
    if kind == "none" and not target:
        return NullSink()
    if kind == "jsonl" and target:
        return JsonlSink(Path(target))
    if kind == "video" and target:
        return VideoSink(Path(target), fps)
    raise UsageError(f"--sink {spec}: expected jsonl:FILE, video:FILE or none")
