"""Video I/O with PyAV (bundles libx264): the one place that reads and writes video files.

Conventions
-----------
* ``rotation`` is the clockwise angle (0/90/180/270) a player turns the coded picture by to show
  it upright — the meaning of the legacy ``rotate`` tag. It is read from the display-matrix side
  data (which ffmpeg also builds from a ``rotate`` tag). Flips in a display matrix are ignored.
* Widths/heights reported by :func:`probe_video` and produced by :func:`read_frames` are the
  *displayed* ones, i.e. after rotation.
* Resampling is by timestamps: output frame ``k`` at ``fps`` has time ``k / fps`` (relative to
  the first frame) and takes the source frame whose presentation time is nearest (ties go to
  the earlier frame). This works the same for constant and variable frame rate.
* A video lasts from its first frame's time to the end of its last frame (last time + that
  frame's duration); at ``fps`` it has ``resampled_num_frames(duration, fps)`` frames.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import av.error
import numpy as np

# Container signatures we recognise: a file that starts like this but cannot be opened is a
# broken video ("unreadable"); anything else that fails to open is "not_a_video".
_VIDEO_MAGIC = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"wide"),
    (4, b"free"),
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM (EBML)
    (0, b"RIFF"),  # AVI
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"),  # MPEG-PS
    (0, b"G"),  # MPEG-TS sync byte (weak, but only used to choose a reason)
)
# Demuxers that open still images; a picture renamed to .mp4 is not a video.
_IMAGE_FORMATS = {"image2", "gif_pipe"}

VIDEO_REASONS = (
    "not_found",  # the path does not exist
    "empty_file",  # zero bytes
    "not_a_video",  # not a recognised video container (a text file named x.mp4, a picture)
    "unreadable",  # looks like a video container but cannot be opened (e.g. truncated MP4)
    "audio_only",  # opens, has audio streams but no video stream
    "no_video_stream",  # opens, no video and no audio stream
    "no_frames",  # a video stream without any frame
    "truncated",  # fewer packets than the container header announces
    "corrupt",  # the decoder failed on the data
    # Refused before or while reading, so that nothing can hang or exhaust the machine:
    "not_a_regular_file",  # ``not_a_regular_file:<kind>``: a directory, device, fifo or socket
    "too_large",  # more bytes than the caller's cap
    "hash_timeout",  # hashing took longer than the caller's time bound
    "probe_timeout",  # opening, demuxing or decoding took longer than the time bound
)


class VideoError(Exception):
    """A video that cannot be used; ``reason`` is one of :data:`VIDEO_REASONS`."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    width: int  # displayed width (after rotation)
    height: int  # displayed height (after rotation)
    fps: float  # average: num_frames / duration
    num_frames: int  # counted from the demuxed packets (no decoding)
    duration: float  # seconds, first frame's start to last frame's end
    rotation: int  # clockwise degrees to display upright: 0, 90, 180 or 270
    codec: str
    variable_frame_rate: bool


@dataclass(frozen=True)
class _Timeline:
    pts: np.ndarray | None  # sorted presentation timestamps (stream time base); None if unknown
    times: np.ndarray  # seconds from the first frame, sorted
    duration: float


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write T×H×W×3 uint8 frames as H.264 MP4, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    t, h, w, _ = frames.shape
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=int(round(fps)))
            stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
            # Lossy libx264 output is not byte-identical run to run even on one thread; crf=0
            # (lossless) is, which is what the sample data uses.
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
            for frame in frames:
                frame = np.ascontiguousarray(frame[: stream.height, : stream.width])
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_kind(mode: int) -> str:
    """``regular``, ``directory``, ``device``, ``fifo``, ``socket`` or ``other`` for a stat mode."""
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"


