"""The online path: read a user's and candidate movies' feature rows straight from Feast's Redis.

``reelrank materialize`` (or Feast's own ``materialize``) leaves one Redis hash per entity in
Feast's layout, ``entity_key_serialization_version`` 3:

* key: the serialized entity key followed by the project name. For one int64 join key that is
  ``u32 1 | u32 2 (STRING) | u32 len(join_key) | join_key | u32 4 (INT64) | u32 8 | i64 id``,
  all little-endian;
* fields: the 4-byte little-endian murmur3 (x86, 32 bit, seed 0) of ``"<view>:<feature>"``,
  plus ``"_ts:<view>"`` holding the row's event time;
* values: serialized ``feast.types.Value`` messages. Ours use four shapes only: ``float_val``
  (``0x35`` + float32), ``float_list_val`` (``0x82 0x01`` + length + packed float32),
  ``int64_list_val`` (``0x72`` + length + packed varints) and ``string_val`` (``0x12`` +
  length + UTF-8); a null scalar (NaN in the tables) is empty. Lists have a fixed length
  (embeddings, genre flags) or any length (the user's history).

:class:`OnlineFeatureReader` fetches only the fields the model needs for the user and every
candidate in one pipelined round trip and decodes each field of all rows at once with numpy,
without importing Feast (which costs seconds and hundreds of MB per process). Tests check the
layout and the codec against Feast's own helpers and protobuf's parser.

Every row carries the model version that produced it and every read checks it, together with
the project's ``reelrank:<project>:version`` record that materialization writes last, so rows
of two training runs are never mixed in one ranking.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mmh3
import numpy as np
import redis

from ranker.redis_url import DEFAULT_REDIS_URL, redact
from ranker.redis_url import validate as validate_url
from training.errors import ReelrankError
from training.features import ScoringConstants, build_matrix

_log = logging.getLogger(__name__)

# Feast feature view per entity table, and the string feature that names the rows' model version.
VIEWS = {"user": "user_features", "movie": "movie_features"}
VERSION_FEATURES = {"user": "user_model_version", "movie": "movie_model_version"}

_FLOAT_TAG = 0x35  # Value.float_val: field 6, wire type 5 (fixed32)
_FLOAT_LIST_TAG = b"\x82\x01"  # Value.float_list_val: field 16, wire type 2
_PACKED_TAG = b"\x0a"  # FloatList.val: field 1, packed
_INT64_LIST_TAG = b"\x72"  # Value.int64_list_val: field 14, wire type 2
_STRING_TAG = b"\x12"  # Value.string_val: field 2, wire type 2
_SCALAR = np.dtype([("tag", "u1"), ("value", "<f4")])  # one encoded float_val, 5 bytes
# How far past its deadline a deadline-bounded read may wait; see OnlineFeatureReader._send_by.
_TIMEOUT_SLACK_S = 0.001


class OnlineStoreError(ReelrankError):
    """The online store cannot give the features a request needs."""


class OnlineStoreUnavailable(OnlineStoreError):
    """Redis is unreachable, refused the login or did not answer in time."""


class StaleFeatures(OnlineStoreError):
    """The online store holds features of another model version than the one scoring."""


class CorruptFeatures(OnlineStoreError):
    """A stored row is not in the layout this reader expects."""


class OnlineStoreTimeout(OnlineStoreUnavailable):
    """Redis did not answer within the time the read was given."""


def check_reachable(redis_url: str, timeout_s: float = 2.0) -> None:
    """Raise :class:`OnlineStoreUnavailable`, naming the URL without password, unless Redis
    at ``redis_url`` answers a PING within ``timeout_s``."""
    url = validate_url(redis_url)
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as error:
        raise OnlineStoreUnavailable(
            f"online store {redact(url)} is unreachable: {error}"
        ) from None
    finally:
        client.close()


def metadata_key(project: str, name: str) -> bytes:
    """Key of a reelrank bookkeeping hash (``version`` or ``pending``) for ``project``."""
    return f"reelrank:{project}:{name}".encode()


def field_hash(view: str, feature: str) -> bytes:
    """Feast's Redis hash field for ``view:feature``: murmur3 x86_32, little-endian."""
    return mmh3.hash(f"{view}:{feature}", signed=False).to_bytes(4, "little")


