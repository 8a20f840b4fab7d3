"""Materialization: one training run's feature tables into Feast's offline and online stores.

:func:`materialize` checks an artifacts directory, copies its two tables into the feature
repository's ``data/`` (where the offline store reads them), applies the repository through the
Feast SDK and writes every row into Redis in exactly the layout Feast's own ``materialize``
writes (see :mod:`ranker.online_store`), so Feast's readers, ``feast materialize-incremental``
and reelrank's reader all see the same store. It is faster than Feast's stock path because it
encodes each column of a batch at once with numpy and sends large pipelines; the first row of
each view is checked against Feast's own serializers, so the layouts cannot drift apart.

Versions: each row carries its model version. The project's ``reelrank:<project>:pending``
record is set before the first row is written; ``reelrank:<project>:version`` (model version,
row counts, times) replaces it in one transaction only after every row is written and the rows
of entities the run no longer has are removed. A run that fails half-way leaves ``pending``
behind and the old ``version``, and a rerun completes the job.

This module also holds :class:`UrlRedisOnlineStore`, the Feast online store named in
``feature_store.yaml``: Feast's Redis store, configured by a Redis URL.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
import yaml
from feast import Entity, FeatureService, FeatureStore, FeatureView, RepoConfig
from feast.infra.online_stores.helpers import _mmh3, _redis_key, compute_versioned_name
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from feast.utils import make_tzaware
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import StrictStr, field_validator
from tqdm.auto import tqdm

from ranker.online_store import (
    VIEWS,
    OnlineStoreError,
    OnlineStoreUnavailable,
    ViewLayout,
    encode_float_lists,
    encode_floats,
    encode_lists,
    encode_string,
    field_shape,
    metadata_key,
)
from ranker.redis_url import DEFAULT_REDIS_URL, REDIS_URL_ENV, redact, resolve
from ranker.redis_url import validate as validate_url
from training.errors import ArtifactError, ReelrankError

_log = logging.getLogger(__name__)

DEFINITIONS = "features.py"
STORE_TYPE = "ranker.materialize.UrlRedisOnlineStore"
UNSET_URL = (f"${{{REDIS_URL_ENV}}}", f"${REDIS_URL_ENV}")  # what expandvars leaves when unset
TABLE_FILES = {"user": "user_features.parquet", "movie": "movie_features.parquet"}


class MaterializeError(ReelrankError):
    """Materialization could not start or finish; the message says what to fix."""


class UrlRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Feast's Redis online store configuration with the server given as one Redis URL."""

    type: Literal["ranker.materialize.UrlRedisOnlineStore"] = STORE_TYPE
    """Online store type selector."""
    redis_url: StrictStr = DEFAULT_REDIS_URL
    """``redis://[:password@]host:port/db`` or ``rediss://``; ``${REDIS_URL}`` when unset means
    the default. Checked when Feast connects, so a bad URL is reported without its password."""
    connection_string: None = None
    """Feast's ``host:port,db=N`` form is replaced by ``redis_url``."""

    @field_validator("redis_url", mode="before")
    @classmethod
    def _default_when_unset(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and value.strip() in ("", *UNSET_URL)):
            return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
        return value


class UrlRedisOnlineStore(RedisOnlineStore):
    """Feast's Redis online store, connecting through redis-py's ``from_url``.

    Keys, fields and values are Feast's; only the connection differs. ``redis_type:
    redis_cluster`` goes to redis-py's ``RedisCluster`` (for Feast's own readers and writers;
    reelrank's talk to one server). Sentinel and ``client: glide`` need Feast's stock
    ``type: redis``.
    """

    def _get_client(self, online_store_config: UrlRedisOnlineStoreConfig):
        if not self._client:
            url = _checked_url(online_store_config)
            if online_store_config.redis_type == RedisType.redis_cluster:
                self._client = redis.RedisCluster.from_url(url)
            else:
                self._client = redis.Redis.from_url(url)
        return self._client

    async def _get_client_async(self, online_store_config: UrlRedisOnlineStoreConfig):
        if not self._client_async:
            from redis import asyncio as redis_asyncio

            url = _checked_url(online_store_config)
            if online_store_config.redis_type == RedisType.redis_cluster:
                self._client_async = redis_asyncio.RedisCluster.from_url(url)
            else:
                self._client_async = redis_asyncio.Redis.from_url(url)
        return self._client_async

    def _get_glide_client(self, online_store_config):
        raise NotImplementedError(
            "client: glide is not supported by the URL-configured store; use type: redis"
        )


