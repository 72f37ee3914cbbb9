"""Out-of-core checkpoints: stream Hugging Face safetensors in, write shards out atomically.

Why: merging checkpoints larger than memory (issue 5, deliverable 3): peak resident memory must
stay within about (models + 2) x the largest tensor, however large the models.

Idea: parse each safetensors header ourselves (8-byte little-endian length, then JSON giving
every tensor's dtype, shape and byte range) and read one tensor at a time with positioned reads
into a fresh numpy buffer. Not mmap: touched mapped pages count as resident memory until
unmapped, whereas ``pread`` goes through the page cache, which the kernel reclaims. The writer
plans every shard before the first byte is written, so each shard's header is known upfront and
tensors stream straight to disk in order. Everything goes to a hidden sibling directory that is
renamed into place only at :meth:`CheckpointWriter.commit`, so a killed or failed merge never
leaves a checkpoint at the output path that loads. Only JSON and safetensors are read, so
loading never runs code from a checkpoint.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from research.tree import closest_paths

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {code: np.dtype(t) for code, t in (
    ("F64", np.float64), ("F32", np.float32), ("F16", np.float16), ("BF16", ml_dtypes.bfloat16),
    ("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2),
    ("I64", np.int64), ("I32", np.int32), ("I16", np.int16), ("I8", np.int8),
    ("U64", np.uint64), ("U32", np.uint32), ("U16", np.uint16), ("U8", np.uint8),
    ("BOOL", np.bool_))}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def _code(dtype, what: str) -> str:
    try:
        return _CODES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"{what}: dtype {dtype!r} is not supported; valid: "
                         f"{', '.join(str(d) for d in _CODES)}") from None


def _bytes_of(array: np.ndarray) -> memoryview:
    # reshape(-1) first: numpy refuses to view a 0-d array with another itemsize.
    return memoryview(array.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_header(path: str, fd: int) -> tuple[dict, dict]:
    """``({name: (dtype, shape, absolute offset)}, __metadata__)`` of one safetensors file."""
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < length <= min(size - 8, _MAX_HEADER):
        raise ValueError(f"{path}: truncated or not a safetensors file ({size} bytes, header "
                         f"length {length})")
    try:
        header = json.loads(os.pread(fd, length, 8))
        metadata = header.pop("__metadata__", None) or {}
        entries, data_size = {}, size - 8 - length
        for name, info in header.items():
            dtype, shape = DTYPES.get(info["dtype"]), info["shape"]
            begin, end = info["data_offsets"]
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']!r}; supported: "
                                 f"{', '.join(DTYPES)}")
            if (not all(isinstance(n, int) and n >= 0 for n in shape) or not 0 <= begin <= end
                    or end - begin != math.prod(shape) * dtype.itemsize):
                raise ValueError(f"tensor {name!r}: data_offsets {[begin, end]} do not fit "
                                 f"shape {shape} of {info['dtype']}")
            if end > data_size:
                raise ValueError(f"truncated: tensor {name!r} ends at data byte {end} but only "
                                 f"{data_size} are present")
            entries[name] = (dtype, tuple(shape), 8 + length + begin)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: corrupt safetensors header ({type(err).__name__}: {err})") \
            from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return entries, metadata


def _weight_files(path: str) -> dict[str, list[str] | None]:
    """``{shard path: names the index assigns to it, or None for a single file}``."""
    if os.path.isfile(path):
        candidates = [path]
        if path.endswith(".safetensors"):
            return {path: None}
    else:
        single, index = (os.path.join(path, f) for f in (WEIGHTS_FILE, INDEX_FILE))
        if os.path.isfile(single):
            return {single: None}
        if os.path.isfile(index):
            with open(index) as file:
                try:
                    weight_map = json.load(file)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{index}: not a safetensors index ({err})") from None
            shards: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(os.path.join(path, os.path.basename(shard)), []).append(name)
            return shards
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} does not exist")
        candidates = [os.path.join(path, f) for f in sorted(os.listdir(path))]
    # Name the weights (pytorch_model.bin) rather than, say, training_args.bin.
    pickles = sorted((f for f in candidates if f.endswith(PICKLES)), key=lambda f: "model" not in f)
    if pickles:
        raise ValueError(f"{pickles[0]}: only safetensors checkpoints are read (pickle files can "
                         f"run code); convert it to {WEIGHTS_FILE}")
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists")


class Checkpoint:
    """A Hugging Face checkpoint directory (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``; a lone ``.safetensors`` file also works), read one tensor
    at a time. ``read`` is thread-safe, so :func:`read_ahead` may call it on a worker thread.

    ``names`` lists tensors in on-disk order (shard, then offset), the fastest to stream;
    ``config`` is the parsed ``config.json`` (None without one) and ``metadata`` the first
    file's ``__metadata__``.
    """

    def __init__(self, directory: str):
        self.directory = str(directory)
        self._fds: list[int] = []
        self._entries: dict[str, tuple[int, np.dtype, tuple, int, str]] = {}
        self.metadata: dict = {}
        config = os.path.join(self.directory, CONFIG_FILE)
        self.config = None
        if os.path.isfile(config):
            with open(config) as file:
                try:
                    self.config = json.load(file)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{config}: not JSON ({err})") from None
        try:
            for path, expected in _weight_files(self.directory).items():
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} is missing (holding {expected[0]!r})")
                fd = os.open(path, os.O_RDONLY)
                self._fds.append(fd)
                entries, metadata = _read_header(path, fd)
                self.metadata = self.metadata or metadata
                expected = set(entries if expected is None else expected)
                for name in expected - entries.keys():
                    raise ValueError(f"{path}: the index puts {name!r} here but the file lacks "
                                     f"it; closest: {', '.join(closest_paths(name, entries))}")
                for name, (dtype, shape, offset) in sorted(entries.items(), key=lambda e: e[1][2]):
                    if name in expected:
                        self._entries[name] = (fd, dtype, shape, offset, path)
        except BaseException:
            self.close()
            raise
        self.names = list(self._entries)

    def _entry(self, name: str):
        if name not in self._entries:
            raise ValueError(f"{self.directory}: no tensor {name!r}; closest: "
                             f"{', '.join(closest_paths(name, self.names))}")
        return self._entries[name]

    def shape(self, name: str) -> tuple:
        return self._entry(name)[2]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1]

    def specs(self) -> list[tuple[str, tuple, np.dtype]]:
        """``(name, shape, dtype)`` of every tensor, as :class:`CheckpointWriter` takes them."""
        return [(name, shape, dtype) for name, (_, dtype, shape, _, _) in self._entries.items()]

    def read(self, name: str) -> np.ndarray:
        """A fresh array holding tensor ``name`` (owned by the caller; nothing is cached)."""
        fd, dtype, shape, offset, path = self._entry(name)
        array = np.empty(shape, dtype)
        buffer, done = _bytes_of(array), 0
        while done < len(buffer):
            count = os.preadv(fd, [buffer[done:]], offset + done)
            if count == 0:
                raise ValueError(f"{path}: truncated while reading {name!r}")
            done += count
        return array

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_ahead(reads: Iterable[Callable[[], np.ndarray]], depth: int = 1) -> Iterator[np.ndarray]:
    """Yield each ``read()``'s result in order while the next ``depth`` reads run on a worker
    thread (``os.preadv`` and large numpy operations release the GIL, so I/O overlaps the
    merge). It holds at most ``depth`` results beyond the one the caller has, so the memory
    bound grows by ``depth`` tensors: drop each result before asking for the next."""
    pending: collections.deque = collections.deque()
    pool = ThreadPoolExecutor(1)
    try:
        for read in reads:
            pending.append(pool.submit(read))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # A caller that stops early must not wait for, or keep, reads it will never use.
        pending.clear()
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _discard(staging: str, files: list) -> None:
    for file in files:
        file.close()
    shutil.rmtree(staging, ignore_errors=True)


class CheckpointWriter:
    """Write a Hugging Face safetensors checkpoint tensor by tensor, atomically.

    ``specs`` lists ``(name, shape, dtype)`` in the order tensors will be written. Shards are
    planned upfront (a new shard starts when the next tensor would pass ``max_shard_bytes``;
    one shard is ``model.safetensors``, more are ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``). ``write`` streams each tensor to disk; ``commit`` adds
    the index and ``extra_files`` (``{file name: str | bytes | dict as JSON}``, e.g. config.json
    or tokenizer files), fsyncs (unless ``durable=False``), and moves the result to ``out_dir``.
    The rename alone already protects against a killed process; the fsyncs add protection
    against a power loss, at the disk's write speed (about 100 MB/s on the machine measured).

    Until ``commit`` everything lives in a hidden sibling ``.{name}.*.partial``: an exception
    (or leaving the ``with`` block without committing) deletes it; a killed process leaves it
    behind, never a loadable ``out_dir``. An existing ``out_dir`` (which must be empty or hold
    a checkpoint) stays intact until ``commit`` replaces it as a whole: one atomic swap where
    Linux allows it, otherwise two renames, between which ``out_dir`` is briefly absent and the
    old checkpoint is kept at ``.{name}.*.old``.
    """

    def __init__(self, out_dir: str, specs: Sequence[tuple[str, Sequence[int], object]], *,
                 max_shard_bytes: int = 5 * 10**9, metadata: Mapping[str, str] | None = None,
                 durable: bool = True):
        self.out_dir = os.path.abspath(out_dir)
        self.durable = durable
        if os.path.exists(self.out_dir) and not (
                os.path.isdir(self.out_dir) and (not os.listdir(self.out_dir) or any(
                    os.path.isfile(os.path.join(self.out_dir, f))
                    for f in (WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE)))):
            raise ValueError(f"{self.out_dir} exists and holds no checkpoint; refusing to "
                             f"replace it")
        self.metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError(f"metadata must map str to str, got {self.metadata!r}")
        self._specs, shard_bytes, self._shards = [], 0, [[]]
        for name, shape, dtype in specs:
            code, shape = _code(dtype, f"tensor {name!r}"), tuple(int(n) for n in shape)
            if min(shape, default=0) < 0:
                raise ValueError(f"tensor {name!r}: shape {list(shape)} has a negative size")
            nbytes = math.prod(shape) * DTYPES[code].itemsize
            self._specs.append((name, shape, DTYPES[code], code))
            if self._shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                self._shards.append([])
                shard_bytes = 0
            self._shards[-1].append(len(self._specs) - 1)
            shard_bytes += nbytes
        names = [spec[0] for spec in self._specs]
        if not names:
            raise ValueError(f"{self.out_dir}: specs list no tensors")
        if len(set(names)) != len(names):
            raise ValueError(f"specs name tensor {next(n for n in names if names.count(n) > 1)!r} "
                             f"twice; names must be distinct")
        count = len(self._shards)
        self.files = [WEIGHTS_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._shard_of = {i: s for s, members in enumerate(self._shards) for i in members}
        self._next = 0
        self._open: list = []  # the shard file being written (at most one)
        os.makedirs(os.path.dirname(self.out_dir), exist_ok=True)
        self._staging = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.",
                                         suffix=".partial", dir=os.path.dirname(self.out_dir))
        self._discard = weakref.finalize(self, _discard, self._staging, self._open)

    def _start_shard(self, shard: int) -> None:
        header, offset = {"__metadata__": self.metadata}, 0
        for index in self._shards[shard]:
            name, shape, dtype, code = self._specs[index]
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": code, "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned, as safetensors pads
        self._finish_shard()
        self._open.append(open(os.path.join(self._staging, self.files[shard]), "wb"))
        self._open[0].write(len(text).to_bytes(8, "little") + text)

    def _finish_shard(self) -> None:
        if self._open:
            file = self._open.pop()
            file.flush()
            if self.durable:
                os.fsync(file.fileno())
            file.close()

    def _check_open(self) -> None:
        if not self._discard.alive:
            raise ValueError(f"{self.out_dir}: the writer is closed (committed or aborted)")

    def write(self, name: str, array) -> None:
        """Append tensor ``name``; it must be the next in ``specs`` with that shape and dtype
        (no silent casts: cast explicitly before writing)."""
        self._check_open()
        if self._next == len(self._specs) or name != self._specs[self._next][0]:
            expected = self._specs[self._next][0] if self._next < len(self._specs) else "nothing"
            raise ValueError(f"write({name!r}): expected {expected!r} next (specs order)")
        _, shape, dtype, _ = self._specs[self._next]
        array = np.asarray(array)
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"write({name!r}): expected {dtype}{list(shape)}, got "
                             f"{array.dtype}{list(array.shape)}")
        shard = self._shard_of[self._next]
        if self._next == self._shards[shard][0]:
            self._start_shard(shard)
        self._open[0].write(_bytes_of(np.ascontiguousarray(array)))
        self._next += 1

    def commit(self, extra_files: Mapping[str, str | bytes | dict] | None = None) -> None:
        """Finish the checkpoint and move it to ``out_dir`` (replacing any old one)."""
        self._check_open()
        if self._next < len(self._specs):
            raise ValueError(f"commit: tensor {self._specs[self._next][0]!r} and "
                             f"{len(self._specs) - self._next - 1} more were never written")
        files = dict(extra_files or {})
        for name in files:
            if os.path.basename(name) != name or name in ("", ".", "..", INDEX_FILE, *self.files):
                raise ValueError(f"extra file {name!r} must be a plain file name other than "
                                 f"the weights' ({', '.join([*self.files, INDEX_FILE])})")
        self._finish_shard()
        if len(self.files) > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d, _ in self._specs)
            files[INDEX_FILE] = {"metadata": {"total_size": total}, "weight_map": {
                spec[0]: self.files[self._shard_of[i]] for i, spec in enumerate(self._specs)}}
        for name, content in files.items():
            if isinstance(content, Mapping):
                content = json.dumps(content, indent=2)
            with open(os.path.join(self._staging, name), "wb") as file:
                file.write(content.encode() if isinstance(content, str) else content)
                file.flush()
                if self.durable:
                    os.fsync(file.fileno())
        if self.durable:  # the entries must be durable before the rename publishes them
            _fsync_path(self._staging)
        parent = os.path.dirname(self.out_dir)
        if not os.path.exists(self.out_dir):
            os.rename(self._staging, self.out_dir)
        elif not _exchange(self._staging, self.out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.", suffix=".old",
                                   dir=parent)
            os.rename(self.out_dir, old)  # onto the empty directory mkdtemp made
            try:
                os.rename(self._staging, self.out_dir)
            except BaseException:
                os.rename(old, self.out_dir)
                raise
            self._staging = old
        if self.durable:
            _fsync_path(parent)
        # After a swap the staging path holds the old checkpoint: discard it.
        self._discard.detach()
        shutil.rmtree(self._staging, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written; ``out_dir`` is left as it was."""
        self._discard()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._discard.alive:
            self.abort()
            if exc_type is None:
                raise ValueError(f"{self.out_dir}: writer closed without commit(); nothing "
                                 f"was written")
