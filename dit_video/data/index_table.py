"""The sample index as flat arrays, and the file they are memory-mapped from.

index.py finds the samples of a shard set; this is how they are held. A list of SampleRef
dataclasses costs ~0.6 kB of Python objects a sample (6 GB per process for 10M WebVid clips),
and a forked DataLoader worker copies those pages one by one as reference counts change. A
ShardIndex keeps the same content in numpy arrays that are never written once built (~85 bytes
a sample of three members), so one file of them, memory-mapped, is shared through the page
cache by every rank and worker of a node (index_cache.py decides when and where):

    sample i        shard[i]                                   its file (into `shards`)
                    key_bytes[key_start[i]:key_start[i + 1]]   its key, utf-8
    its members m   member_start[i] <= m < member_start[i + 1], in tar order: extension
                    exts[member_ext[m]], member_size[m] bytes at member_offset[m] of the shard
    its size        size_rows[size_row[i]] = (status, width, height, frames, fps, is_image) from
                    its .json (SIZE_STATUS names the status), for bucketing; None until read

`samples` is a read-only sequence of SampleRef made on access (what MemberReader takes).

The file is data, never code: a fixed header (magic, JSON length, sha256 of the rest), a JSON
header naming each array's dtype, shape and offset, then the raw arrays, 64-byte aligned.
`open_index_file` checks all of it (the digest, every offset, every dtype and shape, and that
every member lies inside its shard as it is on disk now) and raises IndexFileError otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import stat
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FILE_FORMAT = "dit-video-index/1"
MAGIC = b"DVINDEX1"
_PREFIX = len(MAGIC) + 8 + 32  # magic, header length (uint64 little-endian), sha256 of everything after the prefix
_ALIGN = 64
MAX_HEADER_BYTES = 64 << 20  # the shard list of 100k shards is ~10 MB
# (status, width, height, frames, fps, is_image) per distinct size; status names, in code order:
SIZE_STATUS = ("ok", "no_bucket", "bad_json", "bad_meta")
SIZE_COLUMNS = 6
# Array name -> the dtypes it may have. Counts: N samples, K members, B key bytes, R size rows.
DTYPES = {
    "shard": ("<i4",), "key_start": ("<i8",), "key_bytes": ("|u1",), "member_start": ("<i8",),
    "member_ext": ("|u1", "<i4"), "member_offset": ("<i8",), "member_size": ("<i8",),
    "size_row": ("<i4",), "size_rows": ("<f8",),
}
SIZE_ARRAYS = ("size_row", "size_rows")
_CHECK_CHUNK = 1 << 20  # samples per step of the range checks: bounded temporaries at any N


class IndexFileError(ValueError):
    """An index file that cannot be used as it is (absent, stale, cut, corrupt or forged)."""


@dataclass(frozen=True)
class SampleRef:
    """One sample: its shard (index into ShardIndex.shards), key and members {ext: (offset, size)}."""

    shard: int
    key: str
    members: dict[str, tuple[int, int]]


class ShardIndex:
    """Every usable sample of a shard set, in shard order then tar order (the canonical order the
    epoch permutation is applied to), the structural skips found while scanning, and (once
    read) each sample's size metadata. Arrays as in the module docstring."""

    def __init__(self, shards: Sequence[str], arrays: Mapping[str, np.ndarray], exts: Sequence[str],
                 skipped_by_reason: Mapping[str, int], fingerprint: str, file: str | None = None):
        self.shards = list(shards)
        self.exts = list(exts)
        self.skipped_by_reason = Counter(skipped_by_reason)
        self._fingerprint = fingerprint
        self.file = file  # the index file the arrays are mapped from, None when in memory
        self._key, self._digest = None, None  # what the file answered and its sha256 (set by open_index_file)
        self.shard, self.key_start, self.key_bytes = arrays["shard"], arrays["key_start"], arrays["key_bytes"]
        self.member_start, self.member_ext = arrays["member_start"], arrays["member_ext"]
        self.member_offset, self.member_size = arrays["member_offset"], arrays["member_size"]
        self.size_row: np.ndarray | None = arrays.get("size_row")
        self.size_rows: np.ndarray | None = arrays.get("size_rows")

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def samples(self) -> _Samples:
        return _Samples(self)

    def key(self, i: int) -> str:
        return self.key_bytes[self.key_start[i]:self.key_start[i + 1]].tobytes().decode("utf-8")

    def ref(self, i: int) -> SampleRef:
        start, stop = int(self.member_start[i]), int(self.member_start[i + 1])
        spans = zip(self.member_ext[start:stop].tolist(), self.member_offset[start:stop].tolist(),
                    self.member_size[start:stop].tolist(), strict=True)
        return SampleRef(int(self.shard[i]), self.key(i), {self.exts[e]: (o, n) for e, o, n in spans})

    def fingerprint(self) -> str:
        """Short hash of (shard names, keys): a resumed run checks it still reads the same data."""
        return self._fingerprint

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name) for name in DTYPES}
        return {name: a for name, a in out.items() if a is not None}

    def __reduce__(self):
        # A spawned worker maps the same file again instead of receiving a copy of every array (its
        # parent hashed the file: the worker compares the stored digest, and re-checks the rest).
        if self.file is not None:
            return _reopen, (self.file, self._key, self.shards, dict(self.skipped_by_reason), self._digest)
        return ShardIndex, (self.shards, self.arrays(), self.exts, dict(self.skipped_by_reason), self._fingerprint)


