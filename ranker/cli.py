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
        str, typer.Option("--ratings", help="Ratings file inside --data, e.g. u1.base.")
    ] = "u.data",
    n_factors: Annotated[int, typer.Option(help="Embedding length.", min=1)] = 32,
    max_epochs: Annotated[int, typer.Option(help="Stage-1 epoch limit.", min=1)] = 40,
    learning_rate: Annotated[float, typer.Option(help="Stage-1 learning rate.", min=0)] = 3e-3,
    l2: Annotated[float, typer.Option(help="Stage-1 L2 penalty on factors.", min=0)] = 0.1,
    bias_l2: Annotated[float, typer.Option(help="Stage-1 L2 penalty on biases.", min=0)] = 0.01,
) -> None:
    """Train stage 1 (embeddings) and stage 2 (LightGBM) and write an artifacts directory."""
    from training.data import resolve_data_dir
    from training.pipeline import train as run_train

    config = _train_config(n_factors, max_epochs, learning_rate, l2, bias_l2)
    manifest = run_train(resolve_data_dir(data), out, config, seed, ratings_file)
    timings = manifest["training"]["timings_s"]
    typer.echo(
        f"model {manifest['model_version']} written to {out} "
        f"({manifest['data']['n_ratings']} ratings, {timings['total_s']:.1f} s; stage-1 "
        f"out-of-fold RMSE {manifest['metrics']['stage1_out_of_fold_rmse']:.4f})"
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
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Report directory to write.")],
    data: DataOption = None,
    seed: SeedOption = 0,
    folds: Annotated[
        str, typer.Option("--folds", help="Comma-separated canonical folds.")
    ] = "u1,u2,u3,u4,u5",
) -> None:
    """Compare the two-stage model with its baselines on the canonical ML-100K folds."""
    from training.data import resolve_data_dir
    from training.model import TrainConfig
    from training.pipeline import evaluate as run_evaluate
    from training.report import rating_table

    fold_list = [f.strip() for f in folds.split(",") if f.strip()]
    bad = [f for f in fold_list if f not in {"u1", "u2", "u3", "u4", "u5", "ua", "ub"}]
    if bad or not fold_list:
        raise typer.BadParameter(f"unknown folds {bad}; use u1..u5, ua, ub", param_hint="--folds")
    metrics = run_evaluate(resolve_data_dir(data), out, TrainConfig(), seed, fold_list)
    typer.echo(rating_table(metrics))
    typer.echo(f"\nreport written to {out / 'report.md'}")


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