def content_hash(
    path: str | os.PathLike,
    chunk_size: int = 1 << 20,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
) -> str:
    """sha256 of the file's bytes, first 16 hex characters; streamed, so any size is fine.

    Only a regular file is read: a device, fifo, socket or directory raises
    :class:`VideoError` ``not_a_regular_file:<kind>`` before any byte is read (``/dev/zero``
    never ends, a fifo blocks forever). ``max_bytes`` and ``timeout_s`` bound the read
    (``too_large``, ``hash_timeout``). A missing file raises :class:`FileNotFoundError`.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    before = os.stat(path)
    _require_regular(path, before.st_mode)
    # Non-blocking open: a fifo swapped in after the stat cannot block the open itself, and the
    # fstat below (same inode, still regular) refuses it before reading.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        _require_regular(path, st.st_mode)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise VideoError("not_a_regular_file:other", f"{path} changed while opened")
        digest = hashlib.sha256()
        size = 0
        while chunk := f.read(chunk_size):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise VideoError("too_large", f"{path}: more than {max_bytes} bytes")
            if deadline is not None and time.monotonic() > deadline:
                raise VideoError("hash_timeout", f"{path}: hashing took over {timeout_s}s")
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _require_regular(path: str | os.PathLike, mode: int) -> None:
    kind = file_kind(mode)
    if kind != "regular":
        raise VideoError(f"not_a_regular_file:{kind}", str(path))


def resampled_num_frames(duration: float, fps: float) -> int:
    """Frames a video of ``duration`` seconds has at ``fps`` (the count :func:`read_frames` gives).

    The small tolerance keeps e.g. 10 frames at 10 fps → 10 frames at 10 fps despite rounding.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return max(0, int(math.floor(duration * fps + 1e-3)))


def _looks_like_video(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[off : off + len(magic)] == magic for off, magic in _VIDEO_MAGIC)


@contextmanager
def _open_video(
    path: str | os.PathLike, timeout_s: float | None = None
) -> Iterator[tuple[av.container.InputContainer, object]]:
    """Open ``path`` and yield (container, its first video stream), mapping failures to reasons.

    ``timeout_s`` bounds the open and each packet read (PyAV's interrupt callback)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:  # missing, or a path the OS refuses (too long, a loop, no permission)
        raise VideoError("not_found", str(p)) from None
    _require_regular(p, st.st_mode)  # ffmpeg would read a device or fifo forever
    if st.st_size == 0:
        raise VideoError("empty_file", str(p))
    timeout = None if timeout_s is None else (timeout_s, timeout_s)
    try:
        container = av.open(str(p), mode="r", timeout=timeout)
    except av.error.ExitError as e:  # the interrupt callback fired: the time bound
        raise VideoError("probe_timeout", f"{p}: opening took over {timeout_s}s") from e
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        reason = "unreadable" if _looks_like_video(p) else "not_a_video"
        raise VideoError(reason, f"{p}: {e}") from e
    try:
        if container.format.name in _IMAGE_FORMATS or container.format.name.endswith("_pipe"):
            raise VideoError("not_a_video", f"{p}: a still image ({container.format.name})")
        if not container.streams.video:
            reason = "audio_only" if container.streams.audio else "no_video_stream"
            raise VideoError(reason, str(p))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: ~2x faster decode on the 2-core machine
        yield container, stream
    finally:
        container.close()


def _timeline(
    container: av.container.InputContainer, stream, deadline: float | None = None
) -> _Timeline:
    """Presentation times of every frame from a demux pass (packets only, nothing decoded).

    ``deadline`` (``time.monotonic()``) bounds the pass: ``probe_timeout`` after it."""
    pts_list: list[int] = []
    durations: dict[int, int] = {}
    missing_pts = 0
    try:
        for packet in container.demux(stream):
            _check_deadline(deadline)
            if packet.size == 0:  # the flush packet at the end
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                missing_pts += 1
                continue
            pts_list.append(ts)
            durations[ts] = packet.duration or 0
    except av.error.ExitError as e:
        raise VideoError("probe_timeout", "a packet read took too long") from e
    except av.error.FFmpegError as e:
        raise VideoError("corrupt", f"demux failed: {e}") from e
    n = len(pts_list) + missing_pts
    if n == 0:
        raise VideoError("no_frames")
    if stream.frames and n < stream.frames:
        # The header (e.g. an MP4 moov at the front) promises more frames than the file holds.
        raise VideoError("truncated", f"{n} of {stream.frames} frames present")
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    if missing_pts:  # no timestamps at all for some packets: assume a constant rate
        times = np.arange(n, dtype=np.float64) / rate
        return _Timeline(None, times, n / rate)
    pts = np.array(sorted(pts_list), dtype=np.int64)
    tb = float(stream.time_base)
    times = (pts - pts[0]).astype(np.float64) * tb
    diffs = np.diff(times)
    last = durations[int(pts[-1])] * tb
    if last <= 0:
        last = float(np.median(diffs)) if len(diffs) else 1.0 / rate
    return _Timeline(pts, times, float(times[-1] + last))


_TIMELINE_CACHE: OrderedDict[tuple[str, int, int], _Timeline] = OrderedDict()
_TIMELINE_CACHE_SIZE = 64
_TIMELINE_LOCK = threading.Lock()


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise VideoError("probe_timeout", "probing took longer than its time bound")


def _cached_timeline(
    path: str | os.PathLike, container, stream, deadline: float | None = None
) -> _Timeline:
    """:func:`_timeline`, memoised per (file, size, mtime): reading many clips of one long
    video must not demux the whole file once per clip."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _TIMELINE_LOCK:
        if key in _TIMELINE_CACHE:
            _TIMELINE_CACHE.move_to_end(key)
            return _TIMELINE_CACHE[key]
    tl = _timeline(container, stream, deadline)
    with _TIMELINE_LOCK:
        _TIMELINE_CACHE[key] = tl
        while len(_TIMELINE_CACHE) > _TIMELINE_CACHE_SIZE:
            _TIMELINE_CACHE.popitem(last=False)
    return tl


