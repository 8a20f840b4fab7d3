"""``reelrank``: the one command line for data, training, evaluation, the feature store and serving.

Every user mistake surfaces as one plain ``error:`` line and exit status 2; only bugs show a
traceback. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from training.errors import ReelrankError

_log = logging.getLogger("reelrank")

app = typer.Typer(
    help="Train, evaluate and serve a two-stage (MF embeddings + LightGBM) movie ranker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Get MovieLens data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Directory in ML-100K layout. Default: $MOVIELENS_DIR, then the download cache.",
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
ArtifactsOption = Annotated[
    Path, typer.Option("--artifacts", help="Artifacts directory written by `reelrank train`.")
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option("--tls-ca", help="CA certificate (PEM) of a server started with --tls-cert."),
]
TlsClientCertOption = Annotated[
    Path | None,
    typer.Option("--tls-client-cert", help="Client certificate (PEM) for --tls-client-ca servers."),
]
TlsClientKeyOption = Annotated[
    Path | None, typer.Option("--tls-client-key", help="Private key (PEM) of --tls-client-cert.")
]


def client_tls(ca: Path | None, cert: Path | None, key: Path | None):
    """The client TLS settings of the --tls-* options; None for plain TCP."""
    from ranker.tls import ClientTls, TlsConfigError

    if ca is None:
        if cert is not None or key is not None:
            raise TlsConfigError("--tls-client-cert and --tls-client-key need --tls-ca too")
        return None
    return ClientTls(ca_file=ca, cert_file=cert, key_file=key)


@app.callback()
def _configure(
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("feast", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@data_app.command("fetch")
def data_fetch(
    dest: Annotated[
        Path | None,
        typer.Option(
            "--dest", help="Where to unpack. Default: $REELRANK_CACHE_DIR or ~/.cache/reelrank."
        ),
    ] = None,
) -> None:
    """Download the official ML-100K zip, verify its checksum and unpack it."""
    from training.data import fetch_movielens

    path = fetch_movielens(dest)
    typer.echo(f"MovieLens ML-100K is ready in {path}")


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Artifacts directory to write.")],
    data: DataOption = None,
    seed: SeedOption = 0,
    ratings_file: Annotated[
        str,
        typer.Option(
            "--ratings",
            help="Ratings to train on, in u.data format: a file inside --data (u1.base) or a path.",
        ),
    ] = "u.data",
    n_factors: Annotated[int, typer.Option(help="Embedding length.", min=1)] = 32,
    max_epochs: Annotated[int, typer.Option(help="Stage-1 epoch limit.", min=1)] = 40,
    learning_rate: Annotated[float, typer.Option(help="Stage-1 learning rate.", min=0)] = 3e-3,
    l2: Annotated[float, typer.Option(help="Stage-1 L2 penalty on factors.", min=0)] = 0.1,
    bias_l2: Annotated[float, typer.Option(help="Stage-1 L2 penalty on biases.", min=0)] = 0.01,
) -> None:
    """Train the rating model (MF embeddings + LightGBM) and the ranking model (candidate stage
    + LightGBM rank_xendcg) and write an artifacts directory."""
    from training.data import resolve_data_dir
    from training.pipeline import train as run_train

    config = _train_config(n_factors, max_epochs, learning_rate, l2, bias_l2)
    manifest = run_train(resolve_data_dir(data), out, config, seed, ratings_file)
    timings = manifest["training"]["timings_s"]
    typer.echo(
        f"model {manifest['model_version']} written to {out} "
        f"({manifest['data']['n_ratings']} ratings, {timings['total_s']:.1f} s: rating model "
        f"{timings['rating_total_s']:.1f} s, ranking model {timings['ranking_total_s']:.1f} s; "
        f"stage-1 out-of-fold RMSE {manifest['metrics']['stage1_out_of_fold_rmse']:.4f})"
    )


def _train_config(n_factors, max_epochs, learning_rate, l2, bias_l2):
    from training.embeddings import MFConfig
    from training.model import TrainConfig

    mf = MFConfig(
        n_factors=n_factors,
        max_epochs=max_epochs,
        learning_rate=learning_rate,
        l2=l2,
        bias_l2=bias_l2,
    )
    return TrainConfig(mf=mf)


@app.command()
def predict(
    artifacts: ArtifactsOption,
    pairs: Annotated[Path, typer.Option("--pairs", help="TSV of user_id, movie_id.")],
    out: Annotated[Path, typer.Option("--out", help="TSV to write: user_id movie_id prediction.")],
) -> None:
    """Predict ratings for (user, movie) pairs with a trained model."""
    from training.errors import DataError
    from training.pipeline import predict as run_predict

    if not pairs.is_file():
        raise DataError("no such file", pairs)
    counts = run_predict(artifacts, pairs, out)
    if counts["unknown_users"] or counts["unknown_movies"]:
        _log.warning(
            "cold start: %d pairs with an unknown user (e.g. %s) and %d with an unknown movie "
            "(e.g. %s) were scored with population defaults",
            counts["unknown_users"],
            counts["unknown_user_ids"],
            counts["unknown_movies"],
            counts["unknown_movie_ids"],
        )
    typer.echo(f"wrote {counts['pairs']} predictions to {out}")


@app.command()
def recommend(
    artifacts: ArtifactsOption,
    out: Annotated[Path, typer.Option("--out", help="TSV to write: user_id rank movie_id score.")],
    k: Annotated[int, typer.Option("--k", help="Movies per user.", min=1)] = 10,
    users: Annotated[
        str | None,
        typer.Option("--users", help="Comma-separated user ids. Default: every user."),
    ] = None,
) -> None:
    """Write every user's top-k unrated movies, ranked by the ranking model."""
    from training.pipeline import read_user_ids
    from training.pipeline import recommend as run_recommend

    user_ids = read_user_ids(users) if users is not None else None
    counts = run_recommend(artifacts, out, k, user_ids)
    if counts["cold_start_users"]:
        _log.warning(
            "cold start: %d users without training interactions (e.g. %s) got the most "
            "popular movies, scored by popularity",
            counts["cold_start_users"],
            counts["cold_start_user_ids"],
        )
    typer.echo(f"wrote {counts['rows']} recommendations for {counts['users']} users to {out}")


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Report directory to write.")],
    data: DataOption = None,
    seed: SeedOption = 0,
    folds: Annotated[
        str, typer.Option("--folds", help="Comma-separated canonical folds.")
    ] = "u1,u2,u3,u4,u5",
    protocols: Annotated[
        str,
        typer.Option(
            "--protocols",
            help="rating (canonical folds, RMSE/MAE), ranking (per-user 75/25 split of --seed, "
            "NDCG/Precision/Recall@10), or both.",
        ),
    ] = "rating,ranking",
) -> None:
    """Compare the two-stage rating model and the ranking model with their peers."""
    from training.data import resolve_data_dir
    from training.model import TrainConfig
    from training.pipeline import PROTOCOLS
    from training.pipeline import evaluate as run_evaluate
    from training.report import ranking_table, rating_table

    fold_list = [f.strip() for f in folds.split(",") if f.strip()]
    bad = [f for f in fold_list if f not in {"u1", "u2", "u3", "u4", "u5", "ua", "ub"}]
    if bad or not fold_list:
        raise typer.BadParameter(f"unknown folds {bad}; use u1..u5, ua, ub", param_hint="--folds")
    chosen = tuple(p.strip() for p in protocols.split(",") if p.strip())
    if not chosen or set(chosen) - set(PROTOCOLS):
        raise typer.BadParameter(
            f"{protocols!r}: choose from {', '.join(PROTOCOLS)}", param_hint="--protocols"
        )
    metrics = run_evaluate(
        resolve_data_dir(data), out, TrainConfig(), seed, fold_list, protocols=chosen
    )
    if "summary" in metrics:
        typer.echo(rating_table(metrics))
    if "ranking" in metrics:
        typer.echo("\n" + ranking_table(metrics["ranking"]))
    typer.echo(f"\nreport written to {out / 'report.md'}")


