"""The artifacts directory: one self-describing, checksummed training run.

Layout::

    manifest.json            what everything is, where it came from, checksums, metrics
    user_features.parquet    the user table (the Feast offline source of ``user_features``)
    movie_features.parquet   the movie table (the Feast offline source of ``movie_features``)
    movie_titles.parquet     movie_id -> title, for people reading rankings
    rating_model.txt         stage 2 (predicted ratings), LightGBM text format
    ranking_model.txt        the ranking model the service scores with, LightGBM text format
    ranking_catalogue.npz    the candidate stage's per-version arrays (no pickles inside)

Nothing here is ever unpickled. Loading verifies every file against the manifest's sha256, so a
damaged or mixed directory is refused instead of scored with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from training.errors import ArtifactError
from training.features import (
    EntityTable,
    Field,
    ScoringConstants,
    feature_names,
    list_default,
    movie_fields,
    user_fields,
)
from training.model import TwoStageModel
from training.ranking import RankingModel, Recommender

_log = logging.getLogger(__name__)

FORMAT = "reelrank-artifacts"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
USER_TABLE = "user_features.parquet"
MOVIE_TABLE = "movie_features.parquet"
TITLES = "movie_titles.parquet"
RATING_MODEL = "rating_model.txt"

# The time every feature row is stamped with. Feast needs an event timestamp; ours says when
# the training run's features became valid.
TIMESTAMP_COLUMN = "event_timestamp"
VERSION_COLUMN = "model_version"


@dataclass
class Artifacts:
    """A loaded artifacts directory."""

    root: Path
    manifest: dict
    model: TwoStageModel
    """The rating model (stage 1 + stage 2) and the feature tables."""
    ranking: RankingModel
    """The ranking model the service scores with."""
    titles: dict[int, str]

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    def recommender(self) -> Recommender:
        """The offline ranking path over this run's feature tables."""
        return Recommender(self.ranking, self.model.users, self.model.movies, self.model.constants)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("numpy", "pandas", "pyarrow", "torch", "lightgbm", "feast"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def save(
    model: TwoStageModel,
    ranking: RankingModel,
    out_dir: Path | str,
    titles: pd.DataFrame,
    extra: dict,
) -> str:
    """Write both models to ``out_dir`` atomically and return their model version id.

    ``extra`` goes into the manifest as is (data fingerprint, config, metrics, ...). The files
    are written to a temporary sibling and swapped in, so a reader never sees half a run.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model_text = model.booster.model_to_string()
        (staging / RATING_MODEL).write_text(model_text)
        ranking_entry = ranking.save(staging)
        digest = hashlib.sha256(model_text.encode())
        digest.update(_sha256(staging / ranking_entry["file"]).encode())
        digest.update(_sha256(staging / ranking_entry["catalogue"]["file"]).encode())
        for table in (model.users, model.movies):
            digest.update(table.ids.tobytes())
            for values in table.columns.values():
                chunks = values.tolist() if values.dtype == object else [values]
                for chunk in chunks:
                    digest.update(np.ascontiguousarray(chunk).tobytes())
        created = datetime.now(UTC).replace(microsecond=0)
        version = f"{created:%Y%m%d%H%M%S}-{digest.hexdigest()[:10]}"

        for table, name in ((model.users, USER_TABLE), (model.movies, MOVIE_TABLE)):
            frame = table.to_frame()
            frame[TIMESTAMP_COLUMN] = pd.Timestamp(created)
            frame[VERSION_COLUMN] = version
            frame.to_parquet(staging / name, index=False)
        titles[["movie_id", "title"]].to_parquet(staging / TITLES, index=False)

        manifest = _manifest(model, ranking_entry, version, created, staging, extra)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log.info("wrote artifacts %s to %s", version, out_dir)
    return version


def _manifest(model, ranking_entry: dict, version, created, staging: Path, extra: dict) -> dict:
    k = model.n_factors

    def describe(fields: tuple[Field, ...], table: EntityTable) -> dict:
        return {
            "key": table.key,
            "fields": [
                {
                    "name": f.name,
                    "dtype": f.dtype,
                    "width": f.width,
                    "variable": f.variable,
                    "description": f.description,
                }
                for f in fields
            ],
            "defaults": {n: np.asarray(v).tolist() for n, v in table.defaults.items()},
            "rows": len(table),
        }

    names = feature_names(k)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": version,
        "created_at": created.isoformat(),
        "n_factors": k,
        # What `reelrank serve` ranks with, and what its scores mean.
        "scoring_model": ranking_entry,
        "rating_model": {
            "file": RATING_MODEL,
            "kind": "rating",
            "score": "predicted rating on the 1-5 scale (reelrank predict, predicted_rating)",
        },
        "constants": model.constants.__dict__,
        "features": [{"name": n, "dtype": "float64", "source": _source(n)} for n in names],
        "tables": {
            "user": describe(user_fields(k), model.users),
            "movie": describe(movie_fields(k), model.movies),
        },
        **extra,
        "versions": library_versions(),
        "files": {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST},
    }


def _source(name: str) -> str:
    if name.startswith("mf_") or name == "genre_affinity":
        return "derived at scoring time from the user and movie rows"
    table = "user_features" if name.startswith("user_") else "movie_features"
    return f"feast:{table}"


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if not (out_dir / MANIFEST).exists() and any(out_dir.iterdir()):
            raise ArtifactError(
                f"{out_dir} exists and is not an artifacts directory; refusing to replace it"
            )
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: Path | str, verify: bool = True) -> dict:
    """The manifest of ``root``, after checking its format and (by default) file checksums."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not an artifacts directory: {MANIFEST} is missing "
            "(create one with `reelrank train --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is damaged: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r} is not {FORMAT!r} version {FORMAT_VERSION}; "
            "retrain with this version of reelrank"
        )
    if verify:
        for name, expected in manifest.get("files", {}).items():
            file = root / name
            if not file.is_file():
                raise ArtifactError(f"{root}: {name} is missing")
            if _sha256(file) != expected:
                raise ArtifactError(f"{root}: {name} does not match its checksum in {MANIFEST}")
    return manifest


