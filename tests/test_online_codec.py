"""The online reader's hand-written layout and codec agree with Feast's helpers and protobuf.

``ranker.online_store`` reads Feast's Redis rows without importing Feast; these tests pin every
byte it assumes (keys, hash fields, ``feast.types.Value`` encodings) to Feast's own functions.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ranker.online_store import (
    FLOAT_LIST,
    INT64_LIST,
    ViewLayout,
    _TableCodec,
    decode_list,
    decode_string,
    encode_float_lists,
    encode_floats,
    encode_list,
    encode_lists,
    encode_string,
    field_hash,
)
from ranker.redis_url import RedisUrlError, redact, resolve, validate

float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)


@pytest.fixture(scope="module")
def feast_helpers():
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    return _mmh3, _redis_key, EntityKey, FloatList, Value


@settings(max_examples=60, deadline=None)
@given(entity_id=st.integers(-(2**63), 2**63 - 1), project=st.from_regex(r"[a-z][a-z0-9_-]{0,20}"))
def test_keys_are_feasts(feast_helpers, entity_id, project):
    _, redis_key, EntityKey, _, Value = feast_helpers
    for entity in ("user", "movie"):
        key = EntityKey(join_keys=[f"{entity}_id"], entity_values=[Value(int64_val=entity_id)])
        layout = ViewLayout(entity, f"{entity}_id", [], project)

        assert layout.keys(np.array([entity_id]))[0] == redis_key(project, key, 3)


def test_field_hashes_are_feasts(feast_helpers):
    mmh3_of = feast_helpers[0]
    for name in ("user_features:user_embedding", "movie_features:movie_model_version", "x:é"):
        view, feature = name.split(":")
        assert field_hash(view, feature) == mmh3_of(name)


@settings(max_examples=80, deadline=None)
@given(values=hnp.arrays(np.float32, st.integers(1, 40), elements=float32s))
def test_float_encodings_are_protobufs(feast_helpers, values):
    *_, FloatList, Value = feast_helpers

    scalars = encode_floats(values)
    for value, encoded in zip(values, scalars):
        assert encoded.tobytes() == Value(float_val=float(value)).SerializeToString()
        parsed = Value.FromString(encoded.tobytes()).float_val
        assert np.float32(parsed).tobytes() == value.tobytes()

    as_list = encode_float_lists(values.reshape(1, -1))[0].tobytes()
    assert as_list == Value(float_list_val=FloatList(val=values.tolist())).SerializeToString()
    parsed = np.array(Value.FromString(as_list).float_list_val.val, dtype=np.float32)
    assert parsed.tobytes() == values.tobytes()


@settings(max_examples=80, deadline=None)
@given(
    lists=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40), max_size=6),
    floats=hnp.arrays(np.float32, st.integers(0, 30), elements=float32s),
)
def test_list_encodings_of_any_length_are_protobufs(feast_helpers, lists, floats):
    """The history lists: int64 ids as packed varints, float32 ratings, empty lists too."""
    from feast.protos.feast.types.Value_pb2 import Int64List

    *_, FloatList, Value = feast_helpers
    flat = np.array([v for values in lists for v in values], dtype=np.int64)
    offsets = np.cumsum([0, *(len(values) for values in lists)])
    for values, encoded in zip(lists, encode_lists(flat, offsets, INT64_LIST), strict=True):
        assert encoded == Value(int64_list_val=Int64List(val=values)).SerializeToString()
        assert decode_list(encoded, INT64_LIST).tolist() == values

    encoded = encode_list(floats, FLOAT_LIST)
    assert encoded == Value(float_list_val=FloatList(val=floats.tolist())).SerializeToString()
    assert decode_list(encoded, FLOAT_LIST).tobytes() == floats.tobytes()


def test_malformed_lists_are_refused_and_null_is_empty():
    ids = encode_list(np.array([5, 300, 70_000]), INT64_LIST)
    assert decode_list(b"", INT64_LIST).tolist() == []
    for damaged in (ids[:-1], ids + b"\x01", b"\x35" + ids[1:], ids[:2] + b"\x12" + ids[3:]):
        assert decode_list(damaged, INT64_LIST) is None
    assert decode_list(ids, FLOAT_LIST) is None


@given(text=st.text(max_size=300))
def test_string_encoding_is_protobufs(feast_helpers, text):
    Value = feast_helpers[-1]
    assert encode_string(text) == Value(string_val=text).SerializeToString()
    assert decode_string(encode_string(text)) == text


def test_decoding_fills_defaults_and_reads_nulls_as_nan():
    fields = [("movie_bias", None), ("movie_genres", 3)]
    layout = ViewLayout("movie", "movie_id", fields, "reelrank")
    defaults = {"movie_bias": np.float32(0.25), "movie_genres": np.zeros(3, np.float32)}
    codec = _TableCodec(layout, defaults, "v1")
    genres = np.array([[1, 0, 1]], np.float32)
    present = [
        encode_floats(np.array([1.5], np.float32)).tobytes(),
        encode_float_lists(genres).tobytes(),
        encode_string("v1"),
    ]
    null_bias = [b"", *present[1:]]
    missing = [None, None, None]

    rows, found = codec.decode([present, missing, null_bias], np.array([1, 2, 3]))

    assert found.tolist() == [True, False, True]
    assert rows["movie_bias"][:2].tolist() == [1.5, 0.25] and np.isnan(rows["movie_bias"][2])
    assert rows["movie_genres"].tolist() == [[1, 0, 1], [0, 0, 0], [1, 0, 1]]
    assert rows["movie_bias"].dtype == rows["movie_genres"].dtype == np.float32


def test_redis_urls_are_checked_and_redacted(monkeypatch):
    assert redact("redis://:s3cret@cache:6380/2") == "redis://:***@cache:6380/2"
    assert redact("rediss://alice:s3cret@cache/0") == "rediss://alice:***@cache/0"
    assert redact("redis://cache:6379/0") == "redis://cache:6379/0"

    monkeypatch.delenv("REDIS_URL", raising=False)
    assert resolve(None) == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("REDIS_URL", "redis://other:1/3")
    assert resolve(None) == "redis://other:1/3"
    assert resolve("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"

    for bad, reason in (
        ("http://:s3cret@cache:6379/0", "must start with"),
        ("redis://:s3cret@cache:6379/zero", "database must be a number"),
        ("redis://:s3cret@cache:port/0", "malformed"),
        ("redis://:s3cret@/0", "names no host"),
    ):
        with pytest.raises(RedisUrlError, match=reason) as caught:
            validate(bad)
        assert "s3cret" not in str(caught.value)