def entity_key_head(join_key: str) -> bytes:
    """Serialized int64 entity key up to, not including, the 8 id bytes."""
    name = join_key.encode()
    return struct.pack("<III", 1, 2, len(name)) + name + struct.pack("<II", 4, 8)


def encode_floats(values: np.ndarray) -> np.ndarray:
    """``float_val`` messages for a ``(n,)`` array: ``(n, 5)`` uint8. NaN is NOT made null."""
    encoded = np.empty(len(values), dtype=_SCALAR)
    encoded["tag"] = _FLOAT_TAG
    encoded["value"] = values
    return encoded.view(np.uint8).reshape(len(values), _SCALAR.itemsize)


def float_list_header(width: int) -> bytes:
    """The bytes before the packed floats of a ``float_list_val`` of ``width`` values."""
    if width < 1:
        raise ValueError(f"array fields need a width of at least 1, not {width}")
    payload = 4 * width
    inner = _PACKED_TAG + _varint(payload)
    return _FLOAT_LIST_TAG + _varint(len(inner) + payload) + inner


def encode_float_lists(values: np.ndarray) -> np.ndarray:
    """``float_list_val`` messages for a ``(n, width)`` array: ``(n, header + 4 * width)`` uint8."""
    n, width = values.shape
    header = np.frombuffer(float_list_header(width), dtype=np.uint8)
    floats = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(n, 4 * width)
    return np.concatenate([np.broadcast_to(header, (n, len(header))), floats], axis=1)


# The codec's name for the shape of a list field of any length, by element type; a scalar's
# shape is None and a fixed-length array's its width.
FLOAT_LIST = "float32[]"
INT64_LIST = "int64[]"
_LIST_TAGS = {FLOAT_LIST: _FLOAT_LIST_TAG, INT64_LIST: _INT64_LIST_TAG}
_LIST_DTYPES = {FLOAT_LIST: np.float32, INT64_LIST: np.int64}


def field_shape(spec: Mapping) -> int | str | None:
    """The codec shape of a field described in the manifest: None, a width or a list kind."""
    if spec.get("variable"):
        return INT64_LIST if spec.get("dtype") == "int64" else FLOAT_LIST
    return spec["width"]


def encode_lists(flat: np.ndarray, offsets: np.ndarray, shape: str) -> list[bytes]:
    """``float_list_val`` or ``int64_list_val`` messages of lists of any length: row ``i``
    holds ``flat[offsets[i]:offsets[i + 1]]``. An empty list is an empty message."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if shape == FLOAT_LIST:
        payload = np.ascontiguousarray(flat, dtype="<f4").tobytes()
        ends = 4 * offsets
    else:
        payload, sizes = _encode_varints(np.asarray(flat, dtype=np.int64))
        ends = np.concatenate([[0], np.cumsum(sizes)])[offsets]
    tag = _LIST_TAGS[shape]
    headers: dict[int, bytes] = {}
    values = []
    for start, stop in zip(ends[:-1].tolist(), ends[1:].tolist()):
        size = stop - start
        header = headers.get(size)
        if header is None:
            inner = _PACKED_TAG + _varint(size) if size else b""
            header = headers[size] = tag + _varint(len(inner) + size) + inner
        values.append(header + payload[start:stop])
    return values


def encode_list(values: np.ndarray, shape: str) -> bytes:
    """One row's list message; see :func:`encode_lists`."""
    return encode_lists(values, np.array([0, len(values)]), shape)[0]


def decode_list(value: bytes, shape: str) -> np.ndarray | None:
    """The values of one list message (an empty or null value is an empty list); None when
    ``value`` is not such a message."""
    dtype = _LIST_DTYPES[shape]
    if not value:
        return np.zeros(0, dtype)
    tag = _LIST_TAGS[shape]
    if not value.startswith(tag):
        return None
    length, start = _read_varint(value, len(tag))
    if start + length != len(value):
        return None
    if length == 0:
        return np.zeros(0, dtype)
    if value[start : start + 1] != _PACKED_TAG:
        return None
    size, start = _read_varint(value, start + 1)
    payload = value[start:]
    if size != len(payload):
        return None
    if shape == FLOAT_LIST:
        if size % 4:
            return None
        return np.frombuffer(payload, dtype="<f4").astype(np.float32)
    return _decode_varints(payload)


