"""Reliability and security, for real: faults under load against a ``reelrank serve`` process,
hot reload without failures or mixing, TLS, Redis passwords and TLS, size limits, damaged
artifacts. The fault scenarios are those of ``benchmarks/faults.py``, run once and briefly."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import redis

from benchmarks import faults
from benchmarks.harness import Certificates, OwnRedis, make_certificates, materialize
from ranker.client import ClientConfig, RankerClient, RankFailed, wait_until_serving
from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker.online_store import OnlineStoreConfig
from ranker.server import ReleaseError, ReloadRefused, ServerConfig, create_server
from ranker.service import RankerConfig
from ranker.tls import ClientTls, ServerTls, TlsConfigError
from training import artifacts as artifacts_io
from training.errors import ArtifactError

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _needs_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


@pytest.fixture(scope="module")
def bed(tiny_artifacts, second_artifacts, tmp_path_factory) -> Iterator[faults.Bed]:
    """Both versions materialized into their own projects, a server on the first."""
    bed = faults.open_bed(tmp_path_factory.mktemp("bed"), [tiny_artifacts, second_artifacts])
    try:
        bed.start_serve("--store-timeout-ms", "500")
        yield bed
    finally:
        bed.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def store(redis_server: str, tiny_artifacts: Path, tmp_path_factory) -> str:
    """The session's private Redis with the tiny model in the default project."""
    from benchmarks.harness import feast_repo_copy

    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    materialize(tiny_artifacts, redis_server, feast_repo_copy(tmp_path_factory.mktemp("feast")))
    return redis_server