@app.command()
def materialize(
    artifacts: ArtifactsOption,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental", help="Write nothing if the store already holds this model version."
        ),
    ] = False,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url", help="Online store. Default: $REDIS_URL, then redis://127.0.0.1:6379/0."
        ),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option("--project", help="Feast project. Default: feature_store.yaml's (reelrank)."),
    ] = None,
    repo: Annotated[
        Path | None,
        typer.Option("--repo", help="Feast repository. Default: this checkout's feature_repo/."),
    ] = None,
) -> None:
    """Load a model version's feature tables into Feast: offline files and Redis online store."""
    from ranker.feast_import import materialize_module
    from ranker.online_store import check_reachable
    from ranker.redis_url import redact, resolve

    # Fail in a second, before Feast's import takes several.
    url = resolve(redis_url)
    check_reachable(url)

    feast = materialize_module()
    config = feast.MaterializeConfig(
        artifacts=artifacts, repo=repo, redis_url=url, project=project, incremental=incremental
    )
    result = feast.materialize(config)
    for view, rows in result.rows_written.items():
        typer.echo(
            f"{view}: {rows} rows written, {result.rows_removed[view]} stale rows removed"
            + (f" ({result.seconds[view]:.2f} s)" if view in result.seconds else "")
        )
    verb = "already held" if result.skipped else "materialized"
    typer.echo(
        f"model {result.model_version} {verb} in project {result.project} at {redact(url)} "
        f"({result.seconds['total']:.1f} s)"
    )


