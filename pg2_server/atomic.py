"""Replace a file all at once: what readers see is the old file or the whole new one, never half."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)`, flush it to disk, then rename it over `path`.

    The temporary file is `.NAME.XXXX.tmp` next to `path` (removed if `write` fails); the result
    is readable by other accounts (0644), as a server or compositor under another user needs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """`write_atomic` of a bytes payload."""
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_tensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """`write_atomic` of a safetensors file; a failed write (a full disk, a file-size limit)
    raises OSError naming the file, as any other write would, not safetensors' own error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except SafetensorError as e:
        raise OSError(f"could not write {path}: {e}") from None