def _config(artifacts: Path, url: str, **overrides) -> ServerConfig:
    store_config = overrides.pop("store", OnlineStoreConfig(redis_url=url))
    return ServerConfig(
        artifacts_dir=artifacts, port=0, health_interval_s=0.1, store=store_config, **overrides
    )


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``reelrank ARGV`` in this process: exit status, stdout, stderr."""
    from ranker.cli import main

    monkeypatch.setattr(sys, "argv", ["reelrank", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code or 0, out, err


# Faults under load ------------------------------------------------------------------------------


def test_redis_outage_under_load_fails_fast_and_recovers(bed) -> None:
    result = faults.redis_outage(bed, outage_s=1.5, deadline_s=1.0)

    assert result["server_alive"], result
    # The server answered every call during the outage itself, before the deadline, saying why.
    assert set(result["codes_during_outage"]) <= {"OK", "UNAVAILABLE"}, result
    assert result["codes_during_outage"].get("UNAVAILABLE", 0) > 0
    assert result["details_name_the_store"]
    assert result["slowest_failed_call_ms"] < 1000 * result["deadline_s"]
    # Redis came back with its data and the same process serves again without help.
    assert result["recovery_s"] is not None and result["recovery_s"] < 10
    assert set(result["codes_after"]) == {"OK"}
    assert result["wrong_answers"] == []


def test_slow_redis_keeps_deadlines_without_piling_up(bed) -> None:
    result = faults.redis_slow(bed, pause_ms=1500, threads=8, deadline_s=0.3)

    assert result["server_alive"]
    assert set(result["codes_during_pause"]) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, result
    assert result["codes_during_pause"]
    assert result["slowest_call_during_pause_ms"] < 1000 * result["deadline_s"] + 200, result
    assert set(result["codes_after"]) == {"OK"}, result
    assert result["threads_after"] <= result["threads_before"] + 2, result
    assert result["rss_after_mb"] < result["rss_before_mb"] + 20, result
    assert result["wrong_answers"] == []


def test_missing_feature_is_a_status_or_a_flag_never_a_wrong_score(bed) -> None:
    result = faults.missing_feature(bed, rounds=8, seed=3)

    # A movie row the server cached earlier (same model version) may still be scored, with
    # exactly that version's score; everything else is refused or flagged.
    allowed = {
        "FAILED_PRECONDITION naming the user",
        "FAILED_PRECONDITION naming the movie",
        "OK with the version's exact scores",
    }
    assert set(result["field_deleted"]) <= allowed, result
    assert result["field_deleted"].get("FAILED_PRECONDITION naming the user", 0) > 0, result
    # A deleted candidate is flagged, unless the candidate stage needs its row for the other
    # candidates' features (it is among the user's rated movies or reference set): refused.
    assert set(result["row_deleted"]) <= {
        "movie flagged not found",
        "FAILED_PRECONDITION naming the movie",
        "OK with the version's exact scores",
    }, result
    assert result["after_restore"] == "OK"
    assert result["wrong_answers"] == []


def test_missing_movie_field_is_refused_when_not_cached(bed) -> None:
    bed.start_serve("--store-timeout-ms", "500", "--movie-cache-rows", "0")
    try:
        result = faults.missing_feature(bed, rounds=8, seed=5)
    finally:
        bed.start_serve("--store-timeout-ms", "500")
    assert result["field_deleted"].get("FAILED_PRECONDITION naming the movie", 0) > 0, result
    assert set(result["field_deleted"]) <= {
        "FAILED_PRECONDITION naming the user",
        "FAILED_PRECONDITION naming the movie",
    }, result
    assert result["row_deleted"], result
    assert set(result["row_deleted"]) <= {
        "movie flagged not found",
        "FAILED_PRECONDITION naming the movie",
    }, result
    assert result["wrong_answers"] == []


def test_hot_reload_under_load_fails_nothing_and_mixes_nothing(bed) -> None:
    result = faults.hot_reload(bed, swaps=3, interval_s=1.0)

    assert result["server_alive"]
    assert result["codes"] == {"OK": result["calls"]}, result
    assert result["wrong_answers"] == []
    assert set(result["answers_per_version"]) == set(bed.expected.versions)
    assert "reload refused" not in bed.serve.log
    # Three swaps from the first version end on the second.
    bed.write_release(0)


def test_hot_reload_reaches_every_worker(bed) -> None:
    bed.start_serve("--store-timeout-ms", "500", "--workers", "2")
    try:
        result = faults.hot_reload(bed, swaps=2, interval_s=1.0, workers=2)
    finally:
        bed.write_release(0)
        bed.start_serve("--store-timeout-ms", "500")
    assert result["codes"] == {"OK": result["calls"]}, result
    assert result["wrong_answers"] == []
    assert set(result["answers_per_version"]) == set(bed.expected.versions)


def test_reload_is_refused_when_the_store_lacks_the_new_version(bed, tmp_path) -> None:
    config = ServerConfig(
        artifacts_dir=bed.artifacts[0],
        port=0,
        release_file=bed.release,
        store=OnlineStoreConfig(redis_url=bed.redis.url),
    )
    server, port = create_server(config)
    server.start()
    try:
        assert server.model_version == bed.expected.versions[0]
        # The second model, but the first project: the store does not hold that version there.
        bed.release.write_text(
            json.dumps({"artifacts": str(bed.artifacts[1]), "project": faults.PROJECTS[0]})
        )
        with pytest.raises(ReloadRefused, match=f"holds model version {server.model_version}"):
            server.reload()
        bed.release.write_text("{not json")
        with pytest.raises(ReleaseError, match=r"line 1: not JSON"):
            server.reload()
        damaged = tmp_path / "damaged"
        shutil.copytree(bed.artifacts[1], damaged)
        with open(damaged / "rating_model.txt", "a") as handle:
            handle.write("\n")
        bed.release.write_text(json.dumps({"artifacts": str(damaged), "project": "reelrank_b"}))
        with pytest.raises(ArtifactError, match="does not match its checksum"):
            server.reload()

        with RankerClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
            assert client.rank(1, [1, 2]).model_version == bed.expected.versions[0]
    finally:
        server.stop(0)
        bed.write_release(0)


def test_sigterm_under_load_finishes_calls_in_flight_and_exits_0(bed) -> None:
    result = faults.sigterm(bed, threads=4, pause_ms=1500)

    assert result["exit_code"] == 0
    assert result["in_flight_at_sigterm"] == {"OK": 4}, result
    assert set(result["sent_after_sigterm"]) <= {"UNAVAILABLE"}
    assert result["wrong_answers"] == []


# Security ---------------------------------------------------------------------------------------


def test_the_server_listens_on_loopback_unless_told_otherwise(tiny_artifacts, store) -> None:
    assert ServerConfig(artifacts_dir=tiny_artifacts).host == "127.0.0.1"
    server, port = create_server(_config(tiny_artifacts, store))
    server.start()
    try:
        listening = [
            c.laddr
            for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        others = [
            a.address
            for addresses in psutil.net_if_addrs().values()
            for a in addresses
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        ]
        for address in others:
            with socket.socket() as probe:
                probe.settimeout(2)
                assert probe.connect_ex((address, port)) != 0, f"{address}:{port} answers"
    finally:
        server.stop(0)
    # gRPC listens on an IPv6 socket; ::ffff:127.0.0.1 is IPv4 loopback mapped into it.
    assert listening
    assert {a.ip.removeprefix("::ffff:") for a in listening} == {"127.0.0.1"}


def test_tls_server_answers_tls_clients_only(tiny_artifacts, store, certificates) -> None:
    tls = ServerTls(certificates.server_cert, certificates.server_key)
    server, port = create_server(_config(tiny_artifacts, store, tls=tls))
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        client_tls = ClientTls(certificates.ca)
        with RankerClient(ClientConfig(target=target, tls=client_tls)) as client:
            client.wait_until_connected()
            assert client.rank(1, [1, 2, 3]).movies
        assert wait_until_serving(target, 10, tls=client_tls) == "SERVING"

        with RankerClient(ClientConfig(target=target, deadline_s=1.0)) as plain:
            with pytest.raises(RankFailed) as caught:
                plain.rank(1, [1])
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_mutual_tls_refuses_clients_without_a_certificate(
    tiny_artifacts, store, certificates
) -> None:
    tls = ServerTls(certificates.server_cert, certificates.server_key, certificates.ca)
    server, port = create_server(_config(tiny_artifacts, store, tls=tls))
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        with_cert = ClientTls(certificates.ca, certificates.client_cert, certificates.client_key)
        with RankerClient(ClientConfig(target=target, tls=with_cert)) as client:
            assert client.rank(1, [1, 2]).movies
        without = ClientTls(certificates.ca)
        with RankerClient(ClientConfig(target=target, deadline_s=2.0, tls=without)) as client:
            with pytest.raises(RankFailed) as caught:
                client.rank(1, [1])
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_cli_clients_take_tls_options(
    tiny_artifacts, store, certificates, monkeypatch, capsys
) -> None:
    tls = ServerTls(certificates.server_cert, certificates.server_key)
    server, port = create_server(_config(tiny_artifacts, store, tls=tls))
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        ca = ["--tls-ca", str(certificates.ca)]
        status, out, _ = _cli(
            monkeypatch, capsys, "health", "--target", target, "--wait-s", "10", *ca
        )
        assert (status, out.strip()) == (0, f"{target}: SERVING")
        status, out, _ = _cli(
            monkeypatch, capsys, "rank", "--user", "1", "--candidates", "1,2", "--json",
            "--target", target, *ca,
        )  # fmt: skip
        assert status == 0 and json.loads(out)["movies"]
        missing = str(certificates.ca) + ".absent"
        status, _, err = _cli(
            monkeypatch, capsys, "health", "--target", target, "--tls-ca", missing
        )
        assert status == 2 and f"error: --tls-ca {missing}: no such file" in err
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("cert", None, "--tls-cert {path}: no such file"),
        ("key", "directory", "--tls-key {path}: is a directory, not a PEM file"),
        ("key", "certificate", "--tls-key {path}: holds no PEM PRIVATE KEY block"),
        ("cert", "garbage", "--tls-cert {path}: holds no PEM CERTIFICATE block"),
    ],
)
def test_unusable_tls_files_are_one_clear_error(
    tiny_artifacts, certificates, tmp_path, monkeypatch, capsys, which, content, expected
) -> None:
    files = {"cert": certificates.server_cert, "key": certificates.server_key}
    bad = tmp_path / f"bad-{which}.pem"
    if content == "directory":
        bad.mkdir()
    elif content == "certificate":
        shutil.copy(certificates.server_cert, bad)
    elif content == "garbage":
        bad.write_text("not a certificate\n")
    files[which] = bad
    status, _, err = _cli(
        monkeypatch, capsys, "serve", "--artifacts", str(tiny_artifacts), "--port", "0",
        "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
    )  # fmt: skip
    assert status == 2
    assert err.strip() == "error: " + expected.format(path=bad)
    with pytest.raises(TlsConfigError):
        create_server(
            ServerConfig(artifacts_dir=tiny_artifacts, port=0, tls=ServerTls(*files.values()))
        )


def test_redis_password_right_and_wrong(tiny_artifacts, tmp_path) -> None:
    from benchmarks.harness import feast_repo_copy

    password = "s3cret-Pw"
    protected = OwnRedis(tmp_path / "redis", password=password)
    protected.start()
    try:
        materialize(tiny_artifacts, protected.url, feast_repo_copy(tmp_path))
        server, port = create_server(_config(tiny_artifacts, protected.url))
        server.start()
        try:
            with RankerClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
                assert client.rank(1, [1, 2]).movies
        finally:
            server.stop(0)

        wrong = protected.url.replace(password, "not-the-Pw")
        server, port = create_server(_config(tiny_artifacts, wrong))
        server.start()
        try:
            with RankerClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
                with pytest.raises(RankFailed) as caught:
                    client.rank(1, [1, 2])
            problem = server.monitor.problem
        finally:
            server.stop(0)
    finally:
        protected.stop()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "refused the login" in caught.value.details
    for text in (caught.value.details, problem or ""):
        assert "not-the-Pw" not in text and password not in text
    assert ":***@127.0.0.1" in caught.value.details


def test_redis_over_tls_with_rediss_url(tiny_artifacts, certificates, tmp_path) -> None:
    from benchmarks.harness import feast_repo_copy

    secured = OwnRedis(tmp_path / "redis", password="pw-over-tls", certificates=certificates)
    secured.start()
    try:
        assert secured.url.startswith("rediss://")
        materialize(tiny_artifacts, secured.url, feast_repo_copy(tmp_path))
        server, port = create_server(_config(tiny_artifacts, secured.url))
        server.start()
        try:
            with RankerClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
                assert client.rank(1, [1, 2]).movies
        finally:
            server.stop(0)

        plain = f"redis://:pw-over-tls@127.0.0.1:{secured.port}/0"
        server, port = create_server(_config(tiny_artifacts, plain))
        server.start()
        try:
            with RankerClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
                with pytest.raises(RankFailed) as caught:
                    client.rank(1, [1])
        finally:
            server.stop(0)
    finally:
        secured.stop()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "pw-over-tls" not in caught.value.details


def test_a_call_beyond_max_in_flight_is_refused_at_once(tiny_artifacts, store) -> None:
    """The calls a worker holds are capped: the next one is RESOURCE_EXHAUSTED at once instead
    of queueing, and the held calls still finish OK."""
    config = _config(
        tiny_artifacts,
        store,
        max_concurrent_rpcs=2,
        store=OnlineStoreConfig(redis_url=store, socket_timeout_s=5.0),
    )
    server, port = create_server(config)
    server.start()
    request = ranker_pb2.RankRequest(user_id=1, candidate_ids=[1, 2])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            assert stub.Rank(request, timeout=DEADLINE_S).movies
            with redis.Redis.from_url(store) as client:
                client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            held = [stub.Rank.future(request, timeout=10) for _ in range(2)]
            time.sleep(0.3)  # both read the paused store now
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Rank(request, timeout=10)
            refused_after_s = time.monotonic() - started
            answers = [future.result() for future in held]
    finally:
        server.stop(0)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused_after_s < 1.0, "the third call waited for the store instead of failing fast"
    assert all(answer.movies for answer in answers)


def test_serve_passes_max_in_flight_to_the_server(monkeypatch, capsys, tmp_path) -> None:
    import ranker.server

    served = []
    monkeypatch.setattr(ranker.server, "serve", lambda config, log_level: served.append(config))
    argv = ("serve", "--artifacts", str(tmp_path))
    assert _cli(monkeypatch, capsys, *argv, "--max-in-flight", "7")[0] == 0
    assert served[0].max_concurrent_rpcs == 7

    status, _, err = _cli(monkeypatch, capsys, *argv, "--max-in-flight", "0")
    assert status == 2
    assert "Invalid value for '--max-in-flight'" in err
    assert len(served) == 1


def test_message_size_and_explain_limits(tiny_artifacts, store) -> None:
    config = _config(tiny_artifacts, store, ranker=RankerConfig(max_candidates=500))
    server, port = create_server(config)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            huge = ranker_pb2.RankRequest(
                user_id=1, candidate_ids=[2**40 + i for i in range(20_000)]
            )
            assert huge.ByteSize() > config.max_message_bytes
            with pytest.raises(grpc.RpcError) as caught:
                stub.Rank(huge, timeout=DEADLINE_S)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            many = ranker_pb2.RankRequest(user_id=1, candidate_ids=range(1, 201), explain=True)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Rank(many, timeout=DEADLINE_S)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "explain=True: contributions are given for at most 100 movies" in (
                caught.value.details()
            )
            many.top_k = 3
            assert len(stub.Rank(many, timeout=DEADLINE_S).movies) == 3
            assert stub.Rank(
                ranker_pb2.RankRequest(user_id=1, candidate_ids=[1]), timeout=DEADLINE_S
            ).movies
    finally:
        server.stop(0)


def _damage(root: Path, how: str) -> None:
    manifest_path = root / artifacts_io.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if how == "flipped byte":
        model = root / artifacts_io.RATING_MODEL
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
    elif how == "missing file":
        (root / artifacts_io.TITLES).unlink()
    elif how == "renamed feature":
        manifest["features"][0]["name"] = "user_something_else"
        manifest_path.write_text(json.dumps(manifest))
    elif how == "other embedding width":
        manifest["n_factors"] += 1
        manifest_path.write_text(json.dumps(manifest))
    elif how == "truncated manifest":
        manifest_path.write_text(manifest_path.read_text()[:100])


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("flipped byte", "rating_model.txt does not match its checksum in manifest.json"),
        ("missing file", "movie_titles.parquet is missing"),
        ("renamed feature", "feature list does not match"),
        ("other embedding width", "feature list does not match"),
        ("truncated manifest", "manifest.json is damaged"),
    ],
)
def test_damaged_artifacts_stop_the_server_at_start_up(
    tiny_artifacts, store, tmp_path, monkeypatch, capsys, how, expected
) -> None:
    damaged = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, damaged)
    _damage(damaged, how)
    status, _, err = _cli(
        monkeypatch, capsys, "serve", "--artifacts", str(damaged), "--port", "0",
        "--redis-url", store,
    )  # fmt: skip
    assert status == 2
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err


def test_a_store_of_another_version_keeps_the_server_not_serving(
    tiny_artifacts, second_artifacts, store
) -> None:
    from grpc_health.v1 import health_pb2

    server, port = create_server(_config(second_artifacts, store))
    server.start()
    try:
        served = artifacts_io.read_manifest(second_artifacts, verify=False)["model_version"]
        stored = artifacts_io.read_manifest(tiny_artifacts, verify=False)["model_version"]
        status = wait_until_serving(f"127.0.0.1:{port}", 1.0)
        with RankerClient(ClientConfig(target=f"127.0.0.1:{port}")) as client:
            with pytest.raises(RankFailed) as caught:
                client.rank(1, [1, 2])
    finally:
        server.stop(0)
    assert status == health_pb2.HealthCheckResponse.ServingStatus.Name(
        health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert f"holds model version {stored}, this server serves {served}" in server.monitor.problem
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert stored in caught.value.details and served in caught.value.details
