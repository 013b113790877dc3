"""StoreReader: opens a flash store, checks it, and reads FFN bundles from disk.

Resident tensors are memory-mapped and handed out as zero-copy views. FFN bundles are read
per request with `read_bundles`: neuron ids are sorted and coalesced into runs (reading a
few unwanted bundles when that is cheaper than another request, as the paper's section
3.2 does), each run is split into reads of at most `max_read_bytes`, and a thread pool
issues them concurrently as positioned reads into preallocated page-aligned buffers.

Reads bypass the page cache: the layer files are opened with O_DIRECT where the file
system allows it (the store pads everything to 4 KiB so any chunk-aligned range is a legal
O_DIRECT read); where it does not (tmpfs, some network file systems) each read is followed
by posix_fadvise(DONTNEED). Without this the OS would silently keep the model in RAM and
a DRAM cap would be fiction.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import format as fmt
from storage.errors import FormatError, ReadError, StorageError
from storage.quant import QuantizedTensor

DEFAULT_IO_THREADS = 4  # bench/io.py: what this disk likes; the paper used 32 on a phone
DEFAULT_MAX_READ_BYTES = 1 << 20
# Read through a gap of unwanted bundles when it is smaller than this: one request's fixed
# cost on this disk is worth about 64 KiB of transfer (0.6 GB/s at 64 KiB vs 1.7 GB/s at 4 MiB).
DEFAULT_GAP_BYTES = 64 * 1024


@dataclass
class ReadStats:
    bytes_read: int = 0  # bytes transferred from disk, incl. alignment and gap overhead
    bytes_wanted: int = 0  # bytes of the requested bundles
    requests: int = 0
    read_seconds: float = 0.0  # summed over reader threads


def planar_tensor(raw: np.ndarray, scheme: str, group_size: int, shape) -> QuantizedTensor:
    """A QuantizedTensor of zero-copy views of a 2-D tensor's planar bytes (format.py: all data,
    then scales, then mins; each plane as wide per row as the scheme's row-record field): a
    resident tensor, or an FFN layer's matrix."""
    from storage import quant

    rows, k = shape
    planes, at = [], 0
    dtypes = (quant.DATA_DTYPES[scheme], quant.scale_dtype(scheme), quant.scale_dtype(scheme))
    for width, dtype in zip(quant.field_bytes(scheme, k, group_size), dtypes):
        planes.append(raw[at : at + rows * width].view(dtype).reshape(rows, -1) if width else None)
        at += rows * width
    return QuantizedTensor(scheme, group_size, (rows, k), *planes)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (anonymous mmap), as O_DIRECT requires."""
    return np.frombuffer(mmap.mmap(-1, fmt.align_up(max(nbytes, 1), fmt.PAGE)), dtype=np.uint8)


def open_direct(path: str | os.PathLike) -> tuple[int, bool]:
    """Open `path` read-only bypassing the page cache: (fd, True) with O_DIRECT; (fd, False)
    where the file system has none (tmpfs), and the caller must drop what it read with
    posix_fadvise(DONTNEED). O_DIRECT reads need page-aligned offsets, sizes and buffers."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:  # EINVAL: no O_DIRECT on this file system
            pass
    return os.open(path, os.O_RDONLY), False


def _all_done(futures) -> int:
    """The sum of the futures' results, once every one has ended: on a failed read the others
    still write into the caller's buffer, which must not be reused before they stop."""
    wait(futures)
    return sum(f.result() for f in futures)


