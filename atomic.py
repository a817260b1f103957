"""Write-then-rename, so a killed run never leaves a half-written file or directory that looks whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = True):
    """Yield a temporary sibling path; rename it onto ``final`` only if the block completes.

    Works for files and directories. On any exception the temporary is removed and ``final``
    is left exactly as it was. With ``overwrite=False`` an existing ``final`` raises
    FileExistsError, also when another process creates it while the block runs.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not overwrite:
        _rename_new(tmp, final)
    elif final.is_dir() and not final.is_symlink() and tmp.is_dir():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _rename_new(tmp: Path, final: Path) -> None:
    """Rename without replacing: link() refuses an existing file, rename() a non-empty directory."""
    try:
        if tmp.is_dir():
            os.rename(tmp, final)
        else:
            os.link(tmp, final)
            tmp.unlink()
    except OSError as exc:
        _remove(tmp)
        if final.exists():
            raise FileExistsError(f"{final} already exists") from exc
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
