from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("user_id", "candidate_ids", "top_k", "request_id", "explain", "predicted_ratings")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATINGS_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    request_id: str
    explain: bool
    predicted_ratings: bool
    def __init__(self, user_id: _Optional[int] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., explain: _Optional[bool] = ..., predicted_ratings: _Optional[bool] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("movies", "model_version", "request_id", "user_cold_start", "not_found_ids", "scored_count", "base_value")
    MOVIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_COLD_START_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORED_COUNT_FIELD_NUMBER: _ClassVar[int]
    BASE_VALUE_FIELD_NUMBER: _ClassVar[int]
    movies: _containers.RepeatedCompositeFieldContainer[ScoredMovie]
    model_version: str
    request_id: str
    user_cold_start: bool
    not_found_ids: _containers.RepeatedScalarFieldContainer[int]
    scored_count: int
    base_value: float
    def __init__(self, movies: _Optional[_Iterable[_Union[ScoredMovie, _Mapping]]] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., user_cold_start: _Optional[bool] = ..., not_found_ids: _Optional[_Iterable[int]] = ..., scored_count: _Optional[int] = ..., base_value: _Optional[float] = ...) -> None: ...

class ScoredMovie(_message.Message):
    __slots__ = ("movie_id", "score", "title", "contributions", "predicted_rating")
    MOVIE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    movie_id: int
    score: float
    title: str
    contributions: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    predicted_rating: float
    def __init__(self, movie_id: _Optional[int] = ..., score: _Optional[float] = ..., title: _Optional[str] = ..., contributions: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ..., predicted_rating: _Optional[float] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("feature", "contribution")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    feature: str
    contribution: float
    def __init__(self, feature: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...
