"""Numbers-list bases shared by the workers of one host: one packed file, mapped read-only.

The first worker needing a base takes the list's ``flock``, reads and checks the base,
and writes ``<list>.<gen>.<digest>.numbers`` (header, ``flat``, ``offsets``) under a
temporary name then renames it; the others wait on the lock and map the file.
Invariants: a file is used only after its size, header and every byte's CRC check out;
the folder must be ours and closed to others and files are 0400, since a planted or
changed file would change answers; where no file can be written the worker answers
from a private copy (logged, counted). Each process fixes glibc's mmap threshold and
trims its heap after a swap (:func:`configure_allocator`, :func:`release_free_memory`).
Design and figures: docs/design.md, "Shared list memory".
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import shutil
import stat
import struct
import tempfile
import time
import zlib
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.store import ListState, pack_bucket
from service.screening.lists import NumberBase, index_arrays

logger = logging.getLogger(__name__)

#: Where instance folders go when ``cache.share_dir`` is not set, if usable.
TMPFS = Path("/dev/shm")
FOLDER_PREFIX = "callscreen-lists-"
#: The file every process using a folder holds a shared ``flock`` on (see :func:`sweep`).
OWNER = ".owner"
#: How often a worker waiting for another's build tries the lock again.
LOCK_POLL_S = 0.01
SUFFIX = ".numbers"
MAGIC = b"CSNUMBRS"
VERSION = 1
#: The header's room in the file: the arrays start on a page boundary.
HEADER_BYTES = 4096
_BYTE_ORDER_MARK = 0x0102030405060708
#: magic, version, byte-order mark, numbers, groups, gen, data CRC, list name, checksum.
_HEADER = struct.Struct("=8sIQQQQI64s128s")
_CRC = struct.Struct("=I")


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)
except OSError:  # no C library to load symbols from (not seen on Linux)
    _LIBC = None


class UnsafeFolder(Exception):
    """A shared folder that others could write to (or not a folder of ours)."""


class BadFile(Exception):
    """A shared file that must not be answered from; the message says why."""


class SharingFailed(Exception):
    """The base could not be shared (folder full, unwritable, gone); use a private copy."""


#: ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
#: Blocks at least this large are mapped on their own, so freeing one unmaps it.
MMAP_THRESHOLD = 1 << 20


def configure_allocator() -> None:
    """Fix glibc's mmap threshold (see the module docstring); once per process, at start."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_free_memory(dropped: list[object] | None = None) -> None:
    """Give memory the C library holds freed back to the system (glibc's ``malloc_trim``).

    ``dropped`` is emptied first: pass the last reference to an old list in it, so that
    unmapping a shared file (tens of ms at 10 M numbers, without the GIL) happens here.
    Run it in a thread: it walks every heap (milliseconds), taking their locks in turn.
    """
    if dropped:
        dropped.clear()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def default_parent() -> Path:
    """Where instance folders go by default: tmpfs when usable, else the temp folder."""
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK | os.X_OK):
        return TMPFS
    return Path(tempfile.gettempdir())


def parent_folder(share_dir: str | None) -> Path:
    """``cache.share_dir`` as a folder to make instance folders in; raises ``ValueError``."""
    if share_dir is None:
        return default_parent()
    parent = Path(share_dir)
    if not parent.is_dir():
        raise ValueError(f"cache.share_dir {share_dir!r} is not a directory")
    return parent