def load(root: Path | str) -> Artifacts:
    """Load and verify an artifacts directory."""
    root = Path(root)
    manifest = read_manifest(root)
    k = manifest["n_factors"]
    expected = feature_names(k)
    if [f["name"] for f in manifest["features"]] != expected:
        raise ArtifactError(
            f"{root}: the manifest's feature list does not match this version of reelrank"
        )
    users = _read_table(root, USER_TABLE, "user_id", user_fields(k), manifest["tables"]["user"])
    movies = _read_table(
        root, MOVIE_TABLE, "movie_id", movie_fields(k), manifest["tables"]["movie"]
    )
    booster = lgb.Booster(model_file=str(root / manifest["rating_model"]["file"]))
    if booster.feature_name() != expected:
        raise ArtifactError(f"{root}: the model's features differ from the manifest's")
    ranking = RankingModel.load(root, manifest["scoring_model"])
    if not np.array_equal(ranking.catalogue.movie_ids, movies.ids):
        raise ArtifactError(f"{root}: the ranking catalogue's movies differ from the movie table")
    constants = ScoringConstants(**manifest["constants"])
    titles_frame = read_frame(root / TITLES)
    titles = dict(zip(titles_frame["movie_id"].tolist(), titles_frame["title"].tolist()))
    model = TwoStageModel(users, movies, constants, booster, k)
    return Artifacts(root, manifest, model, ranking, titles)


def read_frame(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet file of the artifacts as a DataFrame, read and converted on this thread.

    Arrow's thread pools can abort the process as it exits ("terminate called without an
    active exception", apache/arrow#34314): here 7 in 300 short runs of `pd.read_parquet` then
    exit, none in 400 reading this way. The artifacts' tables are small, so threads buy little.
    """
    table = pq.read_table(path, columns=columns, use_threads=False, pre_buffer=False)
    return table.to_pandas(use_threads=False)


def _read_table(root: Path, name: str, key: str, fields, described: dict) -> EntityTable:
    try:
        frame = read_frame(root / name)
        defaults = {
            f.name: list_default(f) if f.is_list else np.asarray(described["defaults"][f.name])
            for f in fields
        }
        return EntityTable.from_frame(key, frame, fields, defaults)
    except (KeyError, ValueError, OSError) as error:
        raise ArtifactError(f"{root / name} is damaged or incomplete: {error}") from None
