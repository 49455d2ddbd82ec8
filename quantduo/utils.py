"""Small helpers shared by every area."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    An interrupted or failing ``write`` never leaves a partial file at ``path``. The file gets the usual
    permissions (0666 minus the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """``||y - y_ref|| / ||y_ref||`` computed in float32 (any shapes that broadcast)."""
    y_ref = y_ref.float()
    return float((y.float() - y_ref).norm() / y_ref.norm().clamp(min=1e-30))
