"""Loading, validating, locating and downloading MovieLens ML-100K (training/data.py)."""

from __future__ import annotations

import hashlib
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.fabricate import (
    CAFE_MOVIE_ID,
    CAFE_TITLE,
    GENRES,
    OCCUPATIONS,
    UNDATED_MOVIE_ID,
    build_movielens_zip,
    write_movielens,
)
from training.data import (
    data_fingerprint,
    default_cache_dir,
    fetch_movielens,
    load_movielens,
    read_ratings,
    resolve_data_dir,
)
from training.errors import DataError, DownloadError

# ---- loading fabricated data -------------------------------------------------------------------


def test_loads_tiny_data_with_documented_dtypes(tiny_data: Path) -> None:
    data = load_movielens(tiny_data)

    assert data.root == tiny_data
    assert len(data.ratings) == 600
    assert data.ratings.dtypes.to_dict() == {
        "user_id": np.dtype("int64"),
        "movie_id": np.dtype("int64"),
        "rating": np.dtype("float32"),
        "timestamp": np.dtype("int64"),
    }
    assert set(data.ratings["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}

    assert list(data.users.columns) == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert data.users["user_id"].dtype == np.int64
    assert data.users["age"].dtype == np.int64
    assert data.users["user_id"].tolist() == list(range(1, 31))
    assert set(data.users["gender"]) <= {"M", "F"}
    assert data.users.loc[0, "zip_code"] == "01002"


def test_movies_are_sorted_with_genre_flags_in_u_genre_order(tiny_data: Path) -> None:
    data = load_movielens(tiny_data)
    movies = data.movies

    assert data.genres == GENRES
    assert data.occupations == OCCUPATIONS
    genre_columns = [c for c in movies.columns if c.startswith("genre_")]
    assert list(movies.columns[:3]) == ["movie_id", "title", "release_year"]
    assert genre_columns[:5] == [
        "genre_unknown",
        "genre_action",
        "genre_adventure",
        "genre_animation",
        "genre_childrens",
    ]
    assert "genre_film_noir" in genre_columns and "genre_sci_fi" in genre_columns
    assert len(genre_columns) == 19
    assert all(movies[c].dtype == np.int8 for c in genre_columns)
    assert movies["movie_id"].tolist() == list(range(1, 41))
    assert movies["release_year"].dtype == np.float32


def test_latin1_title_and_missing_release_date(tiny_data: Path) -> None:
    movies = load_movielens(tiny_data).movies.set_index("movie_id")

    assert movies.at[CAFE_MOVIE_ID, "title"] == CAFE_TITLE
    assert movies.at[CAFE_MOVIE_ID, "release_year"] == 1993
    assert np.isnan(movies.at[UNDATED_MOVIE_ID, "release_year"])


def test_fabricated_data_covers_everyone_and_folds_partition(tiny_data: Path) -> None:
    ratings = load_movielens(tiny_data).ratings

    assert ratings.groupby("user_id").size().min() >= 3
    assert ratings.groupby("movie_id").size().min() >= 3
    tests = pd.concat([read_ratings(tiny_data / f"u{k}.test") for k in range(1, 6)])
    assert len(tests) == len(ratings)
    assert not tests.duplicated(["user_id", "movie_id"]).any()
    for k in range(1, 6):
        assert len(read_ratings(tiny_data / f"u{k}.base")) + len(
            read_ratings(tiny_data / f"u{k}.test")
        ) == len(ratings)


def test_fabrication_is_deterministic_under_seed(tmp_path: Path) -> None:
    first = write_movielens(tmp_path / "a", seed=3)
    second = write_movielens(tmp_path / "b", seed=3)
    other = write_movielens(tmp_path / "c", seed=4)

    assert data_fingerprint(first) == data_fingerprint(second)
    assert data_fingerprint(first) != data_fingerprint(other)


def test_fold_file_loads_and_is_checked_against_users_and_movies(tiny_data: Path) -> None:
    data = load_movielens(tiny_data, ratings_file="u1.base")

    assert 0 < len(data.ratings) < 600
    checked = read_ratings(tiny_data / "u1.test", users=data.users, movies=data.movies)
    assert len(checked) + len(data.ratings) == 600


def test_trailing_blank_lines_in_ratings_are_tolerated(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    with (root / "u.data").open("a") as out:
        out.write("\n\n  \n")

    assert len(load_movielens(root).ratings) == 600


# ---- real ML-100K --------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_ml100k_shape_and_first_movie(real_data: Path) -> None:
    started = time.perf_counter()
    data = load_movielens(real_data)
    elapsed_s = time.perf_counter() - started

    assert len(data.ratings) == 100_000
    assert len(data.users) == 943
    assert len(data.movies) == 1682
    first = data.movies.iloc[0]
    assert first["movie_id"] == 1
    assert first["title"] == "Toy Story (1995)"
    assert first["release_year"] == 1995
    assert np.isnan(data.movies.set_index("movie_id").at[267, "release_year"])
    assert len(data.genres) == 19 and len(data.occupations) == 21
    assert elapsed_s < 5.0  # generous: parsing takes well under a second on an idle machine


@pytest.mark.realdata
def test_real_fold_file(real_data: Path) -> None:
    data = load_movielens(real_data)

    base = read_ratings(real_data / "u1.base", users=data.users, movies=data.movies)

    assert len(base) == 80_000


# ---- validation: one test per kind of error ----------------------------------------------------


def _copy(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "ml-100k"))


def _edit_line(root: Path, name: str, line: int, edit) -> None:
    """Replace 1-based ``line`` of ``root/name`` by ``edit(old_fields)`` joined back up."""
    path = root / name
    sep = "\t" if name == "u.data" else "|"
    lines = path.read_text(encoding="latin-1").split("\n")
    lines[line - 1] = sep.join(edit(lines[line - 1].split(sep)))
    path.write_text("\n".join(lines), encoding="latin-1")


def _set_field(root: Path, name: str, line: int, index: int, value: str) -> None:
    def edit(fields: list[str]) -> list[str]:
        fields[index] = value
        return fields

    _edit_line(root, name, line, edit)


def _load_error(root: Path) -> str:
    with pytest.raises(DataError) as caught:
        load_movielens(root)
    return str(caught.value)


def test_missing_file_is_named_with_its_directory(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    (root / "u.genre").unlink()

    message = _load_error(root)

    assert "u.genre" in message and str(root) in message


def test_wrong_number_of_fields(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _edit_line(root, "u.data", 5, lambda fields: fields[:3])

    message = _load_error(root)

    assert "u.data:5:" in message and "expected 4 fields" in message and "found 3" in message


def test_blank_line_inside_ratings(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _edit_line(root, "u.data", 9, lambda fields: [""])

    message = _load_error(root)

    assert "u.data:9:" in message and "blank line" in message


def test_non_integer_id(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.data", 7, 0, "u7")

    message = _load_error(root)

    assert "u.data:7:" in message and "user_id 'u7' is not an integer" in message


@pytest.mark.parametrize("bad_id", ["0", "-4"])
def test_id_not_positive(tiny_data: Path, tmp_path: Path, bad_id: str) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.data", 11, 1, bad_id)

    message = _load_error(root)

    assert "u.data:11:" in message and f"movie_id {bad_id} must be positive" in message


@pytest.mark.parametrize("bad_rating", ["0", "6", "3.5", "four"])
def test_rating_outside_1_to_5(tiny_data: Path, tmp_path: Path, bad_rating: str) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.data", 12, 2, bad_rating)

    message = _load_error(root)

    assert "u.data:12:" in message and f"rating '{bad_rating}'" in message


def test_duplicate_rating_pair(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    third = (root / "u.data").read_text().split("\n")[2]
    user_id, movie_id = third.split("\t")[:2]
    with (root / "u.data").open("a") as out:
        out.write(third + "\n")

    message = _load_error(root)

    assert "u.data:601:" in message
    assert f"user_id {user_id} and movie_id {movie_id}" in message and "line 3" in message


def test_duplicate_user_id(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.user", 4, 0, "2")

    message = _load_error(root)

    assert "u.user:4:" in message and "duplicate user_id 2" in message


def test_duplicate_movie_id(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.item", 6, 0, "5")

    message = _load_error(root)

    assert "u.item:6:" in message and "duplicate movie_id 5" in message


def test_rating_for_unknown_user(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.data", 20, 0, "999")

    message = _load_error(root)

    assert "u.data:20:" in message and "user_id 999 is not in u.user" in message


def test_rating_for_unknown_movie(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.data", 21, 1, "999")

    message = _load_error(root)

    assert "u.data:21:" in message and "movie_id 999 is not in u.item" in message


@pytest.mark.parametrize("bad_age", ["old", "2.5"])
def test_age_not_integer(tiny_data: Path, tmp_path: Path, bad_age: str) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.user", 3, 1, bad_age)

    message = _load_error(root)

    assert "u.user:3:" in message and f"age '{bad_age}' is not an integer" in message


def test_gender_not_m_or_f(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.user", 8, 2, "X")

    message = _load_error(root)

    assert "u.user:8:" in message and "gender 'X'" in message


def test_occupation_not_listed(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.user", 10, 3, "astronaut")

    message = _load_error(root)

    assert "u.user:10:" in message and "occupation 'astronaut'" in message


def test_genre_flag_not_0_or_1(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.item", 4, 5 + 5, "2")  # the Comedy flag

    message = _load_error(root)

    assert "u.item:4:" in message and "genre_comedy '2'" in message


def test_wrong_number_of_genre_flags(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _edit_line(root, "u.item", 7, lambda fields: fields[:-1])

    message = _load_error(root)

    assert "u.item:7:" in message and "19 genre flags from u.genre" in message
    assert "found 23 fields" in message


def test_unparseable_release_date_is_nan_not_error(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)
    _set_field(root, "u.item", 8, 2, "sometime in 1990")

    movies = load_movielens(root).movies.set_index("movie_id")

    assert np.isnan(movies.at[8, "release_year"])


# ---- finding the data ----------------------------------------------------------------------------


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MOVIELENS_DIR, and an empty cache dir under tmp_path; returns the cache dir."""
    cache = tmp_path / "cache"
    monkeypatch.delenv("MOVIELENS_DIR", raising=False)
    monkeypatch.setenv("REELRANK_CACHE_DIR", str(cache))
    return cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REELRANK_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path

    monkeypatch.delenv("REELRANK_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "reelrank"


def test_resolve_prefers_argument_then_env_then_cache(
    tiny_data: Path,
    tmp_path: Path,
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cached = Path(shutil.copytree(tiny_data, clean_env / "ml-100k"))
    from_env = Path(shutil.copytree(tiny_data, tmp_path / "env-copy"))

    assert resolve_data_dir(None) == cached

    monkeypatch.setenv("MOVIELENS_DIR", str(from_env))
    assert resolve_data_dir(None) == from_env

    assert resolve_data_dir(tiny_data) == tiny_data
    assert resolve_data_dir(str(tiny_data)) == tiny_data


def test_resolve_error_says_where_it_looked(clean_env: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        resolve_data_dir(None)
    message = str(caught.value)
    assert str(clean_env / "ml-100k") in message
    assert "reelrank data fetch" in message and "u.data" in message

    with pytest.raises(DataError, match="given with --data"):
        resolve_data_dir(tmp_path / "nowhere")


# ---- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_content(tiny_data: Path, tmp_path: Path) -> None:
    root = _copy(tiny_data, tmp_path)

    assert data_fingerprint(root) == data_fingerprint(tiny_data)
    assert len(data_fingerprint(root)) == 64

    (root / "u1.base").write_text("not part of the fingerprint")
    assert data_fingerprint(root) == data_fingerprint(tiny_data)

    _edit_line(root, "u.data", 1, _change_rating)
    assert data_fingerprint(root) != data_fingerprint(tiny_data)


def _change_rating(fields: list[str]) -> list[str]:
    fields[2] = "1" if fields[2] != "1" else "2"
    return fields


# ---- download ----------------------------------------------------------------------------------


def _serve_zip(tiny_data: Path, http_server, name: str) -> str:
    """Zip tiny data as ``name`` in the server root; return its md5."""
    build_movielens_zip(tiny_data, http_server.root / name)
    return hashlib.md5((http_server.root / name).read_bytes()).hexdigest()


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_fetch_downloads_unpacks_and_then_reuses(
    tiny_data: Path,
    tmp_path: Path,
    http_server,
) -> None:
    md5 = _serve_zip(tiny_data, http_server, "good.zip")
    sha256 = hashlib.sha256((http_server.root / "good.zip").read_bytes()).hexdigest()
    dest = tmp_path / "cache"

    got = fetch_movielens(dest, url=http_server.url_for("good.zip"), md5=md5, sha256=sha256)

    assert got == dest / "ml-100k"
    assert data_fingerprint(got) == data_fingerprint(tiny_data)
    assert len(load_movielens(got).ratings) == 600
    assert _leftovers(dest) == ["ml-100k", "ml-100k.zip"]

    (http_server.root / "good.zip").unlink()
    again = fetch_movielens(dest, url=http_server.url_for("good.zip"), md5=md5, progress=False)
    assert again == got


def test_fetch_uses_cache_dir_by_default(
    tiny_data: Path,
    clean_env: Path,
    http_server,
) -> None:
    md5 = _serve_zip(tiny_data, http_server, "default-dest.zip")

    got = fetch_movielens(url=http_server.url_for("default-dest.zip"), md5=md5)

    assert got == clean_env / "ml-100k"
    assert resolve_data_dir(None) == got


def test_fetch_replaces_an_incomplete_directory(
    tiny_data: Path,
    tmp_path: Path,
    http_server,
) -> None:
    md5 = _serve_zip(tiny_data, http_server, "refill.zip")
    dest = tmp_path / "cache"
    (dest / "ml-100k").mkdir(parents=True)
    (dest / "ml-100k" / "u.data").write_text("1\t1\t5\t0\n")

    got = fetch_movielens(dest, url=http_server.url_for("refill.zip"), md5=md5)

    assert data_fingerprint(got) == data_fingerprint(tiny_data)
    assert _leftovers(dest) == ["ml-100k", "ml-100k.zip"]


def test_fetch_checksum_mismatch_leaves_nothing(
    tiny_data: Path,
    tmp_path: Path,
    http_server,
) -> None:
    md5 = _serve_zip(tiny_data, http_server, "mismatch.zip")
    wrong = "0" * 32
    dest = tmp_path / "cache"

    with pytest.raises(DownloadError) as caught:
        fetch_movielens(dest, url=http_server.url_for("mismatch.zip"), md5=wrong)

    message = str(caught.value)
    assert http_server.url_for("mismatch.zip") in message
    assert f"expected md5 {wrong}" in message and f"got {md5}" in message
    assert _leftovers(dest) == []


def test_fetch_sha256_mismatch(tiny_data: Path, tmp_path: Path, http_server) -> None:
    _serve_zip(tiny_data, http_server, "sha.zip")

    with pytest.raises(DownloadError, match="expected sha256 f{64}"):
        fetch_movielens(tmp_path, url=http_server.url_for("sha.zip"), md5=None, sha256="f" * 64)
    assert _leftovers(tmp_path) == []


def test_fetch_truncated_body(tiny_data: Path, tmp_path: Path, http_server) -> None:
    md5 = _serve_zip(tiny_data, http_server, "truncated.zip")
    http_server.truncate("truncated.zip", 100)

    with pytest.raises(DownloadError, match="cut short: got 100 of"):
        fetch_movielens(tmp_path, url=http_server.url_for("truncated.zip"), md5=md5)
    assert _leftovers(tmp_path) == []


def test_fetch_http_404(tmp_path: Path, http_server) -> None:
    url = http_server.url_for("absent.zip")

    with pytest.raises(DownloadError, match="HTTP 404") as caught:
        fetch_movielens(tmp_path, url=url)
    assert url in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_fetch_connection_refused(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="could not reach"):
        fetch_movielens(tmp_path, url="http://127.0.0.1:9/ml-100k.zip", timeout_s=5)
    assert _leftovers(tmp_path) == []


def test_fetch_not_a_zip(tmp_path: Path, http_server) -> None:
    (http_server.root / "garbage.zip").write_bytes(b"this is not a zip archive" * 10)

    with pytest.raises(DownloadError, match="readable zip"):
        fetch_movielens(tmp_path, url=http_server.url_for("garbage.zip"), md5=None)
    assert _leftovers(tmp_path) == []


def test_fetch_zip_without_required_files(tiny_data: Path, tmp_path: Path, http_server) -> None:
    with zipfile.ZipFile(http_server.root / "partial.zip", "w") as archive:
        archive.write(tiny_data / "u.data", "ml-100k/u.data")

    with pytest.raises(DownloadError, match="lacks ml-100k/u.user"):
        fetch_movielens(tmp_path, url=http_server.url_for("partial.zip"), md5=None)
    assert _leftovers(tmp_path) == []


def test_fetch_rejects_path_traversal(tiny_data: Path, tmp_path: Path, http_server) -> None:
    zip_path = build_movielens_zip(tiny_data, http_server.root / "evil.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("../evil", b"escaped")
    dest = tmp_path / "cache"

    with pytest.raises(DownloadError, match="'../evil'"):
        fetch_movielens(dest, url=http_server.url_for("evil.zip"), md5=None)
    assert _leftovers(dest) == []
    assert not (tmp_path / "evil").exists()