def _checked_url(config: UrlRedisOnlineStoreConfig) -> str:
    if config.redis_type == RedisType.redis_sentinel:
        raise NotImplementedError(
            "redis_type: redis_sentinel is not supported by the URL-configured store; "
            "use Feast's type: redis with a connection_string"
        )
    return validate_url(config.redis_url)


@dataclass(frozen=True)
class MaterializeConfig:
    """What to materialize and where."""

    artifacts: Path
    """Artifacts directory written by ``reelrank train``."""
    repo: Path | None = None
    """Feast repository; None means this checkout's ``feature_repo/``."""
    redis_url: str | None = None
    """None means ``$REDIS_URL``, then ``redis://127.0.0.1:6379/0``."""
    project: str | None = None
    """Feast project, the key namespace; None means the one in ``feature_store.yaml``."""
    incremental: bool = False
    """Write nothing if the project already holds this model version completely."""
    batch_rows: int = 10_000
    """Rows per pipeline sent to Redis."""
    progress: bool | None = None
    """Progress bars; None shows them only on a terminal."""


@dataclass
class MaterializeResult:
    """What a materialization did."""

    model_version: str
    project: str
    redis_url: str
    """Without password."""
    rows_written: dict[str, int] = field(default_factory=dict)
    """Per feature view."""
    rows_removed: dict[str, int] = field(default_factory=dict)
    """Per feature view: rows of entities the run no longer has."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per feature view, and ``total``."""
    skipped: bool = False
    """True when ``incremental`` found this version already complete."""


def default_repo() -> Path:
    """The ``feature_repo/`` folder of this checkout."""
    return Path(__file__).resolve().parents[1] / "feature_repo"


def materialize(config: MaterializeConfig) -> MaterializeResult:
    """Copy, apply and write one artifacts directory's feature tables; see the module doc."""
    started = time.perf_counter()
    repo = _checked_repo(config.repo)
    url = resolve(config.redis_url)
    manifest = check_artifacts(config.artifacts)
    version = manifest["model_version"]

    store = feature_store(repo, url, config.project)
    project = store.config.project
    if store.config.online_store.redis_type != RedisType.redis:
        raise MaterializeError(
            f"reelrank materialize writes to a single Redis server, not redis_type "
            f"{store.config.online_store.redis_type.value}; use `feast materialize-incremental`"
        )
    result = MaterializeResult(version, project, redact(url))
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=60)
    writing = False
    try:
        client.ping()
        stage_tables(config.artifacts, repo, manifest)
        _apply(store, repo)
        if config.incremental and _is_complete(client, project, version):
            _log.info("project %s already holds model version %s", project, version)
            result.skipped = True
            result.rows_written = {view: 0 for view in VIEWS.values()}
            result.rows_removed = {view: 0 for view in VIEWS.values()}
        else:
            writing = True
            _write_all(store, client, config, manifest, result)
    except redis.RedisError as error:
        raise _store_error(error, url, writing) from None
    finally:
        client.close()
    result.seconds["total"] = time.perf_counter() - started
    return result


def _store_error(error: redis.RedisError, url: str, writing: bool) -> OnlineStoreError:
    where = f"online store {redact(url)}"
    after = (
        "; the store is incomplete: fix the cause and rerun the command to finish"
        if writing
        else ""
    )
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return OnlineStoreUnavailable(f"{where} is unreachable: {error}{after}")
    return OnlineStoreError(f"{where} refused a command: {error}{after}")


def feature_store(
    repo: Path | None = None,
    redis_url: str | None = None,
    project: str | None = None,
) -> FeatureStore:
    """A Feast ``FeatureStore`` on ``repo`` with the Redis URL and project overridden if given.

    The YAML is read as Feast reads it (environment variables expanded), so the result is the
    store the ``feast`` command line sees with ``REDIS_URL`` set to ``redis_url``.
    """
    repo = _checked_repo(repo)
    path = repo / "feature_store.yaml"
    raw = yaml.safe_load(os.path.expandvars(path.read_text()))
    online = raw.get("online_store")
    if not isinstance(online, dict) or online.get("type") != STORE_TYPE:
        raise MaterializeError(f"{path}: online_store must be of type {STORE_TYPE}")
    online["redis_url"] = resolve(redis_url)
    if project is not None:
        raw["project"] = project
    try:
        config = RepoConfig(**raw)
    except ValueError as error:
        raise MaterializeError(f"{path}: {error}") from None
    config.repo_path = repo
    return FeatureStore(repo_path=str(repo), config=config)