@app.command()
def serve(
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts", help="Artifacts directory written by `reelrank train` (or --release)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port; 0 picks a free one.", min=0)] = 50051,
    workers: Annotated[
        int, typer.Option(help="Server processes sharing the port (about one per core).", min=1)
    ] = 1,
    redis_url: Annotated[
        str, typer.Option("--redis-url", envvar="REDIS_URL", help="Online store (Feast's Redis).")
    ] = "redis://127.0.0.1:6379/0",
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.", min=0)
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            help="RPC threads per worker process: calls one worker runs at once, health checks "
            "included; more queue.",
            min=2,
        ),
    ] = 2,
    max_in_flight: Annotated[
        int,
        typer.Option(
            help="Calls one worker holds at once, running or queued for a thread; a call beyond "
            "them is answered RESOURCE_EXHAUSTED at once, so a caller can go elsewhere.",
            min=1,
        ),
    ] = 64,
    max_candidates: Annotated[
        int, typer.Option(help="Most candidates one request may carry.", min=1)
    ] = 10_000,
    store_timeout_ms: Annotated[
        float, typer.Option(help="Longest wait for one online store read.", min=1)
    ] = 1000.0,
    grace_s: Annotated[
        float, typer.Option(help="On SIGTERM, time in-flight calls get to finish.", min=0)
    ] = 10.0,
    project: Annotated[
        str, typer.Option("--project", help="Feast project whose rows to read.")
    ] = "reelrank",
    release: Annotated[
        Path | None,
        typer.Option(
            "--release",
            help='JSON {"artifacts": DIR, "project": NAME}; replaces --artifacts and --project, '
            "and SIGHUP reloads it with no failed calls.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve TLS with this certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="Private key (PEM) of --tls-cert.")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option("--tls-client-ca", help="Require client certificates signed by this CA."),
    ] = None,
    movie_cache_rows: Annotated[
        int,
        typer.Option(
            help="Movie rows of the served model version kept in memory once read; 0 reads "
            "every row from Redis on every call.",
            min=0,
        ),
    ] = 100_000,
    user_cache_users: Annotated[
        int,
        typer.Option(
            help="Users whose candidate stage, ranking features and catalogue scores are kept "
            "between calls, keyed by their row's exact stored bytes (re-read on every call); "
            "0 keeps none.",
            min=0,
        ),
    ] = 1024,
    warm_users: Annotated[
        int | None,
        typer.Option(
            help="Most active users whose contexts are built before health turns SERVING "
            "(and before a reload swaps in). Default: as many as --user-cache-users; 0: none.",
            min=0,
        ),
    ] = None,
    compiled_trees: Annotated[
        bool,
        typer.Option(
            help="Score with the trees compiled to native code (gcc) once proven identical."
        ),
    ] = True,
) -> None:
    """Serve the model over gRPC (reelrank.v1.Ranker, health, reflection) until SIGTERM;
    SIGHUP reloads the artifacts (or the --release file) and swaps them in when the store holds
    their version."""
    from ranker.online_store import OnlineStoreConfig
    from ranker.server import ServerConfig, read_release
    from ranker.server import serve as run_serve
    from ranker.service import RankerConfig
    from ranker.tls import ServerTls, TlsConfigError

    if (artifacts is None) == (release is None):
        raise typer.BadParameter("give exactly one of --artifacts and --release")
    if release is not None:
        artifacts, project = read_release(release)
    if (tls_cert is None) != (tls_key is None):
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    if tls_client_ca is not None and tls_cert is None:
        raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = None
    if tls_cert is not None:
        tls = ServerTls(cert_file=tls_cert, key_file=tls_key, client_ca_file=tls_client_ca)

    config = ServerConfig(
        artifacts_dir=artifacts,
        host=host,
        port=port,
        workers=workers,
        threads=threads,
        max_concurrent_rpcs=max_in_flight,
        metrics_port=metrics_port,
        shutdown_grace_s=grace_s,
        store=OnlineStoreConfig(
            redis_url=redis_url,
            project=project,
            socket_timeout_s=store_timeout_ms / 1e3,
            movie_cache_rows=movie_cache_rows,
        ),
        ranker=RankerConfig(
            max_candidates=max_candidates,
            compiled_trees=compiled_trees,
            user_cache_users=user_cache_users,
            warm_users=warm_users,
        ),
        tls=tls,
        release_file=release,
    )
    raise typer.Exit(run_serve(config, log_level=logging.getLogger().level))


