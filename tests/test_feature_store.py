"""The Feast repository, materialization and the online reader, against a private Redis.

Everything runs for real: Feast's SDK and its ``feast`` command line, a redis-server of our own,
the tiny model trained by the ``tiny_artifacts`` fixture and a second run of it for versions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from ranker.online_store import (
    OnlineFeatureReader,
    OnlineStoreConfig,
    OnlineStoreUnavailable,
    StaleFeatures,
    ViewLayout,
    metadata_key,
)
from training import artifacts as artifacts_io
from training.errors import ArtifactError

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture()
def feast_repo(tmp_path: Path) -> Path:
    """A copy of the Feast repository, so tests never write into the checkout."""
    from ranker.materialize import default_repo

    repo = tmp_path / "feature_repo"
    shutil.copytree(default_repo(), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return repo


def _materialize(artifacts: Path, url: str, repo: Path, **options):
    from ranker.materialize import MaterializeConfig, materialize

    config = MaterializeConfig(artifacts, repo=repo, redis_url=url, progress=False, **options)
    return materialize(config)


def _reader(url: str, manifest: dict, project: str = "reelrank") -> OnlineFeatureReader:
    return OnlineFeatureReader(OnlineStoreConfig(redis_url=url, project=project), manifest)


def _feast_rows(url: str) -> dict:
    """Every Feast row in the database: key -> {field: value}."""
    with redis.Redis.from_url(url) as client:
        keys = [k for k in client.keys() if client.type(k) == b"hash"]
        return {k: client.hgetall(k) for k in keys if not k.startswith(b"reelrank:")}


def _offline(model, user_id: int, movie_ids: np.ndarray):
    return model.features(np.full(len(movie_ids), user_id), movie_ids)


def _row_key(entity: str, entity_id: int, project: str = "reelrank") -> bytes:
    """The Redis key of one entity's row in ``project``."""
    layout = ViewLayout(entity, f"{entity}_id", [], project)
    return layout.keys(np.array([entity_id]))[0]


def _bitwise_equal(left: np.ndarray, right: np.ndarray) -> bool:
    return left.shape == right.shape and np.array_equal(left.view(np.uint64), right.view(np.uint64))


def test_feast_cli_works_on_the_repository_with_redis_url_set(
    feast_repo, tiny_artifacts, loaded, redis_url
):
    from ranker.materialize import check_artifacts, stage_tables

    stage_tables(tiny_artifacts, feast_repo, check_artifacts(tiny_artifacts))
    env = {**os.environ, "REDIS_URL": redis_url}

    def feast(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "feast"), *args],
            cwd=feast_repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    feast("apply")
    end = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    feast("materialize-incremental", end)
    listed = feast("feature-views", "list")
    assert "user_features" in listed and "movie_features" in listed
    stock = _feast_rows(redis_url)
    assert len(stock) == len(loaded.model.users) + len(loaded.model.movies)

    # The fast writer leaves exactly the bytes Feast's own materialization left.
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    _materialize(tiny_artifacts, redis_url, feast_repo)
    assert _feast_rows(redis_url) == stock


def test_feast_sdk_reads_what_reelrank_materialized(feast_repo, tiny_artifacts, loaded, redis_url):
    from ranker.materialize import feature_store

    result = _materialize(tiny_artifacts, redis_url, feast_repo)
    assert result.rows_written == {"user_features": 30, "movie_features": 40}

    store = feature_store(feast_repo, redis_url)
    user_ids, movie_ids = [1, 7, 30, 999], [2, 40, 5, 777]
    online = store.get_online_features(
        features=store.get_feature_service("ranker"),
        entity_rows=[{"user_id": u, "movie_id": m} for u, m in zip(user_ids, movie_ids)],
    ).to_dict()

    for entity, ids, table in (
        ("user", user_ids, loaded.model.users),
        ("movie", movie_ids, loaded.model.movies),
    ):
        rows, found = table.lookup(np.array(ids))
        assert list(found) == [True, True, True, False]
        assert online[f"{entity}_model_version"] == [loaded.model_version] * 3 + [None]
        for name, values in rows.items():
            for i in range(3):
                got = np.asarray(np.nan if online[name][i] is None else online[name][i], np.float32)
                assert _bitwise_equal(got.astype(np.float64), values[i].astype(np.float64)), name
            assert online[name][3] is None

    with redis.Redis.from_url(redis_url) as client:
        record = client.hgetall(metadata_key("reelrank", "version"))
        assert record[b"model_version"].decode() == loaded.model_version
        assert not client.exists(metadata_key("reelrank", "pending"))