class _Samples(Sequence):
    """index.samples[i] -> SampleRef, made on access (slices give lists)."""

    def __init__(self, index: ShardIndex):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._index.ref(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        return self._index.ref(i % n)

    def __iter__(self) -> Iterator[SampleRef]:
        return (self._index.ref(i) for i in range(len(self)))


class IndexBuilder:
    """Appends SampleRefs shard by shard into compact buffers (8 bytes per number, not a Python
    object each), hashing the fingerprint on the way; finish() gives the ShardIndex."""

    def __init__(self, shards: Sequence[str]):
        self.shards = list(shards)
        self.skipped_by_reason: Counter = Counter()
        self._shard, self._ext = array("i"), array("i")
        self._key_start, self._member_start = array("q", [0]), array("q", [0])
        self._offset, self._size = array("q"), array("q")
        self._keys = bytearray()
        self._ext_ids: dict[str, int] = {}
        self._hash = hashlib.sha256()

    def add(self, ref: SampleRef) -> None:
        self._shard.append(ref.shard)
        self._keys += ref.key.encode("utf-8")
        self._key_start.append(len(self._keys))
        for ext, (offset, size) in ref.members.items():
            self._ext.append(self._ext_ids.setdefault(ext, len(self._ext_ids)))
            self._offset.append(offset)
            self._size.append(size)
        self._member_start.append(len(self._offset))
        self._hash.update(f"{os.path.basename(self.shards[ref.shard])}/{ref.key}\n".encode())

    def extend(self, part: ShardIndex, shard: int) -> None:
        """Append every sample of `part`, the index of shard `shard` alone (built in another
        process): the same as add()ing its samples one by one."""
        ext_ids = np.array([self._ext_ids.setdefault(e, len(self._ext_ids)) for e in part.exts], np.int32)
        keys, starts = part.key_bytes.tobytes(), part.key_start.tolist()
        prefix = f"{os.path.basename(self.shards[shard])}/".encode()
        for a, b in zip(starts, starts[1:], strict=False):
            self._hash.update(prefix + keys[a:b] + b"\n")
        self._shard.frombytes(np.full(len(part), shard, np.int32).tobytes())
        self._key_start.frombytes((part.key_start[1:] + len(self._keys)).astype(np.int64).tobytes())
        self._keys += keys
        self._member_start.frombytes((part.member_start[1:] + len(self._offset)).astype(np.int64).tobytes())
        self._ext.frombytes(ext_ids[part.member_ext].astype(np.int32).tobytes())  # part's ext ids -> ours
        self._offset.frombytes(part.member_offset.astype(np.int64).tobytes())
        self._size.frombytes(part.member_size.astype(np.int64).tobytes())
        self.skipped_by_reason.update(part.skipped_by_reason)

    def finish(self) -> ShardIndex:
        ext_dtype = np.uint8 if len(self._ext_ids) <= 256 else np.int32  # a hostile shard may have many
        arrays = {
            "shard": np.array(self._shard, np.int32), "key_start": np.array(self._key_start, np.int64),
            "key_bytes": np.frombuffer(bytes(self._keys), np.uint8).copy(),
            "member_start": np.array(self._member_start, np.int64), "member_ext": np.array(self._ext, ext_dtype),
            "member_offset": np.array(self._offset, np.int64), "member_size": np.array(self._size, np.int64),
        }
        return ShardIndex(self.shards, arrays, list(self._ext_ids), self.skipped_by_reason, self._hash.hexdigest()[:16])


# ----------------------------------------------------------------------------- the file


def write_index_file(path: str | os.PathLike, index: ShardIndex, key: str) -> None:
    """Write `index` (and the cache `key` it answers) to `path` (write to a temporary name and
    rename: see index_cache.py)."""
    arrays = {name: np.ascontiguousarray(a, a.dtype.newbyteorder("<")) for name, a in index.arrays().items()}
    header = {"format": FILE_FORMAT, "key": key, "shards": [os.path.abspath(s) for s in index.shards],
              "exts": index.exts, "skipped_by_reason": dict(index.skipped_by_reason),
              "fingerprint": index.fingerprint()}
    table: dict = {}
    while True:  # the arrays start after the header, whose length depends on their offsets' digits
        offset, placed = _aligned(_PREFIX + len(_header_bytes(header, table))), {}
        for name, a in arrays.items():
            placed[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
            offset = _aligned(offset + a.nbytes)
        if placed == table:
            break
        table = placed
    head = _header_bytes(header, table)
    digest = hashlib.sha256(head)
    with open(path, "wb") as f:
        f.write(MAGIC + len(head).to_bytes(8, "little") + bytes(32) + head)
        for name, a in arrays.items():
            for data in (b"\0" * (table[name]["offset"] - f.tell()), a.data):
                f.write(data)
                digest.update(data)
        f.seek(len(MAGIC) + 8)
        f.write(digest.digest())


def _header_bytes(header: dict, table: dict) -> bytes:
    return json.dumps({**header, "arrays": table}, sort_keys=True).encode()


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def open_index_file(path: str | os.PathLike, key: str, shards: Sequence[str], shard_sizes: Sequence[int],
                    digest: bytes | None = None) -> ShardIndex:
    """The ShardIndex in `path`, its arrays read-only views of a shared memory map.

    Raises IndexFileError unless the file is a regular file of this user answering `key` for
    exactly `shards`, and its content is whole and consistent (see `_check`). `digest`: the
    digest a parent process already checked (a spawned worker then skips re-hashing)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exn:
        raise IndexFileError(f"cannot open it ({type(exn).__name__}: {exn.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise IndexFileError("not a regular file of this user")
        if st.st_size < _PREFIX:
            raise IndexFileError(f"{st.st_size} bytes, shorter than its fixed header")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    if mm[:len(MAGIC)] != MAGIC:
        raise IndexFileError("not an index file (wrong magic bytes)")
    stored = mm[len(MAGIC) + 8:_PREFIX]
    if digest is not None and stored != digest:
        raise IndexFileError("replaced since its parent process opened it")
    if digest is None and hashlib.sha256(memoryview(mm)[_PREFIX:]).digest() != stored:
        raise IndexFileError("its content does not match its sha256 (cut or corrupt)")
    header = _read_header(mm)
    if header.get("format") != FILE_FORMAT or header.get("key") != key:
        raise IndexFileError("built by other code or for other shards (format or key differs)")
    if header.get("shards") != [os.path.abspath(s) for s in shards]:
        raise IndexFileError("lists other shards")
    arrays = _map_arrays(mm, header.get("arrays"))
    exts, skips, fingerprint = header.get("exts"), header.get("skipped_by_reason"), header.get("fingerprint")
    if not (isinstance(exts, list) and all(isinstance(e, str) for e in exts) and len(set(exts)) == len(exts)):
        raise IndexFileError("its extension table is not a list of distinct names")
    if not (isinstance(skips, dict) and all(isinstance(v, int) and v > 0 for v in skips.values())):
        raise IndexFileError("its skip counts are not positive integers")
    if not (isinstance(fingerprint, str) and len(fingerprint) == 16 and set(fingerprint) <= set("0123456789abcdef")):
        raise IndexFileError("its fingerprint is not 16 hex digits")
    index = ShardIndex(shards, arrays, exts, skips, fingerprint, file=os.fspath(path))
    index._key, index._digest = key, stored
    problem = _check(index, shard_sizes)
    if problem:
        raise IndexFileError(problem)
    return index


def _reopen(path: str, key: str, shards: list[str], skipped_by_reason: dict, digest: bytes) -> ShardIndex:
    index = open_index_file(path, key, shards, [os.stat(s).st_size for s in shards], digest=digest)
    index.skipped_by_reason = Counter(skipped_by_reason)
    return index


def _read_header(mm) -> dict:
    length = int.from_bytes(mm[len(MAGIC):len(MAGIC) + 8], "little")
    if length > MAX_HEADER_BYTES or _PREFIX + length > len(mm):
        raise IndexFileError(f"its header claims {length} bytes")
    try:
        header = json.loads(bytes(mm[_PREFIX:_PREFIX + length]).decode("utf-8"))
    except (ValueError, RecursionError) as exn:  # UnicodeDecodeError is a ValueError
        raise IndexFileError(f"its header is not JSON ({type(exn).__name__})") from None
    if not isinstance(header, dict):
        raise IndexFileError("its header is not a JSON object")
    return header


def _map_arrays(mm: mmap.mmap, table) -> dict[str, np.ndarray]:
    """Read-only arrays over `mm` as `table` places them, after checking every field of it."""
    if not isinstance(table, dict) or not set(DTYPES) - set(SIZE_ARRAYS) <= set(table) <= set(DTYPES):
        raise IndexFileError("its array table names other arrays")
    if (("size_row" in table) != ("size_rows" in table)):
        raise IndexFileError("it has half of the size arrays")
    arrays, spans = {}, []
    for name, entry in table.items():
        if not (isinstance(entry, dict) and entry.get("dtype") in DTYPES[name] and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("offset"), int) and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
                and len(entry["shape"]) == (2 if name == "size_rows" else 1)):
            raise IndexFileError(f"array {name!r}: bad dtype, shape or offset")
        dtype, shape, offset = np.dtype(entry["dtype"]), tuple(entry["shape"]), entry["offset"]
        nbytes = math.prod(shape) * dtype.itemsize
        if offset % _ALIGN or offset < _PREFIX or offset + nbytes > len(mm):
            raise IndexFileError(f"array {name!r} lies outside the file")
        spans.append((offset, offset + nbytes))
        arrays[name] = np.frombuffer(mm, dtype, math.prod(shape), offset).reshape(shape)
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        raise IndexFileError("two of its arrays overlap")
    return arrays


def _check(index: ShardIndex, shard_sizes: Sequence[int]) -> str | None:
    """What makes `index` unusable for shards of these sizes, or None: counts that disagree,
    starts that go backwards, ids out of range, members outside their shard as it is now."""
    n, k = len(index), len(index.member_offset)
    if len(index.key_start) != n + 1 or len(index.member_start) != n + 1:
        return "its start arrays do not have one entry per sample plus one"
    if len(index.member_ext) != k or len(index.member_size) != k:
        return "its member arrays differ in length"
    for name, starts, total in (("key", index.key_start, len(index.key_bytes)), ("member", index.member_start, k)):
        if starts[0] != 0 or starts[-1] != total or (np.diff(starts) < (1 if name == "member" else 0)).any():
            return f"its {name} starts are not increasing from 0 to the {name} count"
    # Keys are utf-8 text: no key may start inside a character (the digest vouches for the rest).
    firsts = index.key_start[:-1][np.diff(index.key_start) > 0]
    if len(firsts) and ((index.key_bytes[firsts] & 0xC0) == 0x80).any():
        return "a key starts inside a utf-8 character"
    sizes = np.asarray(shard_sizes, np.int64)  # [S]
    if n and (index.shard.min() < 0 or index.shard.max() >= len(sizes) or (np.diff(index.shard) < 0).any()):
        return "its shard ids are out of range or out of shard order"
    if k and (index.member_ext.min() < 0 or index.member_ext.max() >= len(index.exts)):
        return "its extension ids are out of range"
    for lo in range(0, n, _CHECK_CHUNK):
        hi = min(n, lo + _CHECK_CHUNK)
        m0, m1 = int(index.member_start[lo]), int(index.member_start[hi])
        offset, size = index.member_offset[m0:m1], index.member_size[m0:m1]
        shard_of = np.repeat(index.shard[lo:hi], np.diff(index.member_start[lo:hi + 1]))  # [members in the chunk]
        if (offset < 0).any() or (size < 0).any() or (offset + size > sizes[shard_of]).any():
            return "a member lies outside its shard (was the shard rewritten?)"
    if index.size_row is not None:
        rows = index.size_rows
        if rows.shape[1] != SIZE_COLUMNS or len(index.size_row) != n:
            return "its size arrays have the wrong shape"
        if n and (index.size_row.min() < 0 or index.size_row.max() >= len(rows)):
            return "its size rows are out of range"
        if not np.isfinite(rows).all() or not np.isin(rows[:, 0], np.arange(len(SIZE_STATUS))).all():
            return "its size rows hold values no .json gives"
    return None