@app.command()
def rank(
    user: Annotated[int, typer.Option("--user", help="User id to rank for.")],
    candidates: Annotated[
        str | None,
        typer.Option(
            "--candidates",
            help="Comma-separated movie ids. Default: every movie of --artifacts if given, "
            "else the service's candidate stage picks from the whole catalogue.",
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="How many to show; 0 shows all.", min=0)] = 10,
    target: Annotated[
        str, typer.Option("--target", help="host:port of `reelrank serve`.")
    ] = "127.0.0.1:50051",
    artifacts: Annotated[
        Path | None,
        typer.Option("--artifacts", help="Artifacts directory whose catalogue to rank."),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show the features that moved each score most.")
    ] = False,
    ratings: Annotated[
        bool, typer.Option("--ratings", help="Show each movie's predicted rating (1-5) too.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the raw response as JSON.")
    ] = False,
    deadline_s: Annotated[
        float, typer.Option(help="Longest wait for the connection and the answer.", min=0.001)
    ] = 5.0,
    tls_ca: TlsCaOption = None,
    tls_client_cert: TlsClientCertOption = None,
    tls_client_key: TlsClientKeyOption = None,
) -> None:
    """Ask a running ranking service to rank movies for a user and print them with titles."""
    from google.protobuf.json_format import MessageToJson
    from rich.console import Console

    from ranker.client import ClientConfig, RankerClient, ranking_table

    candidate_ids = _candidate_ids(candidates, artifacts)
    tls = client_tls(tls_ca, tls_client_cert, tls_client_key)
    with RankerClient(ClientConfig(target=target, deadline_s=deadline_s, tls=tls)) as client:
        client.wait_until_connected()
        response = client.rank(
            user, candidate_ids, top_k=k, explain=explain, predicted_ratings=ratings
        )
    if as_json:
        typer.echo(MessageToJson(response, preserving_proto_field_name=True))
        return
    Console().print(ranking_table(response, user))
    if response.not_found_ids:
        shown = ", ".join(map(str, response.not_found_ids[:20]))
        more = " ..." if len(response.not_found_ids) > 20 else ""
        typer.echo(f"not found (not scored): {shown}{more}")


def _candidate_ids(candidates: str | None, artifacts: Path | None) -> list[int]:
    if candidates is not None:
        try:
            return [int(part) for part in candidates.split(",") if part.strip()]
        except ValueError:
            raise typer.BadParameter(
                f"{candidates!r} is not a comma-separated list of integers",
                param_hint="--candidates",
            ) from None
    if artifacts is None:
        # No candidates: the service's candidate stage picks them from the whole catalogue.
        return []
    from training.artifacts import TITLES, read_frame
    from training.errors import ArtifactError

    path = artifacts / TITLES
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; is {artifacts} an artifacts directory?")
    return read_frame(path, columns=["movie_id"])["movie_id"].tolist()