def test_materializing_twice_changes_nothing(feast_repo, tiny_artifacts, redis_url):
    first = _materialize(tiny_artifacts, redis_url, feast_repo)
    rows = _feast_rows(redis_url)

    again = _materialize(tiny_artifacts, redis_url, feast_repo)
    assert again.rows_written == first.rows_written and not again.skipped
    assert _feast_rows(redis_url) == rows

    incremental = _materialize(tiny_artifacts, redis_url, feast_repo, incremental=True)
    assert incremental.skipped and incremental.rows_written == {
        "user_features": 0,
        "movie_features": 0,
    }
    assert _feast_rows(redis_url) == rows


def test_online_matrix_equals_offline_for_500_random_pairs(
    feast_repo, tiny_artifacts, loaded, redis_url
):
    _materialize(tiny_artifacts, redis_url, feast_repo)
    reader = _reader(redis_url, loaded.manifest)
    model = loaded.model
    rng = np.random.default_rng(7)
    # Ids 31-36 and 41-48 are unknown to the tiny data, so defaults are compared too.
    pairs = np.column_stack([rng.integers(1, 37, 500), rng.integers(1, 49, 500)])
    assert (pairs[:, 0] > 30).any() and (pairs[:, 1] > 40).any()

    try:
        for user_id in np.unique(pairs[:, 0]):
            movie_ids = pairs[pairs[:, 0] == user_id, 1]
            online, rows = reader.features(int(user_id), movie_ids)
            offline, user_known, movie_known = _offline(model, int(user_id), movie_ids)

            assert _bitwise_equal(online, offline), f"user {user_id}"
            assert rows.user_found == user_known[0]
            assert np.array_equal(rows.movie_found, movie_known)
            assert np.array_equal(model.score(online), model.score(offline))
    finally:
        reader.close()


def test_online_ranking_matrix_equals_offline_for_500_random_pairs(
    feast_repo, tiny_artifacts, loaded, redis_url
):
    """The ranking model's input built from Redis (history lists included) equals, bit for bit,
    what `reelrank recommend` builds from the tables, and so do the scores."""
    _materialize(tiny_artifacts, redis_url, feast_repo)
    reader = _reader(redis_url, loaded.manifest)
    recommender = loaded.recommender()
    rng = np.random.default_rng(11)
    pairs = np.column_stack([rng.integers(1, 31, 500), rng.integers(1, 41, 500)])

    try:
        for user_id in np.unique(pairs[:, 0]):
            movie_ids = np.unique(pairs[pairs[:, 0] == user_id, 1])
            rows = reader.read(int(user_id), movie_ids)
            assert rows.user_found and rows.movie_found.all()
            plan = loaded.ranking.plan(rows.user, movie_ids)
            needed_rows, found = reader.read_movies(plan.needed_movie_ids)
            assert found.all()
            online = plan.features(rows.user, needed_rows, loaded.model.constants)
            offline = recommender.features(int(user_id), candidate_ids=movie_ids)

            assert np.array_equal(online.movie_ids, offline.movie_ids)
            assert _bitwise_equal(online.matrix, offline.matrix), f"user {user_id}"
            scores = loaded.ranking.score(online.matrix)
            assert _bitwise_equal(scores, loaded.ranking.score(offline.matrix))
    finally:
        reader.close()


