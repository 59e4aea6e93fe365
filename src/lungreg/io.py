"""Reading and writing images, landmarks and tables (torch files: `torch_io`).

Every writer here is atomic: it writes to a hidden temporary file in the destination
folder and renames it into place, so a killed job never leaves a file under its final
name that looks finished but is not.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import gzip
import io as _io
import os
import tempfile
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import SimpleITK as sitk

_UMASK = os.umask(0)
os.umask(_UMASK)

RECOVERY_HINT = (
    "if it is an intermediate file under results/, delete it (Snakemake then rebuilds it) or "
    "rerun the job that wrote it, and what depends on it, with: snakemake ... --forcerun {path}"
)


class InputError(ValueError):
    """Bad input, reported in one line naming the subject, the file and the problem."""

    def __init__(self, subject: str | None, path: str | os.PathLike | None, problem: str):
        self.subject, self.path, self.problem = subject, path, problem
        parts = [f"subject {subject}" if subject else None, str(path) if path else None, problem]
        super().__init__(": ".join(p for p in parts if p))


class CorruptFileError(RuntimeError):
    """A file the workflow wrote earlier cannot be read back."""

    def __init__(self, path: str | os.PathLike, reason: str, hint: str | None = None):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: cannot be read ({reason}); {hint or RECOVERY_HINT.format(path=path)}")


def _split_suffix(path: Path) -> tuple[str, str]:
    """Name and suffix, keeping double suffixes such as .nii.gz that writers look at."""
    name = path.name
    for suffix in (".nii.gz", ".tar.gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return path.stem, path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split_suffix(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give outputs the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


class BackgroundWriter:
    """Write jobs run one at a time, in order, on a background thread, so that writing overlaps the
    caller's work. At most `pending` jobs wait (their data stays in memory until written). A job's
    error is raised in the caller, with a note naming the job, at its next `submit` or at `close`;
    the writers here are atomic, so a failed job leaves no file under its final name.

        with BackgroundWriter() as writer:
            writer.submit("pair a", write_image, image, path)
            ...
            writer.close()  # waits for every job; raises the first error

    Leaving the block by an exception drops the jobs not yet started and waits for the running one."""

    def __init__(self, pending: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungreg-writer")
        self._jobs: collections.deque[tuple[str, Future]] = collections.deque()
        self._pending = max(1, pending)
        self._lock = threading.Lock()
        self.busy_seconds = 0.0  # the thread's own time in jobs
        self.wait_seconds = 0.0  # the caller's time waiting for them

    def submit(self, name: str, job: Callable[..., None], *args) -> None:
        started = time.perf_counter()
        while self._jobs and (self._jobs[0][1].done() or len(self._jobs) >= self._pending):
            self._finish_oldest()
        self.wait_seconds += time.perf_counter() - started
        self._jobs.append((name, self._pool.submit(self._timed, job, *args)))

    def close(self) -> None:
        started = time.perf_counter()
        while self._jobs:
            self._finish_oldest()
        self._pool.shutdown()
        self.wait_seconds += time.perf_counter() - started

    def _timed(self, job: Callable[..., None], *args) -> None:
        started = time.perf_counter()
        try:
            job(*args)
        finally:
            with self._lock:
                self.busy_seconds += time.perf_counter() - started

    def _finish_oldest(self) -> None:
        name, future = self._jobs.popleft()
        error = future.exception()
        if error is not None:
            error.add_note(f"while writing {name} (in the background)")
            raise error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self._jobs.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def write_text(text: str, path: str | os.PathLike) -> None:
    write_bytes(text.encode(), path)


# ----------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike, subject: str | None = None) -> sitk.Image:
    """Read anything SimpleITK reads: a single file, or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise InputError(subject, path, "file not found")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(subject, path, "folder holds no DICOM series")
            if len(series) > 1:
                raise InputError(subject, path, f"folder holds {len(series)} DICOM series, expected one")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        image = sitk.ReadImage(str(path))
        problem = nifti_problem(path)  # ITK reads a truncated NIfTI silently
        if problem:
            raise InputError(subject, path, f"unreadable image ({problem})")
        return image
    except InputError:
        raise
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(subject, path, f"unreadable image ({first_line})") from None