def check_artifacts(artifacts: Path) -> dict:
    """The manifest of ``artifacts`` after checking its checksums and both feature tables."""
    # Imported here: training.artifacts loads the training stack, and Feast imports this
    # module just for UrlRedisOnlineStore whenever it reads feature_store.yaml.
    from training.artifacts import read_manifest

    manifest = read_manifest(artifacts, verify=True)
    for entity, name in TABLE_FILES.items():
        _check_table(Path(artifacts) / name, manifest, entity)
    return manifest


def _check_table(path: Path, manifest: dict, entity: str) -> None:
    table = manifest["tables"][entity]
    try:
        schema = pq.read_schema(path)
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowInvalid) as error:
        raise ArtifactError(f"{path} is missing or unreadable: {error}") from None

    expected = [table["key"], *(f["name"] for f in table["fields"]), "event_timestamp"]
    missing = [name for name in (*expected, "model_version") if name not in schema.names]
    if missing:
        raise ArtifactError(f"{path} lacks the columns {missing}")
    if rows != table["rows"]:
        raise ArtifactError(f"{path} has {rows} rows; the manifest says {table['rows']}")

    # One batch at a time: a million-row table need not be in memory twice.
    arrays = {f["name"]: f["width"] for f in table["fields"] if f["width"] is not None}
    versions = set()
    batches = pq.ParquetFile(path).iter_batches(
        65_536, columns=[*arrays, "model_version"], use_threads=False
    )
    for batch in batches:
        for name, width in arrays.items():
            lengths = pc.list_value_length(batch.column(name))
            extremes = pc.min_max(lengths).as_py()
            if lengths.null_count or set(extremes.values()) != {width}:
                raise ArtifactError(
                    f"{path}: {name} must hold {width} values in every row "
                    f"(n_factors {manifest['n_factors']}); found lengths {extremes}"
                )
        versions.update(pc.unique(batch.column("model_version")).to_pylist())
    if versions - {manifest["model_version"]}:
        raise ArtifactError(
            f"{path} holds rows of model versions {sorted(map(str, versions))}; the manifest "
            f"is {manifest['model_version']}"
        )


def stage_tables(artifacts: Path, repo: Path, manifest: dict) -> None:
    """Copy the feature tables and manifest into ``repo/data/``, each replaced atomically."""
    data = repo / "data"
    data.mkdir(exist_ok=True)
    for name in (*TABLE_FILES.values(), "manifest.json"):
        partial = data / f".{name}.partial"
        shutil.copyfile(Path(artifacts) / name, partial)
        os.replace(partial, data / name)
    _log.info("copied model version %s's tables to %s", manifest["model_version"], data)


def _checked_repo(repo: Path | None) -> Path:
    repo = Path(repo) if repo is not None else default_repo()
    if not (repo / "feature_store.yaml").is_file() or not (repo / DEFINITIONS).is_file():
        raise MaterializeError(
            f"{repo} is not reelrank's feature repository (feature_store.yaml and "
            f"{DEFINITIONS} expected); pass --repo"
        )
    return repo.resolve()


def _apply(store: FeatureStore, repo: Path) -> None:
    """Register the repository's entities, views and services, as ``feast apply`` does."""
    spec = importlib.util.spec_from_file_location("reelrank_feature_repo", repo / DEFINITIONS)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(spec.name, None)
    spec.loader.exec_module(module)
    kinds = (Entity, FeatureView, FeatureService)
    objects = [obj for obj in vars(module).values() if isinstance(obj, kinds)]
    store.apply(objects)
    _log.info("applied %d Feast objects to project %s", len(objects), store.config.project)


def _is_complete(client: redis.Redis, project: str, version: str) -> bool:
    record = client.hget(metadata_key(project, "version"), "model_version")
    pending = client.exists(metadata_key(project, "pending"))
    return record is not None and record.decode() == version and not pending