def _rotation_cw(frame: av.VideoFrame | None, stream) -> int:
    """Clockwise display rotation: the frame's display matrix, else a legacy ``rotate`` tag."""
    ccw = 0.0
    if frame is not None:
        try:
            ccw = float(frame.rotation or 0)
        except (AttributeError, ValueError):
            ccw = 0.0
    if ccw == 0:
        tag = stream.metadata.get("rotate")
        if tag is not None:
            try:
                return int(round(float(tag) / 90.0)) * 90 % 360
            except ValueError:
                return 0
    return int(round(-ccw / 90.0)) * 90 % 360


def _is_vfr(times: np.ndarray) -> bool:
    if len(times) < 3:
        return False
    diffs = np.diff(times)
    med = float(np.median(diffs))
    # Container time bases quantise timestamps; 25% of a frame interval is far above that.
    return med <= 0 or float(np.max(np.abs(diffs - med))) > 0.25 * med


def _decode_error(e: Exception) -> VideoError:
    return VideoError("corrupt", f"decode failed: {e}")


def probe_video(
    path: str | os.PathLike, verify: bool = False, timeout_s: float | None = None
) -> VideoInfo:
    """Describe a video; raises :class:`VideoError` if it cannot be used.

    Demuxes every packet (counts frames, checks timestamps, catches truncation) and decodes the
    first frame (rotation, decodability). ``verify=True`` decodes every frame as well, which
    finds corruption in the middle of a file at the cost of a full decode. ``timeout_s`` bounds
    the whole probe (checked per packet and per frame, and by PyAV's interrupt callback within
    one read): ``probe_timeout`` beyond it.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _open_video(path, timeout_s) as (container, stream):
        tl = _cached_timeline(path, container, stream, deadline)
        container.seek(0)
        first = None
        try:
            for frame in container.decode(stream):
                _check_deadline(deadline)
                if first is None:
                    first = frame
                    if not verify:
                        break
        except av.error.ExitError as e:
            raise VideoError("probe_timeout", "a packet read took too long") from e
        except av.error.FFmpegError as e:
            raise _decode_error(e) from e
        if first is None:
            raise VideoError("no_frames", "nothing decodes")
        rotation = _rotation_cw(first, stream)
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        n = len(tl.times)
        fps = n / tl.duration if tl.duration > 0 else float(stream.average_rate or 0)
        return VideoInfo(
            width=int(w),
            height=int(h),
            fps=float(fps),
            num_frames=int(n),
            duration=float(tl.duration),
            rotation=rotation,
            codec=stream.codec_context.name,
            variable_frame_rate=_is_vfr(tl.times),
        )


def _select(times: np.ndarray, out_times: np.ndarray) -> np.ndarray:
    """Index of the source time nearest to each output time (ties → earlier)."""
    right = np.clip(np.searchsorted(times, out_times, side="left"), 0, len(times) - 1)
    left = np.clip(right - 1, 0, len(times) - 1)
    take_left = np.abs(out_times - times[left]) <= np.abs(times[right] - out_times)
    return np.where(take_left, left, right).astype(np.int64)


def _scaled_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int], rotation: int) -> np.ndarray:
    # swscale converts any pixel format (gray, yuv, 10-bit…) to RGB and resizes in one pass.
    if size == (frame.width, frame.height):
        arr = frame.to_ndarray(format="rgb24")
    else:
        arr = frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA")
    if rotation:
        arr = np.ascontiguousarray(np.rot90(arr, k=-rotation // 90))  # negative k: clockwise
    return arr


def read_frames(
    path: str | os.PathLike,
    fps: float | None = None,
    start: int = 0,
    count: int | None = None,
    max_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode frames ``[start, start + count)`` as (T,H,W,3) uint8 RGB, upright.

    With ``fps`` the video is first resampled to that rate by timestamps (see the module note),
    and ``start``/``count`` count frames at that rate; without it they count source frames.
    Returns ``(frames, source_indices)``: for each output frame the index of the source frame
    (in presentation order) it came from. ``max_side`` downscales (area filter) so the longer
    side is at most that. Only the packets from the keyframe before the first needed frame to
    the last needed frame are decoded.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"start and count must be non-negative, got {start}, {count}")
    with _open_video(path) as (container, stream):
        tl = _cached_timeline(path, container, stream)
        total = len(tl.times) if fps is None else resampled_num_frames(tl.duration, fps)
        stop = total if count is None else min(total, start + count)
        if fps is None:
            sel = np.arange(start, max(start, stop), dtype=np.int64)
        else:
            sel = _select(tl.times, np.arange(start, max(start, stop)) / float(fps))
        needed = set(sel.tolist())
        frames: dict[int, np.ndarray] = {}
        rotation = None
        size = None
        lo = int(sel.min()) if len(sel) else 0
        seeked = False
        if tl.pts is not None and lo > 0:
            container.seek(int(tl.pts[lo]), stream=stream, backward=True, any_frame=False)
            seeked = True
        else:
            container.seek(0)
        pts_index = {int(p): i for i, p in enumerate(tl.pts)} if tl.pts is not None else None
        for attempt in range(2):
            counter = 0
            try:
                for frame in container.decode(stream):
                    if rotation is None:
                        rotation = _rotation_cw(frame, stream)
                        size = _scaled_size(frame.width, frame.height, max_side)
                    if pts_index is not None and frame.pts is not None:
                        idx = pts_index.get(int(frame.pts), -1)
                    else:
                        idx = counter
                    counter += 1
                    if idx in needed and idx not in frames:
                        frames[idx] = _to_rgb(frame, size, rotation)
                    if len(frames) == len(needed):
                        break
            except av.error.FFmpegError as e:
                raise _decode_error(e) from e
            if len(frames) == len(needed) or not seeked or attempt:
                break
            # The seek landed after a needed frame (imprecise index): decode from the start.
            container.seek(0)
            seeked = False
        if rotation is None:  # nothing decoded: need a size for the empty result
            if not needed and len(tl.times):
                return _empty(stream, max_side), np.zeros(0, dtype=np.int64)
            raise VideoError("no_frames", "nothing decodes")
        if len(frames) != len(needed):
            missing = sorted(needed - frames.keys())[:5]
            raise VideoError("corrupt", f"source frames {missing} did not decode")
        if not needed:
            return _empty(stream, max_side, rotation), sel
        out = np.stack([frames[i] for i in sel.tolist()])
        return out, sel


def _empty(stream, max_side: int | None, rotation: int | None = None) -> np.ndarray:
    w, h = _scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
    if rotation is None:
        rotation = _rotation_cw(None, stream)
    if rotation in (90, 270):
        w, h = h, w
    return np.zeros((0, h, w, 3), dtype=np.uint8)
