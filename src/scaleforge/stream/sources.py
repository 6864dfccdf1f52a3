"""Where a stream's frames come from: a video file or a camera (OpenCV, headless), a folder of images, or
`synthetic:WxH` (generated moving frames at a set rate, for tests and benchmarks).

A source is read from one thread, frame after frame, by `read()`; it returns `None` at its end. Every frame
carries its sequence number and capture time. A frame that cannot be decoded is returned with `image=None` and
the reason, so that the pipeline counts it and goes on. A source that cannot be opened at all is a `UsageError`
that names it.
"""

from __future__ import annotations

import collections
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from scaleforge.errors import UsageError
from scaleforge.extras import require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SYNTHETIC_FPS = 30.0  # a synthetic source's rate when --fps is not given
MAX_FAILED_READS = 25  # a video file's reads failing in a row before it is taken to have ended


@dataclass
class Frame:
    """One frame: `image` is (H, W, 3) uint8 in OpenCV's BGR order, or None when it could not be decoded
    (`error` says why). `captured` is `time.perf_counter()` when it was read, `wall` the same moment as Unix
    time."""

    seq: int
    captured: float
    wall: float
    image: np.ndarray | None
    error: str | None = None


class Source(Protocol):
    """What the pipeline reads frames from."""

    name: str
    live: bool  # frames come at the source's own pace, whether or not they are read (a camera, synthetic)
    fps: float | None  # its rate, where it has one

    def read(self) -> Frame | None:
        """The next frame, waiting for it if the source is paced; None at the end."""

    def close(self) -> None:
        """Release what the source holds."""


def _cv2():  # noqa: ANN202 - the cv2 module, imported when a source needs it
    # FFmpeg's own log lines for a damaged frame too (read when OpenCV opens its first video)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    require("stream", "reading video")
    import cv2
    import cv2.utils.logging

    # a frame that cannot be decoded is counted and reported by the pipeline, not logged by OpenCV as well
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


class _Clock:
    """Paces frames at `fps`: frame k is due `k / fps` after the first; a reader that falls behind is not made
    to catch up by bursts (a live source's frames are gone when they are not read in time)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.next_due: float | None = None

    def wait(self) -> None:
        now = time.perf_counter()
        if self.next_due is None:
            self.next_due = now
        elif now < self.next_due:
            time.sleep(self.next_due - now)
            now = self.next_due
        self.next_due = max(self.next_due + self.period, now)


class SyntheticSource:
    """Generated frames of `width` x `height` at `fps`, forever: a bright square moving across a gradient, one
    step each frame (so consecutive frames differ and every `period`-th repeats)."""

    live = True

    def __init__(self, width: int, height: int, fps: float) -> None:
        self.name = f"synthetic:{width}x{height}"
        self.fps = fps
        self.width, self.height = width, height
        rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
        background = np.stack([rows + 0 * columns, (rows + columns) / 2, 0 * rows + columns], axis=-1)
        self.background = background.astype(np.uint8)  # (H, W, 3)
        self.side = max(1, min(width, height) // 4)
        self.period = max(1, width - self.side)  # frames before the square's path repeats
        self.seq = 0
        self.clock = _Clock(fps)

    def read(self) -> Frame | None:
        self.clock.wait()
        frame = self.background.copy()
        left = self.seq % self.period
        top = (self.height - self.side) // 2
        frame[top : top + self.side, left : left + self.side] = 255
        captured = time.perf_counter()
        self.seq += 1
        return Frame(self.seq - 1, captured, time.time(), frame)

    def close(self) -> None:
        pass


class VideoSource:
    """A video file, or a camera by its index, through OpenCV's `VideoCapture`. A file is read as fast as the
    pipeline takes its frames (or at `fps` when given, as if live); a camera at its own rate."""

    def __init__(self, spec: str, fps: float | None) -> None:
        cv2 = _cv2()
        self.name = spec
        self.live = spec.isdigit()
        self.capture = cv2.VideoCapture(int(spec) if self.live else spec)
        if not self.capture.isOpened():
            kind = "camera" if self.live else "video"
            raise UsageError(f"--source {spec}: the {kind} cannot be opened")
        ok, first = self.capture.read()
        if not ok or first is None:
            self.capture.release()
            raise UsageError(f"--source {spec}: no frame could be decoded from it")
        self._first: np.ndarray | None = first
        own_rate = self.capture.get(cv2.CAP_PROP_FPS) or None
        self.fps = fps or own_rate
        self.clock = _Clock(fps) if fps and not self.live else None
        self.seq = 0
        self._ready: collections.deque[Frame] = collections.deque()  # read, not yet returned

    def read(self) -> Frame | None:
        if self._ready:
            return self._ready.popleft()
        if self.clock is not None:
            self.clock.wait()
        if self._first is not None:
            image, self._first = self._first, None
            return self._frame(image)
        failed = 0
        while True:
            ok, image = self.capture.read()
            if ok and image is not None:
                break
            failed += 1
            # reads failing to the end are the end (a file's frame count is often an estimate, or it was cut short)
            if self.live or failed > MAX_FAILED_READS:
                return None
        for _ in range(failed):  # reads that failed before one succeeded: frames the decoder could not read
            self._ready.append(self._frame(None))
        self._ready.append(self._frame(image))
        return self._ready.popleft()

    def _frame(self, image: np.ndarray | None) -> Frame:
        frame = Frame(self.seq, time.perf_counter(), time.time(), image)
        if image is None:
            frame.error = f"frame {self.seq} cannot be decoded"
        elif image.ndim != 3 or image.shape[2] != 3:
            frame.image, frame.error = None, f"frame {self.seq} is not a 3-channel image"
        self.seq += 1
        return frame

    def close(self) -> None:
        self.capture.release()


class ImageFolderSource:
    """The images of a folder, in name order, each decoded by OpenCV; one that cannot be decoded is a frame with
    `image=None`. Read as fast as the pipeline takes them (or at `fps` when given)."""

    live = False

    def __init__(self, folder: Path, fps: float | None) -> None:
        self.name = str(folder)
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UsageError(f"--source {folder}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
        self.fps = fps
        self.clock = _Clock(fps) if fps else None
        self.seq = 0

    def read(self) -> Frame | None:
        if self.seq >= len(self.files):
            return None
        if self.clock is not None:
            self.clock.wait()
        path = self.files[self.seq]
        image = _cv2().imread(str(path), _cv2().IMREAD_COLOR)
        frame = Frame(self.seq, time.perf_counter(), time.time(), image)
        if image is None:
            frame.error = f"{path.name} cannot be decoded"
        self.seq += 1
        return frame

    def close(self) -> None:
        pass


def open_source(spec: str, fps: float | None) -> Source:
    """The source `spec` names: `synthetic:WxH`, a camera index, a folder of images or a video file."""
    if fps is not None and fps <= 0:
        raise UsageError(f"--fps: expected a positive rate, got {fps:g}")
    if spec.startswith("synthetic:") or spec == "synthetic":
        match = re.fullmatch(r"synthetic:(\d+)x(\d+)", spec)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise UsageError(f"--source {spec}: expected synthetic:WxH with a width and height in pixels")
        return SyntheticSource(int(match[1]), int(match[2]), fps or SYNTHETIC_FPS)
    if spec.isdigit():
        return VideoSource(spec, fps)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, fps)
    if not path.is_file():
        raise UsageError(f"--source {spec}: no such file, folder or camera (synthetic:WxH generates frames)")
    return VideoSource(spec, fps)