def _write_all(store, client, config, manifest, result) -> None:
    project = result.project
    version = manifest["model_version"]
    started_at = datetime.now(UTC)
    pending = metadata_key(project, "pending")
    previous = client.hgetall(pending)
    if previous:
        _log.warning(
            "the materialization of %s into project %s started at %s did not finish; "
            "this run completes it",
            previous.get(b"model_version", b"?").decode(),
            project,
            previous.get(b"started_at", b"?").decode(),
        )

    client.hset(pending, mapping={"model_version": version, "started_at": started_at.isoformat()})
    for entity, view_name in VIEWS.items():
        view_started = time.perf_counter()
        writer = _ViewWriter(store, client, manifest, entity, config.batch_rows)
        path = store.repo_path / "data" / TABLE_FILES[entity]
        result.rows_written[view_name] = writer.write(path, config.progress)
        result.rows_removed[view_name] = writer.remove_stale()
        writer.record_interval()
        result.seconds[view_name] = time.perf_counter() - view_started
        _log.info(
            "%s: %d rows written, %d stale rows removed in %.2f s",
            view_name,
            result.rows_written[view_name],
            result.rows_removed[view_name],
            result.seconds[view_name],
        )
    _finish(client, project, manifest, result, started_at)


def _finish(client, project, manifest, result, started_at) -> None:
    """Record the complete materialization and drop ``pending``, in one transaction."""
    record = {
        "model_version": manifest["model_version"],
        "n_factors": manifest["n_factors"],
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        **{f"rows:{view}": rows for view, rows in result.rows_written.items()},
    }
    key = metadata_key(project, "version")
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=record)
        pipe.delete(metadata_key(project, "pending"))
        pipe.execute()


class _ViewWriter:
    """Writes one feature view's table into Redis in Feast's layout, a batch at a time."""

    def __init__(self, store, client, manifest, entity, batch_rows):
        self.store = store
        self.client = client
        self.view = store.get_feature_view(VIEWS[entity])
        self.table = manifest["tables"][entity]
        self.entity = entity
        self.batch_rows = batch_rows
        config = store.config
        self.project = config.project
        self.ttl_seconds = config.online_store.key_ttl_seconds
        self.layout = ViewLayout(
            entity,
            self.table["key"],
            [(f["name"], field_shape(f)) for f in self.table["fields"]],
            self.project,
        )

        # Hash field names exactly as Feast's Redis store derives them.
        self.view_name = compute_versioned_name(
            self.view, config.registry.enable_online_feature_view_versioning
        )
        if self.view_name != self.view.name:
            raise MaterializeError(
                f"{self.view_name}: online feature view versioning is on in the registry "
                "config; reelrank's reader reads unversioned views only"
            )
        self.features = [f.name for f in self.view.features]
        self.field_names = [f"_ts:{self.view_name}".encode()] + [
            _mmh3(f"{self.view_name}:{name}") for name in self.features
        ]
        self.source_columns = {v: k for k, v in self.view.batch_source.field_mapping.items()}
        self.timestamp_column = self.view.batch_source.timestamp_field
        self.written_ids: list[np.ndarray] = []
        self.event_times: list[int] = []

    def write(self, path: Path, progress: bool | None) -> int:
        parquet = pq.ParquetFile(path)
        total = parquet.metadata.num_rows
        columns = [self.table["key"], self.timestamp_column] + [
            self.source_columns.get(name, name) for name in self.features
        ]
        bar = tqdm(
            total=total,
            desc=self.view.name,
            unit="row",
            disable=not sys.stderr.isatty() if progress is None else not progress,
        )
        with bar:
            # Arrow's threads off, as in training.artifacts.read_frame (apache/arrow#34314).
            batches = parquet.iter_batches(self.batch_rows, columns=columns, use_threads=False)
            for number, batch in enumerate(batches):
                keys, values = self._encode(batch)
                if number == 0:
                    self._check_against_feast(batch, keys[0], [column[0] for column in values])
                self._send(keys, values)
                bar.update(batch.num_rows)
        return total

    def _encode(self, batch: pa.RecordBatch) -> tuple[list[bytes], list[list[bytes]]]:
        """Keys and, per hash field, every row's serialized value."""
        ids = batch.column(self.table["key"]).to_numpy().astype(np.int64)
        self.written_ids.append(ids)
        values = [self._timestamps(batch.column(self.timestamp_column))]
        widths = {f["name"]: field_shape(f) for f in self.table["fields"]}
        for name in self.features:
            column = batch.column(self.source_columns.get(name, name))
            if name in widths:
                values.append(_encode_column(column, widths[name]))
            else:
                values.append(_encode_strings(column))
        return self.layout.keys(ids), values

    def _timestamps(self, column: pa.Array) -> list[bytes]:
        micros = pc.cast(column, pa.timestamp("us", tz="UTC"), safe=False)
        micros = micros.cast(pa.int64()).to_numpy(zero_copy_only=False)
        unique, index = np.unique(micros, return_inverse=True)
        self.event_times.extend(unique.tolist())
        encoded = []
        for value in unique.tolist():
            stamp = Timestamp()
            epoch = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)
            stamp.FromDatetime(make_tzaware(epoch))
            encoded.append(stamp.SerializeToString())
        return [encoded[i] for i in index.tolist()]

    def _send(self, keys: list[bytes], values: list[list[bytes]]) -> None:
        names = self.field_names
        with self.client.pipeline(transaction=False) as pipe:
            for key, row in zip(keys, zip(*values)):
                pipe.execute_command("HSET", key, *chain.from_iterable(zip(names, row)))
                if self.ttl_seconds:
                    pipe.expire(key, self.ttl_seconds)
            pipe.execute()

    def _check_against_feast(self, batch, key: bytes, row: list[bytes]) -> None:
        """Refuse to write if this batch's first row differs from what Feast would write."""
        entity_id = int(batch.column(self.table["key"])[0].as_py())
        entity_key = EntityKeyProto(
            join_keys=[self.table["key"]], entity_values=[ValueProto(int64_val=entity_id)]
        )
        version = self.store.config.entity_key_serialization_version
        differs = []
        if key != _redis_key(self.project, entity_key, entity_key_serialization_version=version):
            differs.append(f"the key (entity_key_serialization_version {version})")
        frame = batch.slice(0, 1).to_pandas(use_threads=False)
        for feature, value in zip(self.view.features, row[1:]):
            column = self.source_columns.get(feature.name, feature.name)
            proto = python_values_to_proto_values(
                [frame[column].iloc[0]], feature.dtype.to_value_type()
            )[0]
            if proto.SerializeToString() != value:
                differs.append(feature.name)
        if differs:
            raise MaterializeError(
                f"{self.view.name}: the fast writer encodes {', '.join(differs)} of "
                f"{self.entity} {entity_id} differently from Feast; use "
                "`feast materialize-incremental` instead"
            )

    def remove_stale(self) -> int:
        """Drop this view's rows of entities the run does not have; returns how many."""
        kept = np.unique(np.concatenate(self.written_ids)) if self.written_ids else np.array([])
        pattern = _glob_escape(self.layout.key_head) + b"*" + _glob_escape(self.layout.key_tail)
        fields = self.field_names
        removed = 0
        for keys in _chunks(self.client.scan_iter(match=pattern, count=10_000), 10_000):
            owned, ids = self.layout.owned_keys(keys)
            stale = [key for key, gone in zip(owned, ~np.isin(ids, kept)) if gone]
            if stale:
                with self.client.pipeline(transaction=False) as pipe:
                    for key in stale:
                        pipe.hdel(key, *fields)
                    pipe.execute()
                removed += len(stale)
        return removed

    def record_interval(self) -> None:
        """Tell Feast's registry what was materialized, so ``materialize-incremental`` goes on
        from here instead of writing the same rows again."""
        if not self.event_times:
            return
        start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=min(self.event_times))
        end = max(datetime.now(UTC), start)
        self.store.registry.apply_materialization(self.view, self.project, start, end)