def _encode_varints(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Protobuf varints of int64 ``values`` (negative ones take 10 bytes, as protobuf writes
    them) concatenated, and each value's size in bytes."""
    unsigned = values.view(np.uint64)
    sizes = np.ones(len(values), dtype=np.int64)
    for group in range(1, 10):
        sizes += unsigned >= np.uint64(1 << (7 * group))
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((unsigned[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    position = np.arange(10)[None, :]
    groups |= (position < sizes[:, None] - 1).astype(np.uint8) << 7
    return groups[position < sizes[:, None]].tobytes(), sizes


def _decode_varints(payload: bytes) -> np.ndarray | None:
    """int64 values of concatenated varints; None when the bytes do not end a varint."""
    data = np.frombuffer(payload, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    if not len(ends) or ends[-1] != len(data) - 1:
        return None
    starts = np.concatenate([[0], ends[:-1] + 1])
    sizes = ends - starts + 1
    if sizes.max() > 10:
        return None
    place = np.arange(len(data)) - np.repeat(starts, sizes)
    parts = (data & 0x7F).astype(np.uint64) << (place.astype(np.uint64) * np.uint64(7))
    return np.add.reduceat(parts, starts).view(np.int64)


def encode_string(text: str) -> bytes:
    """A ``string_val`` message."""
    data = text.encode()
    return _STRING_TAG + _varint(len(data)) + data


def decode_string(value: bytes) -> str:
    """Inverse of :func:`encode_string`; a readable stand-in if ``value`` is something else."""
    if value[:1] == _STRING_TAG:
        length, start = _read_varint(value, 1)
        if start + length == len(value):
            return value[start:].decode(errors="replace")
    return f"<unreadable {value[:16]!r}>"


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low = number & 0x7F
        number >>= 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(data: bytes, start: int) -> tuple[int, int]:
    number, shift, position = 0, 0, start
    while position < len(data):
        byte = data[position]
        number |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return number, position
        shift += 7
    return -1, position


@dataclass(frozen=True)
class OnlineStoreConfig:
    """Where the online store is and how long to wait for it."""

    redis_url: str = DEFAULT_REDIS_URL
    """``redis://[:password@]host:port/db``; ``rediss://`` for TLS."""
    project: str = "reelrank"
    """Feast project whose rows to read; the suffix of every key."""
    socket_timeout_s: float = 1.0
    """Longest wait for one reply before Redis counts as unavailable."""
    connect_timeout_s: float = 1.0
    """Longest wait to open a connection."""
    max_connections: int = 16
    """Connections kept in the pool; concurrent readers beyond this wait for one (at most
    ``socket_timeout_s``, whatever a read's own timeout)."""
    movie_cache_rows: int = 0
    """Movie rows kept in memory after a read checked their model version, so later reads
    fetch only the user row and the store's version record; 0 reads every row every time.
    See :class:`MovieRowCache` for why this cannot serve another version's rows."""


@dataclass
class OnlineRows:
    """Feature rows of one user and ``n`` candidate movies, ready for :func:`build_matrix`."""

    user: dict[str, np.ndarray]
    """Each user field: float32, shape ``(1,)`` or ``(1, width)``."""
    movies: dict[str, np.ndarray]
    """Each movie field: float32, shape ``(n,)`` or ``(n, width)``, in ``movie_ids`` order."""
    user_found: bool
    """False when the user has no row, so the defaults (cold start) were used."""
    movie_found: np.ndarray
    """``(n,)`` bool; False where a movie has no row and got the defaults."""


class ViewLayout:
    """Feast's Redis layout of one feature view in one project, computed once."""

    def __init__(
        self,
        entity: str,
        join_key: str,
        fields: Sequence[tuple[str, int | None]],
        project: str,
    ):
        self.entity = entity
        self.view = VIEWS[entity]
        self.join_key = join_key
        self.fields = list(fields)
        self.project = project
        self.field_hashes = [field_hash(self.view, name) for name, _ in self.fields]
        self.version_hash = field_hash(self.view, VERSION_FEATURES[entity])
        self.timestamp_field = f"_ts:{self.view}".encode()
        self.key_head = entity_key_head(join_key)
        self.key_tail = project.encode()
        self.key_length = len(self.key_head) + 8 + len(self.key_tail)

    def keys(self, ids: np.ndarray) -> list[bytes]:
        """Redis keys of ``ids`` (int64)."""
        template = self.key_head + bytes(8) + self.key_tail
        blob = _stamp_ids(template, len(self.key_head), ids)
        width = self.key_length
        return [blob[i * width : (i + 1) * width] for i in range(len(ids))]

    def owned_keys(self, keys: Sequence[bytes]) -> tuple[list[bytes], np.ndarray]:
        """The keys among ``keys`` that hold rows of this view's entity in this project, and
        their ids. Key patterns cannot tell ``project`` from a longer name ending in it."""
        head, tail, length = self.key_head, self.key_tail, self.key_length
        owned = [k for k in keys if len(k) == length and k.startswith(head) and k.endswith(tail)]
        start = len(head)
        ids = np.array([struct.unpack_from("<q", k, start)[0] for k in owned], dtype=np.int64)
        return owned, ids

    def hmget_template(self, hashes: Sequence[bytes]) -> tuple[bytes, int]:
        """RESP-encoded ``HMGET key *hashes`` with a zero id, and the offset of the id bytes;
        :func:`_stamp_ids` turns it into the commands for any ids."""
        head = b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n" % (2 + len(hashes), self.key_length)
        tail = b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(h), h) for h in hashes)
        command = head + self.key_head + bytes(8) + self.key_tail + tail
        return command, len(head) + len(self.key_head)


def _stamp_ids(template: bytes, offset: int, ids: np.ndarray) -> bytes:
    """``template`` repeated once per id with the id's 8 little-endian bytes at ``offset``."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    rows = np.tile(np.frombuffer(template, dtype=np.uint8), (len(ids), 1))
    rows[:, offset : offset + 8] = ids.view(np.uint8).reshape(len(ids), 8)
    return rows.tobytes()


class _TableCodec:
    """Decodes the fields of one entity table from HMGET replies, defaults filled in."""

    def __init__(self, layout: ViewLayout, defaults: Mapping[str, np.ndarray], version: str):
        self.layout = layout
        self.version = version
        self.version_value = encode_string(version)
        self.hashes = [*layout.field_hashes, layout.version_hash]
        self.command, self.id_offset = layout.hmget_template(self.hashes)
        self.defaults: list[bytes] = []
        self.null_value: list[bytes] = []
        for name, width in layout.fields:
            if isinstance(width, str):
                self.defaults.append(encode_list(np.zeros(0, _LIST_DTYPES[width]), width))
                self.null_value.append(b"")
                continue
            default = np.asarray(defaults[name], dtype=np.float32)
            if width is None:
                self.defaults.append(encode_floats(default.reshape(1)).tobytes())
                nan = encode_floats(np.array([np.nan], dtype=np.float32)).tobytes()
                self.null_value.append(nan)
            else:
                if default.shape != (width,):
                    raise OnlineStoreError(
                        f"manifest default of {name} has shape {default.shape}, not ({width},)"
                    )
                self.defaults.append(encode_float_lists(default.reshape(1, width)).tobytes())
                self.null_value.append(b"")

    def commands(self, ids: np.ndarray) -> bytes:
        """The pipelined HMGETs of the rows of ``ids``."""
        return _stamp_ids(self.command, self.id_offset, ids)

    def decode(self, replies: list, ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        n = len(replies)
        columns = list(zip(*replies)) if n else [()] * len(self.hashes)
        versions = columns[-1]
        found = np.fromiter((v is not None for v in versions), dtype=bool, count=n)
        self._check_versions(versions, ids)

        n_missing = n - int(found.sum())
        rows = {}
        for i, (name, width) in enumerate(self.layout.fields):
            column = columns[i]
            if column.count(None) != n_missing:
                row = next(j for j in range(n) if found[j] == (column[j] is None))
                raise CorruptFeatures(
                    f"the row of {self.layout.entity} {ids[row]} in project "
                    f"{self.layout.project} has {name} or its model version but not both; "
                    "materialize the model version again"
                )
            default, null = self.defaults[i], self.null_value[i]
            if n_missing or (width is None and b"" in column):
                column = [default if v is None else (v or null) for v in column]
            rows[name] = self._decode_field(name, width, column, ids)
        return rows, found

    def _check_versions(self, versions: tuple, ids: np.ndarray) -> None:
        if set(versions) <= {None, self.version_value}:
            return
        row = next(j for j, v in enumerate(versions) if v is not None and v != self.version_value)
        raise StaleFeatures(
            f"{self.layout.entity} {ids[row]} has features of model version "
            f"{decode_string(versions[row])} in project {self.layout.project}, but the model "
            f"is version {self.version}; materialize {self.version} or serve the model that "
            "matches the store"
        )

    def _decode_field(self, name, width, column, ids) -> np.ndarray:
        if isinstance(width, str):
            return self._decode_lists(name, width, column, ids)
        n = len(column)
        blob = b"".join(column)
        if width is None:
            if len(blob) == n * _SCALAR.itemsize:
                encoded = np.frombuffer(blob, dtype=_SCALAR)
                if (encoded["tag"] == _FLOAT_TAG).all():
                    return encoded["value"].astype(np.float32)
            expected = None
        else:
            header = float_list_header(width)
            size = len(header) + 4 * width
            if len(blob) == n * size:
                encoded = np.frombuffer(blob, dtype=np.uint8).reshape(n, size)
                if (encoded[:, : len(header)] == np.frombuffer(header, np.uint8)).all():
                    floats = np.ascontiguousarray(encoded[:, len(header) :])
                    return floats.view("<f4").astype(np.float32, copy=False)
            expected = header
        row = next(j for j, v in enumerate(column) if not _looks_like(v, width, expected))
        raise CorruptFeatures(
            f"{self.layout.entity} {ids[row]}: stored {name} is not a float32 "
            f"{'scalar' if width is None else f'array of {width}'} ({column[row][:12]!r}...); "
            "the store holds rows of another layout or embedding width"
        )

    def _decode_lists(self, name, shape: str, column, ids) -> np.ndarray:
        """A list field, one row at a time (only the one user of a request has lists)."""
        lists = np.empty(len(column), dtype=object)
        for row, value in enumerate(column):
            decoded = decode_list(value, shape)
            if decoded is None:
                raise CorruptFeatures(
                    f"{self.layout.entity} {ids[row]}: stored {name} is not a list of "
                    f"{shape[:-2]} ({value[:12]!r}...); the store holds rows of another layout"
                )
            lists[row] = decoded
        return lists


def _looks_like(value: bytes, width: int | None, header: bytes | None) -> bool:
    if width is None:
        return len(value) == _SCALAR.itemsize and value[0] == _FLOAT_TAG
    return len(value) == len(header) + 4 * width and value.startswith(header)


class MovieRowCache:
    """Decoded movie rows of ONE model version, filled from reads of the online store.

    Rows of a model version never change (the version id is a hash of the model and its
    tables), so a row read once, and checked to carry ``version``, is the row of that version
    for good. The cache is created by, and only consulted by, the reader of that version, and
    that reader still reads the store's version record and the user row on every request in
    one round trip: once the store holds another version, every read fails with
    :class:`StaleFeatures` before a cached row is used, and a reader of another version has a
    cache of its own. Movies without a row are not cached. At ``capacity`` rows the cache stops
    growing; further movies are read from Redis every time.
    """

    def __init__(self, version: str, fields: Sequence[tuple[str, int | None]], capacity: int):
        self.version = version
        self.capacity = capacity
        self._fields = list(fields)
        self._index: dict[int, int] = {}
        # The cached ids, sorted, and their rows: replaced as one tuple on every add, so a
        # lookup without the lock sees one consistent pair.
        self._sorted: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._columns = {
            name: np.empty((0,) if width is None else (0, width), np.float32)
            for name, width in self._fields
        }
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def positions(self, movie_ids: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 row of each id in the cache, -1 where it is not cached."""
        ids, rows = self._sorted
        if not len(ids):
            return np.full(len(movie_ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(ids, movie_ids), len(ids) - 1)
        return np.where(ids[at] == movie_ids, rows[at], -1)

    def gather(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The cached rows at ``positions`` (all >= 0), per field."""
        with self._lock:
            return {name: column[positions] for name, column in self._columns.items()}

    def add(self, movie_ids: np.ndarray, rows: Mapping[str, np.ndarray], version: str) -> None:
        """Keep the rows of ``movie_ids`` (found, checked to be of ``version``)."""
        if version != self.version:
            raise ValueError(f"rows of version {version} offered to the cache of {self.version}")
        with self._lock:
            fresh = [j for j, i in enumerate(movie_ids.tolist()) if i not in self._index][
                : max(0, self.capacity - len(self._index))
            ]
            if not fresh:
                return
            start = len(self._index)
            for offset, j in enumerate(fresh):
                self._index[int(movie_ids[j])] = start + offset
            for name in self._columns:
                self._columns[name] = np.concatenate([self._columns[name], rows[name][fresh]])
            ids = np.fromiter(self._index, dtype=np.int64, count=len(self._index))
            order = np.argsort(ids)
            self._sorted = (ids[order], order.astype(np.int64))


class OnlineFeatureReader:
    """Reads feature rows of one model version from Redis for the online scoring path.

    ``manifest`` is the artifacts manifest of the model being served
    (:func:`training.artifacts.read_manifest`): it fixes the fields, their widths, the default
    rows for unknown entities and the model version every row must carry. Safe to share
    between threads; each read borrows one pooled connection.
    """

    def __init__(self, config: OnlineStoreConfig, manifest: dict):
        self.config = config
        self.url = validate_url(config.redis_url)
        self.model_version = manifest["model_version"]
        self.constants = ScoringConstants(**manifest["constants"])

        self._codecs = {}
        for entity in ("user", "movie"):
            table = manifest["tables"][entity]
            fields = [(f["name"], field_shape(f)) for f in table["fields"]]
            layout = ViewLayout(entity, table["key"], fields, config.project)
            self._codecs[entity] = _TableCodec(layout, table["defaults"], self.model_version)
        self.movie_cache: MovieRowCache | None = None
        if config.movie_cache_rows > 0:
            self.movie_cache = MovieRowCache(
                self.model_version, self._codecs["movie"].layout.fields, config.movie_cache_rows
            )
        self._version_key = metadata_key(config.project, "version")
        self._version_query = b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s\r\n$13\r\nmodel_version\r\n" % (
            len(self._version_key),
            self._version_key,
        )

        self._pool = redis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=config.max_connections,
            timeout=config.socket_timeout_s,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
        )
        self._client = redis.Redis(connection_pool=self._pool)

    @staticmethod
    def redacted_url(url: str) -> str:
        """``url`` with its password hidden."""
        return redact(url)

    def read(
        self,
        user_id: int,
        movie_ids: np.ndarray,
        timeout_s: float | None = None,
    ) -> OnlineRows:
        """Rows of ``user_id`` and of each of ``movie_ids``; unknown ids get the default rows.

        ``timeout_s`` bounds the wait for Redis' replies to this read (a caller's remaining
        deadline); None waits up to ``socket_timeout_s`` per reply. Raises
        :class:`StaleFeatures` if the store holds another model version,
        :class:`OnlineStoreTimeout` if Redis does not answer in time and
        :class:`OnlineStoreUnavailable` if it cannot be reached.
        """
        user_ids = np.array([user_id], dtype=np.int64)
        user_rows, user_found, movie_rows, movie_found = self._read(user_ids, movie_ids, timeout_s)
        return OnlineRows(user_rows, movie_rows, bool(user_found[0]), movie_found)

    def read_user(self, user_id: int, timeout_s: float | None = None) -> tuple:
        """The stored fields of ``user_id``'s row as Redis returned them (bytes, or None
        where absent; the model-version field last), with the store's version record checked
        in the same round trip as in :meth:`read`. :meth:`decode_user` turns them into a row.

        The same bytes always decode to the same row, so they can key what is derived from the
        row (see ``ranker.service.UserContextCache``)."""
        users = self._codecs["user"]
        request = self._version_query + users.commands(np.array([user_id], dtype=np.int64))
        replies = self._round_trip(request, 2, timeout_s)
        self._check_store_version(replies[0])
        return tuple(replies[1])

    def decode_user(self, user_id: int, stored: tuple) -> tuple[dict[str, np.ndarray], bool]:
        """The row of :meth:`read_user`'s ``stored`` fields (defaults when the user has no
        row) and whether it had one; raises as :meth:`read` does for a malformed row."""
        rows, found = self._codecs["user"].decode([stored], np.array([user_id], dtype=np.int64))
        return rows, bool(found[0])

    def read_movies(
        self,
        movie_ids: np.ndarray,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Rows of ``movie_ids`` (defaults where missing) and which have a row, as in
        :meth:`read`. With every row cached there is no round trip at all: the rows were
        checked when they were cached, and a request reads the store's version record with
        its user row first."""
        movie_ids = np.asarray(movie_ids, dtype=np.int64).reshape(-1)
        cache = self.movie_cache
        if cache is not None and len(movie_ids):
            positions = cache.positions(movie_ids)
            if (positions >= 0).all():
                return cache.gather(positions), np.ones(len(movie_ids), dtype=bool)
        _, _, rows, found = self._read(np.zeros(0, np.int64), movie_ids, timeout_s)
        return rows, found

    def _read(self, user_ids: np.ndarray, movie_ids: np.ndarray, timeout_s: float | None):
        """The version record, the user rows and the movie rows in one round trip; movie rows
        of this version come from the cache where it holds them."""
        movie_ids = np.asarray(movie_ids, dtype=np.int64).reshape(-1)
        users, movies = self._codecs["user"], self._codecs["movie"]
        cache = self.movie_cache
        positions = cache.positions(movie_ids) if cache is not None else None
        missed = movie_ids if positions is None else movie_ids[positions < 0]
        request = self._version_query + users.commands(user_ids) + movies.commands(missed)

        n_users = len(user_ids)
        replies = self._round_trip(request, 1 + n_users + len(missed), timeout_s)
        self._check_store_version(replies[0])
        user_rows, user_found = users.decode(replies[1 : 1 + n_users], user_ids)
        missed_rows, missed_found = movies.decode(replies[1 + n_users :], missed)
        if cache is None:
            return user_rows, user_found, missed_rows, missed_found

        # The store's version record and the rows just read are this reader's version (both
        # checked above), so they may join the cache of that version.
        found_rows = {name: values[missed_found] for name, values in missed_rows.items()}
        cache.add(missed[missed_found], found_rows, self.model_version)
        movie_rows, movie_found = _merge(positions, cache, missed_rows, missed_found)
        return user_rows, user_found, movie_rows, movie_found

    def features(
        self,
        user_id: int,
        movie_ids: np.ndarray,
        timeout_s: float | None = None,
    ) -> tuple[np.ndarray, OnlineRows]:
        """The scoring matrix ``(n, n_features)`` for the user and movies, and the rows;
        ``timeout_s`` as in :meth:`read`."""
        rows = self.read(user_id, movie_ids, timeout_s)
        return build_matrix(rows.user, rows.movies, self.constants), rows

    def materialized(self) -> dict[str, str] | None:
        """The project's record of its last complete materialization, or None if it has none."""
        try:
            record = self._client.hgetall(self._version_key)
        except redis.RedisError as error:
            raise self._error(error) from None
        return {k.decode(): v.decode() for k, v in record.items()} or None

    def ping(self) -> None:
        """Raise :class:`OnlineStoreUnavailable` unless Redis answers."""
        try:
            self._client.ping()
        except redis.RedisError as error:
            raise self._error(error) from None

    def close(self) -> None:
        self._pool.disconnect()

    def _check_store_version(self, stored: bytes | None) -> None:
        if stored is None:
            raise StaleFeatures(
                f"online store {redact(self.url)} holds no complete materialization for project "
                f"{self.config.project}; run `reelrank materialize` for model version "
                f"{self.model_version}"
            )
        if stored.decode() != self.model_version:
            raise StaleFeatures(
                f"online store {redact(self.url)} project {self.config.project} holds model "
                f"version {stored.decode()}, but the model is version {self.model_version}"
            )

    def _round_trip(self, request: bytes, n_replies: int, timeout_s: float | None) -> list:
        """Send ``request`` and read ``n_replies`` replies on one pooled connection, all
        within ``timeout_s`` if given.

        A pooled connection may have died with a restarted Redis, so a lost connection is
        retried once on a fresh one, within the same time; a timeout is not, the time is spent.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            return self._send(request, n_replies, deadline)
        except redis.AuthenticationError as error:
            raise self._error(error) from None
        except redis.ConnectionError as error:
            _log.info("%s: %s; retrying once", redact(self.url), error)
        except redis.RedisError as error:
            raise self._error(error) from None

        try:
            return self._send(request, n_replies, deadline)
        except redis.RedisError as error:
            raise self._error(error) from None

    def _send(self, request: bytes, n_replies: int, deadline: float | None) -> list:
        connection = self._pool.get_connection()
        try:
            if deadline is None:
                connection.send_packed_command([request], check_health=False)
                return [connection.read_response() for _ in range(n_replies)]
            return self._send_by(connection, request, n_replies, deadline)
        except BaseException:
            # Unread replies would answer the next request: that one starts afresh.
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)

    def _send_by(self, connection, request: bytes, n_replies: int, deadline: float) -> list:
        """:meth:`_send` with every socket wait cut to the time left before ``deadline``.

        Setting a socket timeout costs microseconds, so it is lowered only once the time left
        has fallen more than ``_TIMEOUT_SLACK_S`` below the one set: a wait ends at most that
        much after the deadline.
        """
        timeout_s = float("inf")
        try:
            replies = []
            for index in range(n_replies + 1):
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise redis.TimeoutError("the read's time ran out")
                if left_s < timeout_s - _TIMEOUT_SLACK_S:
                    # Redis-py's hook for a temporary socket timeout; -1 restores the default.
                    timeout_s = min(left_s, self.config.socket_timeout_s)
                    connection.update_current_socket_timeout(timeout_s)
                if index == 0:
                    connection.send_packed_command([request], check_health=False)
                else:
                    replies.append(connection.read_response())
            return replies
        finally:
            connection.update_current_socket_timeout(-1)

    def _error(self, error: redis.RedisError) -> OnlineStoreError:
        where = f"online store {redact(self.url)}"
        if isinstance(error, redis.AuthenticationError):
            return OnlineStoreUnavailable(f"{where} refused the login: {error}")
        if isinstance(error, redis.TimeoutError):
            return OnlineStoreTimeout(f"{where} did not answer in time: {error}")
        if isinstance(error, redis.ConnectionError):
            return OnlineStoreUnavailable(f"{where} is unreachable: {error}")
        return OnlineStoreError(f"{where} failed: {error}")


def _merge(
    positions: np.ndarray,
    cache: MovieRowCache,
    missed_rows: dict[str, np.ndarray],
    missed_found: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows in request order: cached ones where ``positions`` >= 0, the ones just read (in
    order) elsewhere; and which have a row."""
    hit = positions >= 0
    if hit.all():
        return cache.gather(positions), np.ones(len(positions), dtype=bool)
    cached = cache.gather(positions[hit])
    rows = {}
    for name, values in missed_rows.items():
        merged = np.empty((len(positions), *values.shape[1:]), dtype=np.float32)
        merged[hit] = cached[name]
        merged[~hit] = values
        rows[name] = merged
    found = np.ones(len(positions), dtype=bool)
    found[~hit] = missed_found
    return rows, found