def make_folder(parent: Path) -> tuple[Path, int]:
    """A new, private (0700) folder for one service instance's files, and its owner lock.

    The caller keeps the returned descriptor open while the folder is in use: it holds
    a shared ``flock`` on ``.owner``, as does every :class:`SharedBases` using the
    folder. Folders under ``parent`` that nobody holds any more (their service was
    killed with SIGKILL, or the host lost power with a disk-backed ``share_dir``) are
    removed first (:func:`sweep`), so such a stop leaks nothing for long. ``.owner``
    is locked before it gets its name: a sweep never sees it unheld.
    """
    sweep(parent)
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=parent))
    try:
        fd = os.open(
            folder / ".owner.new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(folder / ".owner.new", folder / OWNER)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, fd


def remove_folder(folder: Path, owner: int) -> None:
    """Remove a folder made by :func:`make_folder`, then close its owner lock."""
    shutil.rmtree(folder, ignore_errors=True)
    os.close(owner)


def hold_folder(folder: Path) -> int:
    """A descriptor holding a shared lock on ``folder`` (see :func:`make_folder`)."""
    try:
        fd = os.open(folder / OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeFolder(f"{folder}: no {OWNER} ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:  # a sweep holds it: the folder is being removed
        os.close(fd)
        raise UnsafeFolder(f"{folder} is being removed") from exc
    return fd


def sweep(parent: Path) -> list[Path]:
    """Remove this user's instance folders under ``parent`` that no process holds."""
    removed = []
    for folder in parent.glob(FOLDER_PREFIX + "*"):
        try:
            check_folder(folder)
            fd = os.open(folder / OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (UnsafeFolder, OSError):
            continue  # not ours, or still being made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # in use
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            logger.warning("removed %s, left behind by a service that was killed", folder)
        finally:
            os.close(fd)
    return removed


def check_folder(folder: Path) -> None:
    """Raise :class:`UnsafeFolder` unless ``folder`` is our own directory, closed to others."""
    try:
        info = os.stat(folder, follow_symlinks=False)
    except OSError as exc:
        raise UnsafeFolder(f"{folder}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeFolder(f"{folder} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafeFolder(f"{folder} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise UnsafeFolder(
            f"{folder} has mode {stat.S_IMODE(info.st_mode):o}: others may enter it (want 700)"
        )


def file_name(name: str, state: ListState) -> str:
    """The file of one base: list, gen and (hashed, as it may be empty) checksum."""
    digest = hashlib.sha256(state.checksum.encode()).hexdigest()[:16]
    return f"{name}.{state.gen}.{digest}{SUFFIX}"


def base_digest(buckets: Sequence[array[int]]) -> str:
    """The checksum the loader commits for these buckets (core/build.py's recipe)."""
    digest = hashlib.sha256()
    for bucket, numbers in enumerate(buckets):
        if len(numbers):
            digest.update(bucket.to_bytes(2, "little") + pack_bucket(numbers))
    return "sha256:" + digest.hexdigest()


def _header(name: str, state: ListState, count: int, groups: int, crc: int) -> bytes:
    fields = _HEADER.pack(
        MAGIC, VERSION, _BYTE_ORDER_MARK, count, groups, state.gen, crc,
        name.encode(), state.checksum.encode(),
    )  # fmt: skip
    fields += _CRC.pack(zlib.crc32(fields))
    return fields.ljust(HEADER_BYTES, b"\0")


@dataclass(frozen=True, slots=True, eq=False)
class MappedBase:
    """One verified shared file, mapped: what a :class:`NumberList` looks up in."""

    path: Path
    flat: memoryview
    offsets: memoryview
    mask: int

    @property
    def base(self) -> NumberBase:
        return self.flat, self.offsets, self.mask


def map_file(path: Path, name: str, state: ListState) -> MappedBase | None:
    """Map and verify the file of ``name`` at ``state``; None when there is none.

    Raises :class:`BadFile` when the file exists but must not be used. Reads every byte
    (the CRC): run it in a thread (zlib releases the GIL).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadFile(f"cannot open: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise BadFile("not a regular file of this user")
        if info.st_size < HEADER_BYTES:
            raise BadFile(f"truncated: {info.st_size} bytes")
        mapped = mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(mapped)
    try:
        flat, offsets = _verify(view, name, state, info.st_size)
    except BadFile:
        view.release()
        mapped.close()
        raise
    return MappedBase(path, flat, offsets, len(offsets) - 2)


def _verify(
    view: memoryview, name: str, state: ListState, size: int
) -> tuple[memoryview, memoryview]:
    head = bytes(view[: _HEADER.size + _CRC.size])
    fields, (header_crc,) = head[: _HEADER.size], _CRC.unpack(head[_HEADER.size :])
    magic, version, mark, count, groups, gen, crc, raw_name, raw_checksum = _HEADER.unpack(fields)
    if magic != MAGIC or version != VERSION or mark != _BYTE_ORDER_MARK:
        raise BadFile("not a shared numbers file of this version and byte order")
    if zlib.crc32(fields) != header_crc:
        raise BadFile("header checksum mismatch")
    stored = (raw_name.rstrip(b"\0").decode(errors="replace"), gen,
              raw_checksum.rstrip(b"\0").decode(errors="replace"))  # fmt: skip
    if stored != (name, state.gen, state.checksum):
        raise BadFile(f"holds {stored}, not {(name, state.gen, state.checksum)}")
    flat_end = HEADER_BYTES + 8 * count
    if size != flat_end + 4 * (groups + 1) or groups < 1 or groups & (groups - 1):
        raise BadFile(f"{size} bytes, not the {flat_end + 4 * (groups + 1)} its header says")
    if zlib.crc32(view[HEADER_BYTES:]) != crc:
        raise BadFile("data checksum mismatch")
    flat = view[HEADER_BYTES:flat_end].cast("Q")
    offsets = view[flat_end:].cast("I")
    if offsets[0] != 0 or offsets[groups] != count:
        raise BadFile("offsets do not span the numbers")
    return flat, offsets


def write_file(folder: Path, name: str, state: ListState, buckets: Sequence[array[int]]) -> Path:
    """Index ``buckets`` and write them as the shared file of ``name`` at ``state``.

    Raises :class:`SharingFailed` when the buckets are not the base ``state`` names (Redis
    changed under the read) or the file cannot be written. Run it in a thread: at 10 M
    numbers the indexing takes a second or two (numpy, mostly without the GIL).
    """
    if state.checksum.startswith("sha256:") and base_digest(buckets) != state.checksum:
        raise SharingFailed(f"the base read from Redis is not gen {state.gen}'s {state.checksum}")
    flat, offsets = index_arrays(buckets)
    if len(flat) >= 2**32:
        raise SharingFailed(f"{len(flat)} numbers do not fit 32-bit offsets")
    crc = zlib.crc32(offsets.data, zlib.crc32(flat.data))
    header = _header(name, state, len(flat), len(offsets) - 1, crc)
    final = folder / file_name(name, state)
    temporary = folder / f"{name}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        # Read-only for its owner too: nothing may write to a file workers answer from.
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400
        )
        try:
            with open(fd, "wb", closefd=False) as out:
                out.write(header)
                out.write(flat.data)
                out.write(offsets.data)
        finally:
            os.close(fd)
        os.replace(temporary, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise SharingFailed(f"cannot write {final}: {exc.strerror or exc}") from exc
    return final


def _remove_others(folder: Path, name: str, keep: str) -> None:
    """Unlink the list's other files (older bases, a dead builder's temporary files)."""
    for path in folder.glob(f"{name}.*"):
        if path.name != keep and (path.name.endswith(SUFFIX) or ".tmp." in path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


Fetch = Callable[[], Awaitable[Sequence["array[int]"]]]


@dataclass(frozen=True, slots=True)
class Obtained:
    """A mapped base and how this worker came by it (for the log and the bench)."""

    mapped: MappedBase
    #: ``"mapped"`` (another worker wrote it) or ``"built"`` (this one did).
    how: str
    #: Seconds spent waiting for another worker's build.
    waited_s: float


class SharedBases:
    """The shared numbers bases in one instance folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        """Raises :class:`UnsafeFolder` for a folder others could write to, or not held."""
        check_folder(folder)
        self.folder = folder
        self._owner: int | None = hold_folder(folder)

    def close(self) -> None:
        """Let go of the folder (the files already mapped stay readable)."""
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    async def numbers(self, name: str, state: ListState, fetch: Fetch) -> Obtained:
        """The base of ``name`` at ``state``: mapped from the folder, built first if needed.

        ``fetch`` reads the buckets from Redis; its errors (``MissingGeneration``, Redis
        down) go to the caller as they are. Raises :class:`SharingFailed` when the file
        cannot be shared: the caller then keeps a private copy.
        """
        path = self.folder / file_name(name, state)
        try:
            found = await asyncio.to_thread(map_file, path, name, state)
        except BadFile as exc:
            logger.warning("shared file %s is bad (%s); building it again", path, exc)
            found = None
        if found is not None:
            return Obtained(found, "mapped", 0.0)
        waiting = time.perf_counter()
        async with self._locked(name):
            waited_s = time.perf_counter() - waiting
            try:  # another worker may have built it while this one waited
                found = await asyncio.to_thread(map_file, path, name, state)
            except BadFile:
                found = None  # written again below, under the same name
            if found is not None:
                return Obtained(found, "mapped", waited_s)
            held = [await fetch()]
            await asyncio.to_thread(self._build, name, state, held)
            try:
                found = await asyncio.to_thread(map_file, path, name, state)
            except BadFile as exc:
                raise SharingFailed(f"{path} is bad right after writing it: {exc}") from exc
            if found is None:
                raise SharingFailed(f"{path} vanished right after writing it")
            return Obtained(found, "built", waited_s)

    def _build(self, name: str, state: ListState, held: list[Sequence[array[int]]]) -> None:
        """Write the file from the buckets in ``held``, which it empties (see above)."""
        buckets = held.pop()
        for leftover in self.folder.glob(f"{name}.tmp.*"):  # a dead builder's
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        final = write_file(self.folder, name, state, buckets)
        _remove_others(self.folder, name, keep=final.name)

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """Hold ``<name>.lock`` (``flock``); polled, so a cancelled wait leaves nothing behind."""
        try:
            fd = os.open(
                self.folder / f"{name}.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise SharingFailed(f"cannot open the lock of {name!r}: {exc.strerror}") from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # releases the lock
