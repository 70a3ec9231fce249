"""File access below a store's root that never follows a symbolic link the store did not create.

The store makes only plain files and directories below its root, so a symlink there was put by someone
else (an operator's mistake, or an attacker with write access to the volume) and may point anywhere:
following it would make the store read foreign files, write outside its tree, or delete the contents
of the link's target while sweeping. Every path is therefore walked one component at a time with
``O_NOFOLLOW`` relative to the parent's descriptor (``dir_fd``), and a link anywhere below the root is
refused with ``StoreSymlink``. The root itself is opened normally: it may be a symlink (a mounted volume).

Hand-written because neither pathlib nor shutil offers "open this relative path without following
links" (``os.open``'s ``O_NOFOLLOW`` covers only the last component; ``openat2``'s ``RESOLVE_BENEATH``
has no Python binding).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adapters_store.errors import StoreSymlink

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refusal(root: Path, parts: Sequence[str]) -> StoreSymlink:
    path = root.joinpath(*parts)
    return StoreSymlink(
        f"{path} is a symbolic link; the store never follows links below its root "
        "(the root itself may be one): replace it with a directory or file, or remove it"
    )


def is_symlink(root: Path, *parts: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(root.joinpath(*parts)).st_mode)
    except FileNotFoundError:
        return False


def refuse_symlinks(root: Path, *parts: str) -> None:
    """Raise ``StoreSymlink`` if any component of ``root/parts...`` below the root is a symlink."""
    for i in range(1, len(parts) + 1):
        if is_symlink(root, *parts[:i]):
            raise _refusal(root, parts[:i])


@contextmanager
def open_dir(root: Path, *parts: str) -> Iterator[int]:
    """A descriptor of the directory ``root/parts...``, reached without following links below the root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and is_symlink(root, *parts[: i + 1]):
                    raise _refusal(root, parts[: i + 1]) from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_file(root: Path, parts: Sequence[str], flags: int, mode: int = 0o644) -> int:
    """``os.open`` of ``root/parts...`` with ``O_NOFOLLOW`` on every component below the root."""
    with open_dir(root, *parts[:-1]) as dir_fd:
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP and is_symlink(root, *parts):
                raise _refusal(root, parts) from None
            raise


def read_bytes(root: Path, *parts: str) -> bytes:
    fd = open_file(root, parts, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_head(root: Path, parts: Sequence[str], size: int) -> bytes:
    fd = open_file(root, parts, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read(size)


def file_size(root: Path, *parts: str) -> int:
    with open_dir(root, *parts[:-1]) as dir_fd:
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise _refusal(root, parts)
    return st.st_size


def remove_tree(root: Path, *parts: str) -> None:
    """Delete ``root/parts...`` (a directory or a file; nothing if absent) without following any link.

    A link at the end is unlinked itself (its target is untouched); ``shutil.rmtree`` with ``dir_fd``
    walks by descriptors and never descends into a link inside the tree.
    """
    try:
        with open_dir(root, *parts[:-1]) as dir_fd:
            try:
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(parts[-1], dir_fd=dir_fd)
            else:
                os.unlink(parts[-1], dir_fd=dir_fd)
    except FileNotFoundError:
        return


def list_dir(root: Path, *parts: str) -> list[str]:
    """Names in the directory ``root/parts...`` (empty if it does not exist)."""
    try:
        with open_dir(root, *parts) as fd:
            return os.listdir(fd)
    except FileNotFoundError:
        return []


def make_dirs(root: Path, *parts: str) -> None:
    """``mkdir -p`` below the root, refusing (never following) a link on the way."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, len(parts) + 1):
        refuse_symlinks(root, *parts[:i])
        try:
            with open_dir(root, *parts[: i - 1]) as fd:
                os.mkdir(parts[i - 1], 0o755, dir_fd=fd)
        except FileExistsError:
            refuse_symlinks(root, *parts[:i])