def _encode_column(column: pa.Array, width: int | str | None) -> list[bytes]:
    """Serialized ``Value`` of every row of a float32 scalar, array or list column (``width``
    is a codec shape, see :func:`ranker.online_store.field_shape`), as Feast writes them: a
    NaN or null scalar becomes an empty (null) value."""
    n = len(column)
    if isinstance(width, str):
        offsets = column.offsets.to_numpy(zero_copy_only=False)
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return encode_lists(flat, offsets - offsets[0], width)
    if width is None:
        floats = column.to_numpy(zero_copy_only=False).astype(np.float32)
        encoded = encode_floats(floats)
    else:
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        encoded = encode_float_lists(flat.reshape(n, width))
    size = encoded.shape[1]
    blob = encoded.tobytes()
    values = [blob[i * size : (i + 1) * size] for i in range(n)]
    if width is None:
        for i in np.flatnonzero(np.isnan(floats)).tolist():
            values[i] = b""
    return values


def _encode_strings(column: pa.Array) -> list[bytes]:
    encoded = column.dictionary_encode()
    dictionary = [encode_string(text) for text in encoded.dictionary.to_pylist()]
    return [dictionary[i] for i in encoded.indices.to_numpy(zero_copy_only=False).tolist()]


def _glob_escape(data: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in data)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