def nifti_problem(path: str | os.PathLike) -> str | None:
    """Why a .nii / .nii.gz file is incomplete, or None.

    ITK reads a truncated NIfTI without complaint (the missing voxels come back as zeros), so
    the gzip stream (end marker, CRC) and the voxel data's length against the header are checked.
    """
    name = str(path)
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as stream:
            header = stream.read(540)
            size = len(header)
            while chunk := stream.read(1 << 22):
                size += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        return f"truncated or damaged compressed data: {error}"
    for order in "<>":
        version = int(np.frombuffer(header[:4], f"{order}i4")[0]) if len(header) >= 4 else 0
        if version == 348 and len(header) >= 348:  # NIfTI-1
            dims = np.frombuffer(header[40:56], f"{order}i2").astype(np.int64)
            bitpix = int(np.frombuffer(header[72:74], f"{order}i2")[0])
            offset = int(np.frombuffer(header[108:112], f"{order}f4")[0])
            break
        if version == 540 and len(header) >= 540:  # NIfTI-2
            dims = np.frombuffer(header[16:80], f"{order}i8")
            bitpix = int(np.frombuffer(header[14:16], f"{order}i2")[0])
            offset = int(np.frombuffer(header[168:176], f"{order}i8")[0])
            break
    else:
        return "no NIfTI header"
    expected = offset + int(np.prod(dims[1 : 1 + int(dims[0])])) * bitpix // 8
    if size < expected:
        return f"truncated: {size} bytes of voxel data and header, the header announces {expected}"
    return None


def read_intermediate_image(path: str | os.PathLike) -> sitk.Image:
    """Read an image the workflow wrote; a truncated or corrupt file gets a recovery hint."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise CorruptFileError(path, str(error).strip().splitlines()[-1]) from None
    problem = nifti_problem(path)
    if problem:
        raise CorruptFileError(path, problem)
    return image


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


# -------------------------------------------------------------------------- landmarks


def _parse_elastix_points(lines: list[str], path: Path, subject: str | None) -> np.ndarray:
    kind = lines[0].strip().lower()
    if kind == "index":
        raise InputError(subject, path, "elastix point set in voxel indices ('index'); physical 'point' expected")
    if kind != "point":
        raise InputError(subject, path, "elastix point set must start with 'point'")
    try:
        count = int(lines[1].split()[0])
    except (IndexError, ValueError):
        raise InputError(subject, path, "line 2: expected the number of points") from None
    rows = [line for line in lines[2:] if line.strip()]
    if len(rows) != count:
        raise InputError(subject, path, f"header announces {count} points, file holds {len(rows)}")
    return np.array([_parse_xyz(row.split(), path, subject, i + 3) for i, row in enumerate(rows)])


def _parse_xyz(fields: list[str], path: Path, subject: str | None, line_number: int) -> list[float]:
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise InputError(subject, path, f"line {line_number}: not numeric: {' '.join(fields)!r}") from None
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise InputError(subject, path, f"line {line_number}: expected three finite coordinates x y z")
    return values


def read_landmarks(path: str | os.PathLike, subject: str | None = None) -> np.ndarray:
    """Landmarks as an (n, 3) array of physical x, y, z in mm (ITK / LPS world coordinates).

    Accepts a CSV with columns x, y, z (other columns ignored) or the elastix point-set
    text format (`point`, the count, then one `x y z` per line).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(subject, path, "file not found")
    lines = path.read_text().splitlines()
    if not lines:
        raise InputError(subject, path, "empty landmark file")
    if lines[0].strip().lower() in ("point", "index"):
        return _parse_elastix_points(lines, path, subject)
    reader = csv.reader(_io.StringIO("\n".join(lines)))
    header = [h.strip().lower() for h in next(reader)]
    missing = {"x", "y", "z"} - set(header)
    if missing:
        raise InputError(subject, path, f"CSV lacks column(s) {', '.join(sorted(missing))}")
    columns = [header.index(axis) for axis in ("x", "y", "z")]
    points = []
    for line_number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InputError(subject, path, f"line {line_number}: {len(row)} fields, header has {len(header)}")
        points.append(_parse_xyz([row[c] for c in columns], path, subject, line_number))
    return np.array(points, dtype=float).reshape(-1, 3)


def read_landmark_names(path: str | os.PathLike, subject: str | None = None) -> list[str]:
    """One name per point of `read_landmarks(path)`, in the same order.

    The `landmark` (or else `name`) column of a CSV; otherwise, and for elastix point sets,
    the 0-based row number as text.
    """
    count = len(read_landmarks(path, subject))  # also validates the file
    lines = Path(path).read_text().splitlines()
    if lines[0].strip().lower() in ("point", "index"):
        return [str(i) for i in range(count)]
    reader = csv.reader(_io.StringIO("\n".join(lines)))
    header = [h.strip().lower() for h in next(reader)]
    column = next((header.index(c) for c in ("landmark", "name") if c in header), None)
    if column is None:
        return [str(i) for i in range(count)]
    return [row[column].strip() for row in reader if any(cell.strip() for cell in row)]


# ------------------------------------------------------------------------------ tables


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Tab-separated, no index, fixed float format so that equal numbers give equal bytes."""
    write_text(frame.to_csv(sep="\t", index=False, float_format="%.6g", lineterminator="\n"), path)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CorruptFileError(path, str(error)) from None
