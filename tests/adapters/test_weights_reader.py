"""read_weights_file: a weights file read by several threads into one buffer (reused through
ReadBuffers) holds exactly the file's bytes; a file that ends early or changes size is refused."""
import json
import os
import shutil

import pytest
import torch

from punica_core import AdapterError
from punica_core.adapters import peft, weights_reader
from punica_core.adapters.weights_reader import ReadBuffers, read_weights_file
from punica_core.model.config import ModelConfig

CHUNK = 4096
THREADS = 3     # pieces a threaded read is cut into (the files below are not multiples of it)


@pytest.fixture(scope="module")
def cfg(default_dir) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((default_dir / "config.json").read_text()))


@pytest.fixture
def small_chunks(monkeypatch):
    """The threading threshold scaled down, so small files take the threaded path (in 3 pieces)."""
    monkeypatch.setattr(weights_reader, "READ_THREADS", THREADS)
    monkeypatch.setattr(weights_reader, "PARALLEL_READ_BYTES", 2 * CHUNK)


def write(path, size, seed=0):
    data = torch.randint(0, 256, (size,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK,
                                  7 * CHUNK + 5, 100_003])
def test_threaded_read_returns_the_file_bytes(tmp_path, small_chunks, size):
    data = write(tmp_path / "w", size, seed=size)
    assert bytes(read_weights_file(tmp_path / "w", max_bytes=1 << 20)) == data


def test_big_file_with_default_chunks(tmp_path):
    size = weights_reader.PARALLEL_READ_BYTES + 12345   # threaded, pieces of unequal length
    data = write(tmp_path / "w", size)
    assert bytes(read_weights_file(tmp_path / "w", max_bytes=size)) == data


def test_short_preads_are_continued(tmp_path, small_chunks, monkeypatch):
    data = write(tmp_path / "w", 5 * CHUNK + 17)
    real = weights_reader._pread_into
    monkeypatch.setattr(weights_reader, "_pread_into", lambda fd, dst, off: real(fd, dst[:1000], off))
    assert bytes(read_weights_file(tmp_path / "w", max_bytes=1 << 20)) == data


def test_file_truncated_while_read_is_refused(tmp_path, small_chunks, monkeypatch):
    path = tmp_path / "w"
    write(path, 6 * CHUNK)
    real = weights_reader._pread_into

    def shrinking(fd, dst, off):
        os.truncate(path, CHUNK)            # after the size was taken
        return real(fd, dst, off)
    monkeypatch.setattr(weights_reader, "_pread_into", shrinking)
    with pytest.raises(AdapterError, match="truncated while it was read"):
        read_weights_file(path, max_bytes=1 << 20)


def test_file_grown_while_read_is_refused(tmp_path, small_chunks, monkeypatch):
    path = tmp_path / "w"
    write(path, 3 * CHUNK)
    real = weights_reader._pread_into

    def growing(fd, dst, off):
        with open(path, "ab") as f:
            f.write(b"x")
        return real(fd, dst, off)
    monkeypatch.setattr(weights_reader, "_pread_into", growing)
    with pytest.raises(AdapterError, match="changed size"):
        read_weights_file(path, max_bytes=1 << 20)


def test_refuses_links_non_files_and_oversize(tmp_path):
    write(tmp_path / "w", 100)
    (tmp_path / "link").symlink_to(tmp_path / "w")
    with pytest.raises(AdapterError, match="symbolic links"):
        read_weights_file(tmp_path / "link", max_bytes=1 << 20)
    with pytest.raises(AdapterError, match="not a regular file"):
        read_weights_file(tmp_path, max_bytes=1 << 20)
    with pytest.raises(AdapterError, match="over the 99-byte limit"):
        read_weights_file(tmp_path / "w", max_bytes=99)
    with pytest.raises(AdapterError, match="cannot be read"):
        read_weights_file(tmp_path / "missing", max_bytes=99)


def test_read_buffers_are_reused_and_capped(tmp_path, small_chunks):
    big, small = write(tmp_path / "big", 3 * CHUNK, 1), write(tmp_path / "small", CHUNK + 1, 2)
    bufs = ReadBuffers(keep_bytes=4 * CHUNK, granule=CHUNK)
    with bufs.lease() as alloc:
        first = read_weights_file(tmp_path / "big", 1 << 20, alloc)
        assert bytes(first) == big
        ptr = torch.frombuffer(first, dtype=torch.uint8).data_ptr()
    assert bufs.kept_bytes() == 3 * CHUNK
    with bufs.lease() as alloc:             # the smaller file lands in the same buffer
        second = read_weights_file(tmp_path / "small", 1 << 20, alloc)
        assert bytes(second) == small and len(second) == CHUNK + 1
        assert torch.frombuffer(second, dtype=torch.uint8).data_ptr() == ptr
        third = read_weights_file(tmp_path / "big", 1 << 20, alloc)    # a second, new buffer
        assert bytes(third) == big
    assert bufs.kept_bytes() == 3 * CHUNK   # both back: the second one is over keep_bytes


def test_empty_and_short_weights_files_are_refused(parity_adapters, tmp_path, cfg):
    folder = tmp_path / "a"
    shutil.copytree(parity_adapters["r4_qv"], folder)
    weights = folder / peft.WEIGHTS_NAME
    data = weights.read_bytes()
    for cut, match in ((0, "truncated"), (5, "truncated"), (len(data) - 1, "truncated or corrupt")):
        weights.write_bytes(data[:cut])
        with pytest.raises(AdapterError, match=match):
            peft.parse_adapter("a", folder, cfg, 64, buffers=ReadBuffers())


def test_read_buffers_lend_the_smallest_that_fits():
    bufs = ReadBuffers(keep_bytes=1 << 20, granule=CHUNK)
    with bufs.lease() as alloc:
        ptrs = {n: alloc(n * CHUNK).data_ptr() for n in (3, 1, 2)}
    assert bufs.kept_bytes() == 6 * CHUNK
    with bufs.lease() as alloc:
        assert alloc(2 * CHUNK - 7).data_ptr() == ptrs[2]
        assert alloc(CHUNK).data_ptr() == ptrs[1]
        assert alloc(CHUNK).data_ptr() == ptrs[3]
        assert alloc(CHUNK).data_ptr() not in ptrs.values()    # none left: a new one
