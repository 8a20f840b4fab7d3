"""Feast definitions of reelrank's features, generated from ``training.features``.

Training writes two entity tables, ``user_features.parquet`` and ``movie_features.parquet``;
``reelrank materialize`` copies them into ``data/`` here, where the file sources below read
them, and writes their rows into Redis. Every field's name, order, type and description comes
from :mod:`training.features`, the one definition of every feature, so a feature cannot be
added, renamed or dropped here without training, the offline path and the service seeing it.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

from ranker.online_store import VERSION_FEATURES, VIEWS
from training.artifacts import TIMESTAMP_COLUMN, VERSION_COLUMN
from training.features import Field as TableField
from training.features import movie_fields, user_fields

# Array(Float32) carries no length, so these schemas are the same for every embedding width;
# the width of a run is in its manifest and is checked when the run is materialized.
ANY_WIDTH = 1


def _schema(join_key: str, fields: tuple[TableField, ...], version_feature: str) -> list[Field]:
    schema = [Field(name=join_key, dtype=Int64)]
    for field in fields:
        element = Int64 if field.dtype == "int64" else Float32
        dtype = Array(element) if field.is_array or field.is_list else element
        schema.append(Field(name=field.name, dtype=dtype, description=field.description))
    schema.append(
        Field(
            name=version_feature,
            dtype=String,
            description="model version of the training run that produced the row",
        )
    )
    return schema


# The person a ranking is for; MovieLens user ids.
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="a MovieLens user",
)

# The thing being ranked; MovieLens movie ids.
movie = Entity(
    name="movie",
    join_keys=["movie_id"],
    value_type=ValueType.INT64,
    description="a MovieLens movie",
)

# The user table of the last materialized training run; every row is stamped with the run.
user_source = FileSource(
    name="user_features_source",
    path="data/user_features.parquet",
    timestamp_field=TIMESTAMP_COLUMN,
    field_mapping={VERSION_COLUMN: VERSION_FEATURES["user"]},
    description="user table written by `reelrank train`, copied here by `reelrank materialize`",
)

# The movie table of the same run.
movie_source = FileSource(
    name="movie_features_source",
    path="data/movie_features.parquet",
    timestamp_field=TIMESTAMP_COLUMN,
    field_mapping={VERSION_COLUMN: VERSION_FEATURES["movie"]},
    description="movie table written by `reelrank train`, copied here by `reelrank materialize`",
)

# Per-user embedding, bias, demographics, rating statistics and the training history (rated
# movie ids and ratings) the ranking model's candidate stage starts from. TTL 0 (no expiry): a
# row is valid exactly as long as its model version is served, which readers check, not its age.
user_features = FeatureView(
    name=VIEWS["user"],
    entities=[user],
    ttl=timedelta(0),
    schema=_schema("user_id", user_fields(ANY_WIDTH), VERSION_FEATURES["user"]),
    source=user_source,
    online=True,
    description="the user table of one training run",
    tags={"model": "reelrank two-stage ranker"},
)

# Per-movie embedding, bias, genres, year and rating statistics. TTL 0 for the same reason.
movie_features = FeatureView(
    name=VIEWS["movie"],
    entities=[movie],
    ttl=timedelta(0),
    schema=_schema("movie_id", movie_fields(ANY_WIDTH), VERSION_FEATURES["movie"]),
    source=movie_source,
    online=True,
    description="the movie table of one training run",
    tags={"model": "reelrank two-stage ranker"},
)

# What the service reads: every user and movie field (the ranking model reads the history,
# embeddings, biases and some side features; the rating model behind predicted_rating reads all
# the others) plus the two model versions the server checks before scoring.
ranker = FeatureService(
    name="ranker",
    features=[
        user_features[[f.name for f in user_fields(ANY_WIDTH)] + [VERSION_FEATURES["user"]]],
        movie_features[[f.name for f in movie_fields(ANY_WIDTH)] + [VERSION_FEATURES["movie"]]],
    ],
    description="features of reelrank's ranking and rating models (see training.features)",
)