@app.command()
def health(
    target: Annotated[
        str, typer.Option("--target", help="host:port of `reelrank serve`.")
    ] = "127.0.0.1:50051",
    wait_s: Annotated[
        float, typer.Option(help="Keep asking this long for SERVING before giving up.", min=0)
    ] = 0.0,
    tls_ca: TlsCaOption = None,
    tls_client_cert: TlsClientCertOption = None,
    tls_client_key: TlsClientKeyOption = None,
) -> None:
    """Ask the service's grpc.health.v1 status; exit 0 if SERVING, 1 otherwise (a probe)."""
    from ranker.client import wait_until_serving

    tls = client_tls(tls_ca, tls_client_cert, tls_client_key)
    status = wait_until_serving(target, wait_s, tls=tls)
    typer.echo(f"{target}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)


@app.command()
def bench(
    artifacts: ArtifactsOption,
    target: Annotated[
        str | None,
        typer.Option("--target", help="host:port of a running service. Default: start one."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Online store. Default: a private redis-server (with --target: $REDIS_URL).",
        ),
    ] = None,
    project: Annotated[
        str, typer.Option("--project", help="Feast project to materialize into (or read).")
    ] = "reelrank_bench",
    repo: Annotated[
        Path | None,
        typer.Option("--repo", help="Feast repository of --target. Default: feature_repo/."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes of a started service.", min=1)] = 1,
    concurrency: Annotated[int, typer.Option(help="Calls in flight, concurrent phase.", min=1)] = 4,
    candidates: Annotated[
        str, typer.Option("--candidates", help="Comma-separated candidate counts.")
    ] = "10,100,1000",
    requests: Annotated[int, typer.Option(help="Calls per phase and count.", min=1)] = 400,
    naive_requests: Annotated[int, typer.Option(help="Naive-path calls per count.", min=1)] = 40,
    runs: Annotated[int, typer.Option(help="Repetitions of every phase.", min=1)] = 3,
    max_phase_s: Annotated[float, typer.Option(help="Time limit of one phase.", min=1)] = 30.0,
    serve_option: Annotated[
        list[str] | None,
        typer.Option("--serve-option", help="Extra `reelrank serve` option (repeatable)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write every figure to this JSON file.")
    ] = None,
) -> None:
    """Measure the service over gRPC (10/100/1000 candidates, sequential and concurrent)
    against Feast's get_online_features plus LightGBM on the same requests."""
    import json

    from ranker.bench import BenchConfig, figures_table
    from ranker.bench import run as run_bench

    try:
        counts = tuple(int(part) for part in candidates.split(",") if part.strip())
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(
            f"{candidates!r} is not a list of positive integers", param_hint="--candidates"
        ) from None
    config = BenchConfig(
        artifacts=artifacts,
        target=target,
        redis_url=redis_url,
        project=project,
        repo=repo,
        workers=workers,
        serve_options=tuple(serve_option or ()),
        candidate_counts=counts,
        requests=requests,
        naive_requests=naive_requests,
        concurrency=concurrency,
        runs=runs,
        max_phase_s=max_phase_s,
    )
    report = run_bench(config, progress=lambda line: typer.echo(line, err=True))
    report["command"] = " ".join(["reelrank", *sys.argv[1:]])
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(figures_table(report).to_string(index=False))
    peaks = ", ".join(f"{mb:.0f}" for mb in report["worker_peak_rss_mb"]) or "n/a"
    typer.echo(f"peak RSS per worker (MB): {peaks}; machine: {report['machine_at_end']}")


@app.command()
def demo(
    data: DataOption = None,
    out: Annotated[
        Path, typer.Option("--artifacts", help="Artifacts directory; trained if it holds none.")
    ] = Path("artifacts/ml-100k"),
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Also evaluate (about 5 minutes) into this directory."),
    ] = None,
    redis_url: Annotated[
        str, typer.Option("--redis-url", envvar="REDIS_URL", help="Online store (Feast's Redis).")
    ] = "redis://127.0.0.1:6379/0",
    project: Annotated[
        str | None, typer.Option("--project", help="Feast project. Default: reelrank.")
    ] = None,
    repo: Annotated[
        Path | None,
        typer.Option("--repo", help="Feast repository. Default: this checkout's feature_repo/."),
    ] = None,
    users: Annotated[
        str, typer.Option("--users", help="Comma-separated users to rank for.")
    ] = "1,42,405",
    k: Annotated[int, typer.Option("--k", help="Movies shown per user.", min=1)] = 5,
    seed: SeedOption = 0,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train even if --artifacts holds a run.")
    ] = False,
) -> None:
    """Train, (evaluate,) materialize, serve over gRPC, rank a few users, stop: end to end."""
    from rich.console import Console

    from ranker.demo import DemoConfig
    from ranker.demo import run as run_demo
    from ranker.redis_url import resolve
    from training.data import resolve_data_dir
    from training.pipeline import read_user_ids

    config = DemoConfig(
        data_dir=resolve_data_dir(data),
        artifacts=out,
        redis_url=resolve(redis_url),
        report_dir=report,
        users=read_user_ids(users).tolist(),
        k=k,
        seed=seed,
        project=project,
        repo=repo,
        retrain=retrain,
    )
    console = Console()
    for step in run_demo(config, show=console.print):
        typer.echo(f"- {step}")


def main() -> None:
    """Console entry point: run the app and turn user mistakes into one clear line."""
    try:
        app()
    except ReelrankError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
