"""Turn evaluation metrics into ``metrics.json``, ``report.md`` and PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training.evaluate import MODEL_LABELS, MODELS  # noqa: E402
from training.ranking_eval import MODEL_LABELS as RANKING_LABELS  # noqa: E402
from training.ranking_eval import MODELS as RANKING_MODELS  # noqa: E402

_log = logging.getLogger(__name__)


def write_report(metrics: dict, out_dir: Path) -> None:
    """``metrics.json``, ``report.md`` and the plots of whichever protocols ``metrics`` holds
    (the rating protocol's keys at the top level, the ranking protocol under ``ranking``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    parts = []
    if "summary" in metrics:
        _plot_slices(metrics, out_dir / "rmse_by_slice.png")
        _plot_importance(
            metrics["feature_importance"], out_dir / "feature_importance.png", "Stage-2"
        )
        parts.append(render_markdown(metrics))
    if "ranking" in metrics:
        ranking = metrics["ranking"]
        _plot_ranking(ranking, out_dir / "ranking_metrics.png")
        _plot_importance(
            ranking["ranker"]["feature_importance"],
            out_dir / "ranking_feature_importance.png",
            "Ranking-model",
        )
        parts.append(render_ranking_markdown(ranking))
    (out_dir / "report.md").write_text("\n\n".join(parts))
    _log.info("wrote metrics.json, report.md and plots to %s", out_dir)


def ranking_table(ranking: dict) -> str:
    """NDCG, Precision and Recall at k of every ranking peer, as Markdown."""
    k = ranking["protocol"]["k"]
    lines = [
        f"| Model | NDCG@{k} | Precision@{k} | Recall@{k} |",
        "|---|---|---|---|",
    ]
    for model in RANKING_MODELS:
        row = ranking["models"][model]
        lines.append(
            f"| {RANKING_LABELS[model]} | {row[f'ndcg_at_{k}']:.4f} | "
            f"{row[f'precision_at_{k}']:.4f} | {row[f'recall_at_{k}']:.4f} |"
        )
    return "\n".join(lines)


def render_ranking_markdown(ranking: dict) -> str:
    protocol = ranking["protocol"]
    k = protocol["k"]
    seconds = ranking["train_seconds"]
    return "\n".join(
        [
            "# reelrank ranking evaluation",
            "",
            f"Each user's ratings are split at random, {protocol['train_fraction']:.0%} for "
            f"training (seed {protocol['seed']}): {protocol['train_ratings']} training and "
            f"{protocol['test_ratings']} held-out ratings. Every model is fitted on the training "
            f"part alone and lists, for each of {ranking['models']['ranker']['users']} users, "
            f"its top {k} among all movies the user did not rate in training; any held-out "
            f"rating makes a movie relevant. The split is in `{protocol['train_file']}` and "
            f"`{protocol['test_file']}`.",
            "",
            ranking_table(ranking),
            "",
            f"Training time: rating model {seconds['rating_model']:.0f} s, ranking model "
            f"{seconds['ranking_model']:.0f} s.",
            "",
            "![Ranking metrics](ranking_metrics.png)",
            "",
            "![Ranking-model feature importance](ranking_feature_importance.png)",
            "",
            "## Conclusion",
            "",
            *ranking_conclusion(ranking),
            "",
        ]
    )


def ranking_conclusion(ranking: dict) -> list[str]:
    """Sentences drawn from the ranking figures."""
    k = ranking["protocol"]["k"]
    ndcg = {m: ranking["models"][m][f"ndcg_at_{k}"] for m in RANKING_MODELS}
    best_peer = max((m for m in RANKING_MODELS if m != "ranker"), key=ndcg.get)
    top = list(ranking["ranker"]["feature_importance"].items())[:5]
    return [
        f"- The ranking model reaches NDCG@{k} {ndcg['ranker']:.4f}, against "
        f"{ndcg[best_peer]:.4f} for its strongest peer ({RANKING_LABELS[best_peer]}, "
        f"{ndcg['ranker'] - ndcg[best_peer]:+.4f}).",
        f"- Stage 1, trained to predict ratings, ranks at NDCG@{k} {ndcg['stage1']:.4f}, "
        f"{'below' if ndcg['stage1'] < ndcg['popularity'] else 'above'} plain popularity "
        f"({ndcg['popularity']:.4f}): a good rating predictor is not a good ranker of what a "
        "user will watch.",
        "- The features the ranking model leans on most (share of gain): "
        + ", ".join(f"`{n}` {v:.1%}" for n, v in top)
        + ".",
    ]


def rating_table(metrics: dict) -> str:
    """The per-fold and mean ± std RMSE/MAE table, as Markdown."""
    folds = list(metrics["per_fold"])
    header = (
        "| Model | "
        + " | ".join(f"{f} RMSE" for f in folds)
        + " | RMSE mean ± std | MAE mean ± std |"
    )
    lines = [header, "|" + "---|" * (len(folds) + 3)]
    for model in MODELS:
        cells = [f"{metrics['per_fold'][f][model]['rmse']:.4f}" for f in folds]
        summary = metrics["summary"][model]
        lines.append(
            f"| {MODEL_LABELS[model]} | "
            + " | ".join(cells)
            + f" | {summary['rmse']['mean']:.4f} ± {summary['rmse']['std']:.4f}"
            + f" | {summary['mae']['mean']:.4f} ± {summary['mae']['std']:.4f} |"
        )
    return "\n".join(lines)


def render_markdown(metrics: dict) -> str:
    protocol = metrics["protocol"]
    parts = [
        "# reelrank rating evaluation",
        "",
        f"Folds {', '.join(protocol['folds'])} of ML-100K: every model is fitted on "
        "`{fold}.base` only (stage 1, out-of-fold stage-2 features and stage 2 included) and "
        f"scored on `{{fold}}.test`. Seed {protocol['seed']}; data fingerprint "
        f"`{protocol['data_fingerprint'][:16]}`.",
        "",
        "## RMSE and MAE",
        "",
        rating_table(metrics),
        "",
        "## By how many training ratings the user and the movie have (RMSE, pooled over folds)",
        "",
    ]
    for name, rows in metrics["slices"].items():
        parts.append(f"### {name.replace('_', ' ')}")
        parts.append("")
        parts.append(
            "| Slice | Test ratings | " + " | ".join(MODEL_LABELS[m] for m in MODELS) + " |"
        )
        parts.append("|" + "---|" * (len(MODELS) + 2))
        for row in rows:
            cells = " | ".join(f"{row[m]:.4f}" for m in MODELS)
            parts.append(f"| {row['slice']} | {row['n']} | {cells} |")
        parts.append("")
    parts += [
        "![RMSE by slice](rmse_by_slice.png)",
        "",
        "![Feature importance](feature_importance.png)",
        "",
        "## Conclusion",
        "",
        *conclusion(metrics),
        "",
    ]
    return "\n".join(parts)


def conclusion(metrics: dict) -> list[str]:
    """Sentences drawn from the figures, so they stay true when the figures change."""
    summary = {m: metrics["summary"][m]["rmse"]["mean"] for m in MODELS}
    per_fold = metrics["per_fold"]
    wins = sum(per_fold[f]["two_stage"]["rmse"] < per_fold[f]["stage1"]["rmse"] for f in per_fold)
    lines = [
        f"- The two-stage model's mean RMSE is {summary['two_stage']:.4f} against "
        f"{summary['stage1']:.4f} for stage 1 alone "
        f"({summary['stage1'] - summary['two_stage']:+.4f}); it is lower on {wins} of "
        f"{len(per_fold)} folds.",
        _embeddings_versus_side_features(summary),
    ]
    for name, rows in metrics["slices"].items():
        gains = [(r["stage1"] - r["two_stage"], r["slice"]) for r in rows]
        best, worst = max(gains), min(gains)
        entity = "users" if name.startswith("user") else "movies"
        lines.append(
            f"- By {entity}' training ratings, stage 2 helps most for {best[1]} "
            f"({best[0]:+.4f} RMSE) and least for {worst[1]} ({worst[0]:+.4f})."
        )
        beaten = [r["slice"] for r in rows if r["side_features_lgbm"] < r["two_stage"]]
        if beaten:
            lines.append(
                f"- For {entity} with {', '.join(beaten)} training ratings, side features alone "
                "beat the two-stage model: there the embeddings are mostly noise, and stage 2 "
                "does not discount them fully."
            )
    top = list(metrics["feature_importance"].items())[:5]
    lines.append(
        "- The features stage 2 leans on most (share of gain): "
        + ", ".join(f"`{n}` {v:.1%}" for n, v in top)
        + "."
    )
    return lines


def _embeddings_versus_side_features(summary: dict[str, float]) -> str:
    stage1, side = summary["stage1"], summary["side_features_lgbm"]
    stronger = "embeddings (stage 1)" if stage1 < side else "side features (LightGBM)"
    return (
        f"- Alone, stage 1 reaches {stage1:.4f} and LightGBM on side features {side:.4f} (bias "
        f"baseline {summary['bias_baseline']:.4f}, global mean {summary['global_mean']:.4f}): "
        f"the {stronger} carry more on their own, and the two-stage model is better than "
        f"either by {min(stage1, side) - summary['two_stage']:+.4f}."
    )


def _plot_slices(metrics: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, len(metrics["slices"]), figsize=(12, 4.5), squeeze=False)
    for axis, (name, rows) in zip(axes[0], metrics["slices"].items()):
        labels = [r["slice"] for r in rows]
        for model in ("bias_baseline", "stage1", "side_features_lgbm", "two_stage"):
            axis.plot(labels, [r[model] for r in rows], marker="o", label=MODEL_LABELS[model])
        axis.set_title(f"RMSE by {name.replace('_', ' ')}")
        axis.set_xlabel("training ratings")
        axis.set_ylabel("RMSE")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_ranking(ranking: dict, path: Path) -> None:
    k = ranking["protocol"]["k"]
    measures = (f"ndcg_at_{k}", f"precision_at_{k}", f"recall_at_{k}")
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(RANKING_MODELS)
    for index, model in enumerate(RANKING_MODELS):
        values = [ranking["models"][model][m] for m in measures]
        positions = [i + (index - (len(RANKING_MODELS) - 1) / 2) * width for i in range(3)]
        axis.bar(positions, values, width, label=RANKING_LABELS[model])
    axis.set_xticks(range(3), [f"NDCG@{k}", f"Precision@{k}", f"Recall@{k}"])
    axis.set_title(f"Top-{k} over all unrated movies, per-user random split")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_importance(importance: dict, path: Path, model: str, top: int = 20) -> None:
    items = list(importance.items())[:top][::-1]
    figure, axis = plt.subplots(figsize=(7, 6))
    axis.barh([n for n, _ in items], [v for _, v in items])
    axis.set_xlabel("share of total gain")
    axis.set_title(f"{model} feature importance")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
