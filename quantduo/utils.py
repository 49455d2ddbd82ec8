"""Small helpers shared by every area: atomic files and folders, folder manifests, progress bars."""
from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from quantduo._version import __version__

# dtype names as configs and command lines spell them
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MANIFEST_NAME = "quantduo_manifest.json"
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically
_AT_FDCWD = -100


class InputError(ValueError):
    """An input file or folder is missing, corrupt, or not of the expected kind (the message names it)."""


class ManifestError(InputError):
    """A folder's files do not match its ``quantduo_manifest.json``."""


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename it onto ``path``.

    An interrupted or failing ``write`` never leaves a partial file at ``path``. The file gets the usual
    permissions (0666 minus the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask: read from ``/proc`` where Linux has it (setting and restoring it, the fallback, would
    race file creation in other threads, e.g. a background checkpoint writer)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | Path) -> None:
    """Flush a file's or a directory's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_replaceable_folder(path: str | Path) -> bool:
    """Whether an output folder may be (re)written at ``path``: nothing there, an empty folder, or a folder
    quantduo wrote (it holds a manifest). Anything else might be someone's data and is never replaced."""
    path = Path(path)
    if not path.exists():
        return True
    return path.is_dir() and (not any(path.iterdir()) or (path / MANIFEST_NAME).is_file())


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block completes, fsync everything in it and
    put it at ``path`` in one rename. A folder already at ``path`` stays intact until then (it is swapped out
    atomically, then removed); a failing or interrupted block removes the temporary folder and leaves ``path``
    as it was. Leftovers of a killed writer are cleaned up by the next write to ``path``.

    Raises ``FileExistsError`` when ``path`` holds something quantduo did not write (:func:`is_replaceable_folder`).
    """
    path = Path(path).absolute()
    if not is_replaceable_folder(path):
        raise FileExistsError(f"{path} exists and is not a folder quantduo wrote; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path, "partial")))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for file in sorted(p for p in tmp.rglob("*")):
            _fsync(file)
        _fsync(tmp)
        _put_in_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder's temporary name now holds the old one, if any


def _temp_prefix(path: Path, kind: str, pid: int | None = None) -> str:
    return f".{path.name}.{kind}-{os.getpid() if pid is None else pid}-"


def _put_in_place(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing ``path`` ends up at ``tmp`` (atomic exchange where the kernel has it,
    else two renames with the old folder parked under a name :func:`_clean_leftovers` restores from)."""
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path) != 0:
        parked = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path, "replaced")))
        os.rename(path, parked / "old")
        os.rename(tmp, path)
        os.rename(parked / "old", tmp)
        parked.rmdir()
    _fsync(path.parent)


def _exchange(a: Path, b: Path) -> int:
    """``renameat2(a, b, RENAME_EXCHANGE)``; nonzero where the C library or the file system lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return -1
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)


def _clean_leftovers(path: Path) -> None:
    """Remove the temporary folders of writers to ``path`` that died; a folder parked by a writer killed between
    its two renames goes back to ``path`` if nothing replaced it."""
    for leftover in path.parent.glob(glob.escape(f".{path.name}.") + "*-*-*"):
        kind, _, rest = leftover.name[len(path.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "replaced") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "replaced" and (leftover / "old").is_dir() and not path.exists():
            os.rename(leftover / "old", path)
        shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path, made_by: dict | None = None) -> Path:
    """Write ``quantduo_manifest.json`` into ``directory``: the SHA-256 of every file in it (sub-folders
    included) and how it was made (``made_by``: e.g. format, rank, command line; plus the quantduo version
    and the time)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): file_sha256(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"quantduo_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "made_by": made_by or {}, "files": files}
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def find_manifest(directory: str | Path) -> tuple[Path, str] | None:
    """(manifest file, prefix of ``directory``'s entries in it) from ``directory`` or its parent; None if neither
    folder has one."""
    directory = Path(directory)
    if (directory / MANIFEST_NAME).is_file():
        return directory / MANIFEST_NAME, ""
    if (directory.parent / MANIFEST_NAME).is_file():
        return directory.parent / MANIFEST_NAME, directory.name + "/"
    return None


def read_manifest(path: str | Path) -> dict:
    """Parse a manifest file (``ManifestError`` for anything but a manifest quantduo wrote)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is unreadable or not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path} is not a quantduo manifest (no 'files' object)")
    return manifest


def verify_manifest(directory: str | Path, required: bool = True) -> dict | None:
    """Check every file of ``directory`` against the manifest in it or in its parent (for a component folder of a
    pipeline): each listed file present with its SHA-256, no unlisted file. Returns the manifest; None when there
    is none and not ``required``. Raises :class:`ManifestError` naming the first offending file."""
    directory = Path(directory)
    found = find_manifest(directory)
    if found is None:
        if required:
            raise ManifestError(f"{directory} has no {MANIFEST_NAME}: not a complete folder written by quantduo")
        return None
    path, prefix = found
    manifest = read_manifest(path)
    listed = {name[len(prefix):]: digest for name, digest in manifest["files"].items() if name.startswith(prefix)}
    if prefix and not listed and not required:  # the parent's manifest is about other things
        return None
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*")
               if p.is_file() and p.name != MANIFEST_NAME}
    for name in sorted(present - set(listed)):
        raise ManifestError(f"{directory / name} is not listed in {path}: the folder was changed after it was saved")
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise ManifestError(f"{directory / name} is missing (listed in {path})")
        if file_sha256(directory / name) != digest:
            raise ManifestError(f"{directory / name} is corrupt or was edited: its SHA-256 does not match {path}")
    return manifest


def show_progress() -> bool:
    """Whether progress bars should draw: only when stderr is a terminal (in logs they print lines of noise)."""
    return sys.stderr.isatty()


def progress_bar(iterable, progress: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` drawn only when ``progress`` and stderr is a terminal; it leaves no line behind
    (``leave=False``), so bars nested in another one's loop do not print blank lines."""
    return tqdm(iterable, disable=not (progress and show_progress()), leave=False, **kwargs)


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """``||y - y_ref|| / ||y_ref||`` computed in float32 (any shapes that broadcast)."""
    y_ref = y_ref.float()
    return float((y.float() - y_ref).norm() / y_ref.norm().clamp(min=1e-30))