def test_historical_features_rebuild_the_training_tables(
    feast_repo, tiny_artifacts, tiny_data, loaded, redis_url
):
    """Feast's offline store joins the tables training wrote onto the training ratings, row for
    row as the offline path looks them up."""
    from ranker.materialize import feature_store
    from training.data import load_movielens
    from training.features import build_matrix

    _materialize(tiny_artifacts, redis_url, feast_repo)
    store = feature_store(feast_repo, redis_url)
    ratings = load_movielens(tiny_data).ratings
    # Distinct times: Feast's file store collapses entity rows sharing a user and a time.
    valid_from = pd.Timestamp(loaded.manifest["created_at"]) + pd.Timedelta(seconds=1)
    entity_df = pd.DataFrame(
        {
            "row": np.arange(len(ratings)),
            "user_id": ratings["user_id"].to_numpy(np.int64),
            "movie_id": ratings["movie_id"].to_numpy(np.int64),
            "event_timestamp": valid_from + pd.to_timedelta(np.arange(len(ratings)), unit="s"),
        }
    )

    frame = store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service("ranker")
    ).to_df()
    frame = frame.sort_values("row").reset_index(drop=True)
    assert len(frame) == len(entity_df)
    assert (frame["user_model_version"] == loaded.model_version).all()
    assert (frame["movie_model_version"] == loaded.model_version).all()

    rebuilt = {}
    for table, ids in (
        (loaded.model.users, entity_df["user_id"]),
        (loaded.model.movies, entity_df["movie_id"]),
    ):
        expected, _ = table.lookup(ids.to_numpy())
        for name, values in expected.items():
            column = frame[name].to_numpy()
            if values.dtype == object:
                # The history lists: same values, same element type, row for row.
                for got, want in zip(column, values):
                    got = np.asarray(got)
                    assert got.dtype == want.dtype and np.array_equal(got, want), name
                continue
            rebuilt[name] = (np.stack(column) if values.ndim == 2 else column).astype(np.float32)
            assert np.array_equal(rebuilt[name], values, equal_nan=True), name

    users = {n: v for n, v in rebuilt.items() if n.startswith("user_")}
    movies = {n: v for n, v in rebuilt.items() if n.startswith("movie_")}
    matrix = build_matrix(users, movies, loaded.model.constants)
    offline, _, _ = loaded.model.features(entity_df["user_id"], entity_df["movie_id"])
    assert _bitwise_equal(matrix, offline)


