"""Writing files so that a reader never sees half of one, with the permissions the user's umask asks for.

``tempfile`` creates private files (0600) and folders (0700); a file or folder renamed into place from one
would keep that mode, and teammates on a shared machine could not read checkpoints or exports. Everything
written through here gets the mode ``open()``/``mkdir()`` would give (0644 / 0755 under umask 022).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode a new folder gets from ``mkdir()`` under the current umask."""
    return 0o777 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def make_temporary_dir(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` (to be renamed into place when complete) with the umask's default mode."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(default_dir_mode())
    return folder


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``; an old ``target`` is moved aside first and removed last, so a
    failure in between leaves one of the two whole."""
    import shutil

    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def output_dir_problem(output: Path, force: bool, flag: str = "--output") -> str | None:
    """Why ``output`` cannot be written as a new folder (a file; a non-empty folder without ``force``), or None."""
    if output.exists() and not output.is_dir():
        return f"{output}: exists and is not a directory; choose another {flag}"
    if output.exists() and any(output.iterdir()) and not force:
        return f"{output}: exists and is not empty; choose another {flag} or pass --force"
    return None


@contextlib.contextmanager
def building_dir(output: Path) -> Iterator[Path]:
    """A temporary folder beside ``output`` to write into; when the block ends it replaces ``output`` (an old one
    is removed last, :func:`replace_dir`); when the block fails it is removed and ``output`` is untouched."""
    import shutil

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temporary_dir(output.parent, f".{output.name}.")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, output)