class StoreReader:
    def __init__(self, store_dir: str | Path, *, verify: bool = False, direct: bool = True, throttle=None,
                 io_threads: int = DEFAULT_IO_THREADS, max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
                 gap_bytes: int = DEFAULT_GAP_BYTES):
        self.dir = Path(store_dir)
        if ".partial-" in self.dir.name:
            raise FormatError(f"{self.dir}: left by an interrupted conversion; delete it and convert again")
        if not self.dir.is_dir():
            raise FormatError(f"{self.dir}: no such store directory")
        self.manifest = fmt.Manifest.load(self.dir)
        self._check_sizes()
        self._resident = (np.memmap(self.dir / fmt.RESIDENT_FILE, dtype=np.uint8, mode="r")
                          if self.manifest.resident_bytes else np.zeros(0, np.uint8))
        self._advise_lookup_tables()
        if verify:
            self.verify()
        self.throttle = throttle
        self.max_read_bytes = fmt.align_up(max_read_bytes, fmt.PAGE)
        self.gap_bytes = gap_bytes
        self.stats = ReadStats()
        self._stats_lock = threading.Lock()
        self.direct = direct
        # the positioned read every flash read goes through: tests/test_read_faults.py injects
        # I/O errors and short reads by replacing it
        self.preadv = os.preadv
        self._fds = [self._open_layer(layer) for layer in self.manifest.ffn_layers]
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="flash-read")
        self._buffers = threading.local()  # one staging buffer per reader thread, made once
        self.io_buffer_bytes = (io_threads + 1) * (self.max_read_bytes + 2 * fmt.PAGE)  # pool + calling thread

    def _advise_lookup_tables(self) -> None:
        """No read-around for tables read a row per token (fmt.lookup_tables): a fault on an
        embedding row would otherwise pull ~128 KiB of neighbouring rows into the page cache,
        which a memory cgroup charges to us. The DRAM planner counts them per token (memory.py)."""
        mapping = getattr(self._resident, "_mmap", None)
        if mapping is None or not hasattr(mmap, "MADV_RANDOM"):
            return
        for name in fmt.lookup_tables(self.manifest.resident):
            t = self.manifest.resident[name]
            start = t.offset - t.offset % mmap.PAGESIZE
            try:
                mapping.madvise(mmap.MADV_RANDOM, start, t.offset + t.nbytes - start)
            except (OSError, ValueError):  # advice only: a kernel that refuses it costs memory, not results
                pass

    # ---- opening and checking -----------------------------------------------------
    def _check_sizes(self) -> None:
        """The files are the sizes the manifest gives (Manifest.load has checked that every
        tensor, chunk and matrix lies inside those sizes)."""
        m = self.manifest
        expected = [(fmt.RESIDENT_FILE, m.resident_bytes)] + [(layer.file, layer.file_bytes) for layer in m.ffn_layers]
        for rel, size in expected:
            path = self.dir / rel
            if not path.is_file():
                raise FormatError(f"{path}: missing from the store; convert the model again")
            actual = path.stat().st_size
            if actual != size:
                raise FormatError(
                    f"{path}: {actual} bytes but the manifest says {size}; the file is "
                    f"{'truncated' if actual < size else 'not the one the manifest describes'} (convert again)"
                )

    def _open_layer(self, layer: fmt.FFNLayer) -> int:
        path = str(self.dir / layer.file)
        if not self.direct:
            return os.open(path, os.O_RDONLY)
        fd, self.direct = open_direct(path)  # False on tmpfs: _pread drops pages with fadvise instead
        return fd

    def verify(self) -> None:
        """Check every checksum; raise FormatError naming the first damaged tensor or chunk."""
        try:
            self._verify()
        except OSError as e:
            raise ReadError(f"{e.filename or self.dir}: cannot read ({e.strerror or e}); the disk or the file is "
                            "failing") from None

    def _verify(self) -> None:
        for name, t in self.manifest.resident.items():
            if fmt.checksum(self._resident[t.offset : t.offset + t.nbytes]) != t.checksum:
                raise FormatError(f"{self.dir / fmt.RESIDENT_FILE}: checksum mismatch in tensor {name!r}; "
                                  "the store is damaged, convert again")
        for layer in self.manifest.ffn_layers:
            path = self.dir / layer.file
            with open(path, "rb") as f:
                for index, chunk in enumerate(layer.chunks):
                    f.seek(chunk.offset)
                    raw = f.read(chunk.stored_bytes)
                    if layer.compression == "zstd":
                        raw = self._decompress(raw, path, index)
                    if fmt.checksum(raw) != chunk.checksum:
                        raise FormatError(f"{path}: checksum mismatch in chunk {index} "
                                          f"(bytes {chunk.offset}..{chunk.offset + chunk.stored_bytes}); "
                                          "the store is damaged, convert again")
                for mat in layer.matrices:
                    f.seek(mat.offset)
                    if fmt.checksum(f.read(mat.nbytes)) != mat.checksum:
                        raise FormatError(f"{path}: checksum mismatch in matrix {mat.name!r} "
                                          f"(bytes {mat.offset}..{mat.offset + mat.nbytes}); "
                                          "the store is damaged, convert again")

    @staticmethod
    def _decompress(raw: bytes, path: Path, index: int) -> bytes:
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompress(raw)
        except zstandard.ZstdError as e:
            raise FormatError(f"{path}: chunk {index} does not decompress ({e}); the store is damaged") from None

    # ---- resident tensors ---------------------------------------------------------
    def resident_tensor(self, name: str) -> np.ndarray | QuantizedTensor:
        """A 1-D f32 array, or a QuantizedTensor of zero-copy views, of resident tensor `name`."""
        t = self.manifest.resident[name]
        raw = self._resident[t.offset : t.offset + t.nbytes]
        if len(t.shape) == 1:
            return raw.view(np.float32)
        return planar_tensor(raw, t.scheme, t.group_size, t.shape)

    def release_resident(self, name: str) -> None:
        """Drop resident tensor `name`'s pages from this process's RSS and from the page cache, for
        a caller that keeps a copy of it (the engine's matrices interleaved by block): touched
        mapped pages count in RSS, so the tensor would otherwise count twice. Views of it stay
        valid; the pages are read again if touched (a neighbour's sharing an edge page, its scales)."""
        t = self.manifest.resident[name]
        mapping = getattr(self._resident, "_mmap", None)
        if mapping is None or t.nbytes == 0:
            return
        start = t.offset - t.offset % mmap.PAGESIZE
        length = t.offset + t.nbytes - start
        try:
            if hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED, start, length)
            if hasattr(os, "posix_fadvise"):
                fd = os.open(self.dir / fmt.RESIDENT_FILE, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        except (OSError, ValueError):  # advice only: a kernel that refuses it costs memory, not results
            pass

    # ---- FFN bundles --------------------------------------------------------------
    def read_bundles(self, layer: int, neuron_ids, out: np.ndarray | None = None,
                     counter: ReadStats | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """The bundles of `neuron_ids` (sorted, duplicates dropped) as uint8 [n, bundle_bytes],
        read from disk. Row j of the result is the j-th smallest id. `counter` also gets this
        call's bytes and requests (a tracer attributes bytes to layers with it; `stats` is
        shared by every thread, so differences of it would mix concurrent reads).
        rows: with `out`, the j-th smallest id's bundle goes to out[rows[j]] instead (a neuron
        cache's rows freed by evictions, filled in place: no row moves); returns `out`."""
        spec = self.manifest.ffn_layers[layer]
        ids = np.unique(np.asarray(neuron_ids, dtype=np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= spec.n_neurons):
            raise StorageError(f"layer {layer}: neuron ids must be in [0, {spec.n_neurons}), got {ids[0]}..{ids[-1]}")
        if rows is not None:
            rows = np.asarray(rows, np.int64)
            if out is None or rows.shape != ids.shape or (rows.size and (rows.min() < 0 or rows.max() >= out.shape[0])):
                raise StorageError(f"rows must give a row of out for each of the {ids.size} ids")
        if out is None:
            out = np.empty((ids.size, spec.bundle_bytes), np.uint8)
        elif (rows is None and out.shape[0] < ids.size) or out.shape[1] != spec.bundle_bytes:
            raise StorageError(f"out buffer {out.shape} cannot hold {ids.size} bundles of {spec.bundle_bytes} bytes")
        if not ids.size:
            return out if rows is not None else out[:0]
        jobs = self._plan_reads(spec, ids)
        if len(jobs) == 1:  # no hand-off to the pool for a single read
            nbytes = self._read_job(layer, spec, ids, jobs[0], out, rows)
        else:
            nbytes = _all_done([self._pool.submit(self._read_job, layer, spec, ids, job, out, rows) for job in jobs])
        with self._stats_lock:
            self.stats.bytes_wanted += ids.size * spec.bundle_bytes
        if counter is not None:
            counter.bytes_read += nbytes
            counter.bytes_wanted += ids.size * spec.bundle_bytes
            counter.requests += len(jobs)
        return out if rows is not None else out[: ids.size]

    def _plan_reads(self, spec: fmt.FFNLayer, ids: np.ndarray) -> list[tuple[int, int]]:
        """Split sorted ids into [lo, hi) index ranges, one read each: a new read starts where
        the gap to the previous id exceeds gap_bytes, or the read would exceed max_read_bytes
        (or, compressed, at each chunk: a chunk is decompressed whole)."""
        bb = spec.bundle_bytes
        if spec.compression == "zstd":
            chunk_of = ids // spec.bundles_per_chunk
            cuts = np.flatnonzero(np.diff(chunk_of)) + 1
        else:
            gaps = (np.diff(ids) - 1) * bb
            cuts = list(np.flatnonzero(gaps > self.gap_bytes) + 1)
            # split long runs into reads of at most `per_read` bundles, so a read's page-aligned
            # span (at most per_read * bb + 2 pages) fits max_read_bytes
            per_read = max(1, (self.max_read_bytes - 2 * fmt.PAGE) // bb)
            bounded = []
            for lo, hi in zip([0, *cuts], [*cuts, ids.size]):
                piece = (ids[lo:hi] - ids[lo]) // per_read
                bounded.extend(lo + np.flatnonzero(np.diff(piece)) + 1)
                bounded.append(hi)
            cuts = bounded[:-1]
        edges = [0, *map(int, cuts), ids.size]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def _staging(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._buffers, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = self._buffers.buf = aligned_buffer(max(nbytes, self.max_read_bytes))
        return buf

    def matrix_tensor(self, layer: int, name: str) -> QuantizedTensor:
        """Layer `layer`'s whole matrix `name` read from flash (read_matrix), as a QuantizedTensor of
        views into the bytes read."""
        raw = self.read_matrix(layer, name)
        m = self.manifest.ffn_layers[layer].matrix(name)
        return planar_tensor(raw, m.scheme, m.group_size, m.shape)

    def read_matrix(self, layer: int, name: str, out: np.ndarray | None = None, counter: ReadStats | None = None
                    ) -> np.ndarray:
        """The bytes of layer `layer`'s whole matrix `name` (format.FFNMatrix) as uint8 [nbytes],
        read like bundles (page-aligned, bypassing the page cache, throttled), max_read_bytes at a time."""
        spec = self.manifest.ffn_layers[layer]
        mat = spec.matrix(name)
        if mat is None:
            raise StorageError(f"{self.dir / spec.file}: layer {layer} keeps no matrix {name!r}")
        if out is None:
            out = np.empty(mat.nbytes, np.uint8)
        elif out.shape != (mat.nbytes,):
            raise StorageError(f"out buffer {out.shape} cannot hold matrix {name!r} of {mat.nbytes} bytes")

        def piece(start: int) -> int:
            n = min(self.max_read_bytes, mat.nbytes - start)
            length = fmt.align_up(n, fmt.PAGE)
            out[start : start + n] = self._pread(layer, mat.offset + start, length)[:n]
            return length

        starts = range(0, mat.nbytes, self.max_read_bytes)
        if len(starts) == 1:
            total = piece(0)
        else:  # long sequential reads, several in flight (the pool's threads)
            total = _all_done([self._pool.submit(piece, start) for start in starts])
        if counter is not None:
            counter.bytes_read += total
            counter.bytes_wanted += mat.nbytes
            counter.requests += len(starts)
        with self._stats_lock:
            self.stats.bytes_wanted += mat.nbytes
        return out

    def _read_job(self, layer: int, spec: fmt.FFNLayer, ids: np.ndarray, job: tuple[int, int], out: np.ndarray,
                  dest: np.ndarray | None = None) -> int:
        """Read one coalesced run of bundles into out[lo:hi] (out[dest[lo:hi]] given dest);
        returns the bytes read from disk."""
        lo, hi = job
        bb = spec.bundle_bytes
        first, last = int(ids[lo]), int(ids[hi - 1])
        if spec.compression == "zstd":
            index = first // spec.bundles_per_chunk
            chunk = spec.chunks[index]
            data = self._pread(layer, chunk.offset, fmt.align_up(chunk.stored_bytes, fmt.PAGE))
            raw = np.frombuffer(self._decompress(bytes(data[: chunk.stored_bytes]), self.dir / spec.file, index), np.uint8)
            base = index * spec.bundles_per_chunk
            rows = raw.reshape(-1, bb)
            if dest is not None:  # into scattered rows (a cache's freed ones)
                out[dest[lo:hi]] = rows[ids[lo:hi] - base]
            else:
                np.take(rows, ids[lo:hi] - base, axis=0, out=out[lo:hi])
            return data.size
        start = first * bb // fmt.PAGE * fmt.PAGE
        end = fmt.align_up((last + 1) * bb, fmt.PAGE)
        data = self._pread(layer, start, end - start)
        skip = first * bb - start
        rows = data[skip : skip + (last - first + 1) * bb].reshape(-1, bb)
        if dest is not None:  # into scattered rows (a cache's freed ones)
            out[dest[lo:hi]] = rows if hi - lo == last - first + 1 else rows[ids[lo:hi] - first]
        elif hi - lo == last - first + 1:  # no gaps: one copy
            out[lo:hi] = rows
        else:
            np.take(rows, ids[lo:hi] - first, axis=0, out=out[lo:hi])
        return end - start

    def read_layer(self, layer: int, out: np.ndarray, counter: ReadStats | None = None) -> np.ndarray:
        """Layer `layer`'s file as it is laid out -- its bundles, then its whole matrices at their
        offsets -- read straight into `out` (page-aligned, aligned_buffer; at least
        layer_file_bytes(layer) long), max_read_bytes at a time with several in flight: what a
        layer streamed whole needs, without the staging copy of read_bundles (the dense path's
        FFN layers, flash_ffn.FlashFFN). Uncompressed layers only."""
        spec = self.manifest.ffn_layers[layer]
        length = self.layer_file_bytes(layer)
        if spec.compression != "none":
            raise StorageError(f"{self.dir / spec.file}: read_layer reads uncompressed layers; use read_bundles")
        if out.ctypes.data % fmt.PAGE or out.size < length:
            raise StorageError(f"read_layer needs a page-aligned buffer of {length} bytes (aligned_buffer), got "
                               f"{out.size} bytes at offset {out.ctypes.data % fmt.PAGE} from a page")
        starts = range(0, length, self.max_read_bytes)
        view = memoryview(out)

        def piece(start: int) -> int:
            n = min(self.max_read_bytes, length - start)
            self._pread_into(layer, start, view[start : start + n])
            return n

        total = _all_done([self._pool.submit(piece, start) for start in starts])
        if counter is not None:
            counter.bytes_read += total
            counter.bytes_wanted += total
            counter.requests += len(starts)
        with self._stats_lock:
            self.stats.bytes_wanted += total
        return out

    def layer_file_bytes(self, layer: int) -> int:
        """The page-aligned extent of a layer's bundles and whole matrices in its file (read_layer)."""
        return fmt.align_up(fmt.layer_extent(self.manifest.ffn_layers[layer]), fmt.PAGE)

    def _pread(self, layer: int, offset: int, length: int) -> np.ndarray:
        """Read [offset, offset + length) (page-aligned) into this thread's staging buffer."""
        buf = self._staging(length)
        self._pread_into(layer, offset, memoryview(buf)[:length])
        return buf[:length]

    def _pread_into(self, layer: int, offset: int, view: memoryview) -> None:
        """Read [offset, offset + len(view)) (page-aligned) into `view` (page-aligned memory)."""
        length = len(view)
        if self.throttle is not None and self.throttle.enabled:
            self.throttle.acquire(length)
        fd = self._fds[layer]
        t0 = time.perf_counter()
        done = 0
        while done < length:
            try:
                n = self.preadv(fd, [view[done:length]], offset + done)
            except OSError as e:
                raise ReadError(f"{self.dir / self.manifest.ffn_layers[layer].file}: reading bytes {offset + done}.."
                                f"{offset + length} failed ({e.strerror or e}); the disk or the file is failing: "
                                f"run `flashinfer check {self.dir}`, and convert again if it reports damage"
                                ) from None
            if n <= 0:
                raise ReadError(f"{self.dir / self.manifest.ffn_layers[layer].file}: short read at byte "
                                f"{offset + done} (file changed or truncated since it was opened); "
                                f"run `flashinfer check {self.dir}`")
            done += n
        if not self.direct:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self.stats.bytes_read += length
            self.stats.requests += 1
            self.stats.read_seconds += elapsed

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