def test_unreachable_redis_is_one_clear_line(tiny_artifacts, loaded, feast_repo):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://:hunter2@127.0.0.1:{port}/0"

    done = subprocess.run(
        [str(BIN / "reelrank"), "materialize", "--artifacts", str(tiny_artifacts)]
        + ["--repo", str(feast_repo), "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr + done.stdout
    assert f"error: online store redis://:***@127.0.0.1:{port}/0 is unreachable" in done.stderr

    reader = _reader(url, loaded.manifest)
    with pytest.raises(OnlineStoreUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1") as caught:
        reader.read(1, np.array([1, 2]))
    assert "hunter2" not in str(caught.value)
    with pytest.raises(OnlineStoreUnavailable):
        reader.ping()


def test_missing_or_incomplete_artifacts_are_refused(
    tiny_artifacts, feast_repo, redis_url, tmp_path
):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        _materialize(tmp_path / "nowhere", redis_url, feast_repo)

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_artifacts, damaged)
    (damaged / "movie_features.parquet").unlink()
    with pytest.raises(ArtifactError, match="movie_features.parquet is missing"):
        _materialize(damaged, redis_url, feast_repo)

    shutil.copy(tiny_artifacts / "movie_features.parquet", damaged)
    with open(damaged / "user_features.parquet", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ArtifactError, match="user_features.parquet does not match"):
        _materialize(damaged, redis_url, feast_repo)

    assert _feast_rows(redis_url) == {}


def test_a_failure_half_way_is_visible_and_a_rerun_completes(
    feast_repo, tiny_artifacts, loaded, redis_url
):
    from ranker.online_store import OnlineStoreError

    # A plain string where user 15's hash goes makes Redis refuse that row mid-way.
    blocker = _row_key("user", 15)
    client = redis.Redis.from_url(redis_url)
    client.set(blocker, b"in the way")

    with pytest.raises(OnlineStoreError, match="WRONGTYPE.*rerun the command to finish"):
        _materialize(tiny_artifacts, redis_url, feast_repo, batch_rows=10)
    written = len(_feast_rows(redis_url))
    assert 0 < written < 70
    assert client.hget(metadata_key("reelrank", "pending"), "model_version").decode() == (
        loaded.model_version
    )
    assert not client.exists(metadata_key("reelrank", "version"))
    reader = _reader(redis_url, loaded.manifest)
    with pytest.raises(StaleFeatures, match="no complete materialization"):
        reader.read(1, np.array([1]))

    client.delete(blocker)
    result = _materialize(tiny_artifacts, redis_url, feast_repo, incremental=True)
    assert not result.skipped and len(_feast_rows(redis_url)) == 70
    assert not client.exists(metadata_key("reelrank", "pending"))
    online, _ = reader.features(15, loaded.model.movies.ids)
    offline, _, _ = _offline(loaded.model, 15, loaded.model.movies.ids)
    assert _bitwise_equal(online, offline)
    reader.close()
    client.close()


def test_rows_of_another_model_version_are_refused(
    feast_repo, tiny_artifacts, second_artifacts, loaded, redis_url
):
    second = artifacts_io.load(second_artifacts)
    assert second.model_version != loaded.model_version
    _materialize(tiny_artifacts, redis_url, feast_repo)
    _materialize(second_artifacts, redis_url, feast_repo, project="reelrank_next")

    # Both versions live side by side, each in its own Feast project.
    old = _reader(redis_url, loaded.manifest)
    new = _reader(redis_url, second.manifest, project="reelrank_next")
    movie_ids = np.arange(1, 41)
    assert _bitwise_equal(old.features(3, movie_ids)[0], _offline(loaded.model, 3, movie_ids)[0])
    assert _bitwise_equal(new.features(3, movie_ids)[0], _offline(second.model, 3, movie_ids)[0])

    # One row of the new run inside the old project: the state half-way through materializing.
    with redis.Redis.from_url(redis_url) as client:
        source, target = _row_key("movie", 5, "reelrank_next"), _row_key("movie", 5)
        assert client.copy(source, target, replace=True)
    with pytest.raises(StaleFeatures) as caught:
        old.read(3, movie_ids)
    message = str(caught.value)
    assert "movie 5" in message and second.model_version in message
    assert loaded.model_version in message
    assert old.read(3, np.array([4, 6])).movie_found.all()

    # The reader of the new version refuses the old project outright.
    with pytest.raises(StaleFeatures, match=loaded.model_version):
        _reader(redis_url, second.manifest).read(3, movie_ids)
    old.close()
    new.close()


def test_a_new_version_materialized_while_the_old_is_read(
    feast_repo, tiny_artifacts, second_artifacts, loaded, redis_url
):
    second = artifacts_io.load(second_artifacts)
    _materialize(tiny_artifacts, redis_url, feast_repo)
    movie_ids = loaded.model.movies.ids
    expected = {u: _offline(loaded.model, u, movie_ids)[0] for u in (1, 2, 3)}
    old = _reader(redis_url, loaded.manifest)
    outcomes: list[str] = []
    stop = threading.Event()

    def serve_old_version() -> None:
        while not stop.is_set():
            user_id = (len(outcomes) % 3) + 1
            try:
                matrix, _ = old.features(user_id, movie_ids)
            except StaleFeatures:
                outcomes.append("refused")
                continue
            outcomes.append("exact" if _bitwise_equal(matrix, expected[user_id]) else "WRONG")

    reader_thread = threading.Thread(target=serve_old_version)
    reader_thread.start()
    try:
        # Side by side in another project, the old version is never disturbed ...
        _materialize(second_artifacts, redis_url, feast_repo, project="reelrank_next")
        beside = len(outcomes)
        assert set(outcomes) == {"exact"}
        # ... and over it in the same project, it is refused, never mixed.
        _materialize(second_artifacts, redis_url, feast_repo, batch_rows=1)
    finally:
        stop.set()
        reader_thread.join(timeout=30)

    assert beside > 0 and "WRONG" not in outcomes
    with pytest.raises(StaleFeatures):
        old.read(1, movie_ids)
    new = _reader(redis_url, second.manifest)
    assert _bitwise_equal(new.features(1, movie_ids)[0], _offline(second.model, 1, movie_ids)[0])
    old.close()
    new.close()


def test_rows_of_entities_a_new_run_lacks_are_removed(
    feast_repo, tiny_artifacts, second_artifacts, redis_url
):
    second = artifacts_io.load(second_artifacts)
    _materialize(tiny_artifacts, redis_url, feast_repo)
    with redis.Redis.from_url(redis_url) as client:
        # A user only the old run had.
        assert client.copy(_row_key("user", 1), _row_key("user", 555))

    result = _materialize(second_artifacts, redis_url, feast_repo)
    assert result.rows_removed == {"user_features": 1, "movie_features": 0}
    reader = _reader(redis_url, second.manifest)
    rows = reader.read(555, np.array([1]))
    assert not rows.user_found
    assert _bitwise_equal(
        reader.features(555, np.array([1]))[0], _offline(second.model, 555, np.array([1]))[0]
    )
    reader.close()


def test_feature_store_yaml_takes_redis_url_from_the_environment(feast_repo, monkeypatch):
    from feast.repo_config import load_repo_config

    monkeypatch.delenv("REDIS_URL", raising=False)
    config = load_repo_config(feast_repo, feast_repo / "feature_store.yaml")
    assert config.online_store.redis_url == "redis://127.0.0.1:6379/0"

    monkeypatch.setenv("REDIS_URL", "rediss://:pw@cache.example:6380/2")
    config = load_repo_config(feast_repo, feast_repo / "feature_store.yaml")
    assert config.online_store.redis_url == "rediss://:pw@cache.example:6380/2"
    assert config.project == "reelrank"
