"""Reading an adapter's weights file fast: several threads (pread releases the GIL) into one
buffer, from a pool of buffers kept between loads (a fresh 80 MB buffer's page faults cost more
than copying the file from the page cache). Refuses links, non-regular files, files over the
size limit and files that change size while read, with an AdapterError naming the file.
"""
from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import AdapterError

# a weights file this big is read by READ_THREADS threads, one piece each
PARALLEL_READ_BYTES = 8 << 20
READ_THREADS = 8
Alloc = Callable[[int], torch.Tensor]       # size -> uint8 buffer of that size


def _new_buffer(size: int) -> torch.Tensor:
    # torch.empty, not bytearray: a bytearray is zero-filled by one thread, which faults in
    # all its pages before the read starts
    return torch.empty(size, dtype=torch.uint8)


class ReadBuffers:
    """Read buffers kept for reuse between loads. A fresh 80 MB buffer costs some 20k page
    faults, which take longer than copying the file from the page cache (warm, 8 threads:
    14 ms fresh vs 4 ms reused on the 16-core H200 host). Bytes read through a lease must not
    be used after it ends."""

    def __init__(self, keep_bytes: int = 256 << 20, granule: int = 4 << 20):
        self.keep_bytes = keep_bytes
        self.granule = granule              # sizes round up to this, so near sizes share
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[Alloc]:
        taken: list[torch.Tensor] = []

        def alloc(size: int) -> torch.Tensor:
            taken.append(self._take(size))
            return taken[-1][:size]
        try:
            yield alloc
        finally:
            for buf in taken:
                self._give(buf)

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)

    def _take(self, size: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= size]
            if fits:    # by index: list.remove would compare tensors elementwise
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return _new_buffer(-(-max(size, 1) // self.granule) * self.granule)

    def _give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if sum(b.numel() for b in self._free) + buf.numel() <= self.keep_bytes:
                self._free.append(buf)


@contextmanager
def lease_buffers(buffers: ReadBuffers | None) -> Iterator[Alloc]:
    if buffers is None:
        yield _new_buffer
    else:
        with buffers.lease() as alloc:
            yield alloc


def read_weights_file(path: Path, max_bytes: int, alloc: Alloc | None = None) -> memoryview:
    """The file's bytes, in one buffer from alloc (a fresh one by default). A big file is read
    by several threads (pread releases the GIL): a cold read gains queue depth, a warm one
    faults in a fresh buffer's pages in parallel. Refuses a symbolic link, anything but a
    regular file, a file over max_bytes, and one that changes size while it is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if os.path.islink(path):
            raise AdapterError(f"{path}: symbolic links are not followed") from None
        raise AdapterError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise AdapterError(f"{path}: {st.st_size} bytes, over the {max_bytes}-byte limit")
        view = memoryview((alloc or _new_buffer)(st.st_size).numpy())
        _read_into(fd, view, str(path))
        if os.fstat(fd).st_size != st.st_size:
            raise AdapterError(f"{path}: changed size while it was read")
        return view
    finally:
        os.close(fd)


def _read_into(fd: int, view: memoryview, label: str) -> None:
    """Fills view with the file's first len(view) bytes; a file that ends sooner is refused.
    A big file is cut in one piece per read thread: each pread hands the GIL over once more,
    which beside a busy engine loop costs up to Python's switch interval."""
    size = len(view)
    parts = 1 if size < PARALLEL_READ_BYTES else READ_THREADS
    step = -(-size // parts)
    chunks = [(lo, min(lo + step, size)) for lo in range(0, size, step)] if size else []

    def read(chunk: tuple[int, int]) -> None:
        lo, hi = chunk
        while lo < hi:          # pread may return less than asked: go on until hi or EOF
            n = _pread_into(fd, view[lo:hi], lo)
            if n == 0:
                raise AdapterError(f"{label}: truncated while it was read")
            lo += n
    if len(chunks) <= 1:
        for c in chunks:
            read(c)
        return
    list(_read_pool().map(read, chunks))


_POOL: dict[int, ThreadPoolExecutor] = {}      # pid -> pool (a forked child makes its own)
_POOL_LOCK = threading.Lock()


def _read_pool() -> ThreadPoolExecutor:
    """One pool of read threads per process, made on first use (a pool per file started
    READ_THREADS threads per read). Keyed by pid: a forked child has none of its threads."""
    pid = os.getpid()
    with _POOL_LOCK:
        if pid not in _POOL:
            _POOL.clear()
            _POOL[pid] = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="adapter-read")
        return _POOL[pid]


def _pread_into(fd: int, dst: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [dst], offset)
    data = os.pread(fd, len(dst), offset)      # no preadv (macOS < 11): one extra copy
    dst[:len(data)] = data
    return len(data)
