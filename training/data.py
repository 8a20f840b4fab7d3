"""MovieLens ML-100K: find it, download it, and parse it into checked pandas tables.

Every file is validated as it is read; a problem raises ``DataError`` naming the file, the 1-based
line and the offending value. Parsing goes through ``pandas.read_csv`` with string columns and
vectorised checks, so the 100,000-line ``u.data`` loads in a fraction of a second.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from training.errors import DataError, DownloadError

_log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"  # published by GroupLens
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
REQUIRED_FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation")

# GroupLens wrote the files in Latin-1 (u.item titles hold accented letters); the other files are
# plain ASCII, so one encoding reads them all.
_ENCODING = "latin-1"

_RATING_FIELDS = ("user_id", "movie_id", "rating", "timestamp")
_USER_FIELDS = ("user_id", "age", "gender", "occupation", "zip_code")
_ITEM_FIELDS = ("movie_id", "title", "release_date", "video_release_date", "imdb_url")
_RATINGS = ("1", "2", "3", "4", "5")
_GENDERS = ("M", "F")
_GENRE_FLAGS = ("0", "1")
_RELEASE_DATE_FORMAT = "%d-%b-%Y"  # e.g. 01-Jan-1995
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, eq=False)
class MovieLens:
    """One ML-100K-layout directory, parsed.

    ``ratings``: user_id int64, movie_id int64, rating float32, timestamp int64 (file order).
    ``users``: user_id int64, age int64, gender str ('M'/'F'), occupation str, zip_code str;
    sorted by user_id.
    ``movies``: movie_id int64, title str, release_year float32 (NaN when unknown), then one int8
    column ``genre_<slug>`` per genre in u.genre order; sorted by movie_id.
    """

    root: Path
    ratings: pd.DataFrame
    users: pd.DataFrame
    movies: pd.DataFrame
    genres: tuple[str, ...]  # genre names in u.genre index order
    occupations: tuple[str, ...]  # from u.occupation, in file order


def default_cache_dir() -> Path:
    """``$REELRANK_CACHE_DIR`` if set, else ``~/.cache/reelrank``."""
    configured = os.environ.get("REELRANK_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "reelrank"


def resolve_data_dir(data: Path | str | None) -> Path:
    """The ML-100K directory to use: ``data`` if given, else ``$MOVIELENS_DIR``, else the cache.

    Raises ``DataError`` naming the directory it looked in and the files missing there.
    """
    if data is not None:
        candidate, source = Path(data).expanduser(), "given with --data"
    elif os.environ.get("MOVIELENS_DIR"):
        candidate, source = Path(os.environ["MOVIELENS_DIR"]).expanduser(), "from MOVIELENS_DIR"
    else:
        candidate = default_cache_dir() / "ml-100k"
        source = "the download cache; --data and MOVIELENS_DIR are not set"

    missing = _missing_files(candidate)
    if missing:
        raise DataError(
            f"no MovieLens ML-100K data in {candidate} ({source}): missing {', '.join(missing)}. "
            "Run `reelrank data fetch` to download it, or point --data or MOVIELENS_DIR at a "
            "directory holding " + ", ".join(REQUIRED_FILES)
        )
    return candidate


def load_movielens(data_dir: Path | str, ratings_file: str = "u.data") -> MovieLens:
    """Parse and cross-check one ML-100K directory; ``ratings_file`` may name a fold file."""
    root = Path(data_dir)
    missing = _missing_files(root, tuple(dict.fromkeys((*REQUIRED_FILES, ratings_file))))
    if missing:
        raise DataError(f"missing {', '.join(missing)}", root)
    started = time.perf_counter()

    occupations = _read_occupations(root / "u.occupation")
    genres = _read_genres(root / "u.genre")
    users = _read_users(root / "u.user", occupations)
    movies = _read_movies(root / "u.item", genres)
    ratings = read_ratings(root / ratings_file, users=users, movies=movies)

    _log.info(
        "loaded %d ratings, %d users, %d movies from %s in %.2f s",
        len(ratings),
        len(users),
        len(movies),
        root,
        time.perf_counter() - started,
    )
    return MovieLens(root, ratings, users, movies, genres, occupations)


def read_ratings(
    path: Path | str,
    users: pd.DataFrame | None = None,
    movies: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Parse a tab-separated ratings file (u.data, u1.base, ...).

    When ``users`` or ``movies`` are given, every user_id / movie_id must appear in them.
    Returns columns user_id int64, movie_id int64, rating float32, timestamp int64.
    """
    path = Path(path)
    rows = _read_rows(path, "\t", _RATING_FIELDS, trailing_blank_ok=True)

    ratings = pd.DataFrame(
        {
            "user_id": _positive_ids(rows["user_id"], "user_id", path),
            "movie_id": _positive_ids(rows["movie_id"], "movie_id", path),
            "rating": _ratings(rows["rating"], path),
            "timestamp": _integers(rows["timestamp"], "timestamp", path),
        }
    )

    duplicated = ratings.duplicated(["user_id", "movie_id"], keep="first")
    if duplicated.any():
        row = _first(duplicated)
        user_id, movie_id = ratings.at[row, "user_id"], ratings.at[row, "movie_id"]
        same = (ratings["user_id"] == user_id) & (ratings["movie_id"] == movie_id)
        raise DataError(
            f"duplicate rating for user_id {user_id} and movie_id {movie_id} "
            f"(first on line {_first(same) + 1})",
            path,
            row + 1,
        )

    if users is not None:
        _check_known(ratings["user_id"], users["user_id"], "user_id", "u.user", path)
    if movies is not None:
        _check_known(ratings["movie_id"], movies["movie_id"], "movie_id", "u.item", path)
    return ratings


def data_fingerprint(data_dir: Path | str) -> str:
    """SHA-256 hex digest over the names and bytes of ``REQUIRED_FILES``, in that order."""
    root = Path(data_dir)
    missing = _missing_files(root)
    if missing:
        raise DataError(f"missing {', '.join(missing)}", root)

    digest = hashlib.sha256()
    for name in REQUIRED_FILES:
        content = (root / name).read_bytes()
        # Name and length frame each file, so moving bytes between files changes the digest.
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def fetch_movielens(
    dest: Path | str | None = None,
    url: str = ML100K_URL,
    md5: str | None = ML100K_MD5,
    sha256: str | None = None,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download and unpack ML-100K into ``<dest or cache>/ml-100k``; return that directory.

    A directory that already holds ``REQUIRED_FILES`` is returned as is. The zip is checked
    against ``md5`` and ``sha256`` when given and unpacked beside its target, then renamed into
    place, so a failure never leaves a half-written directory. Raises ``DownloadError``.
    """
    dest_dir = Path(dest).expanduser() if dest is not None else default_cache_dir()
    target = dest_dir / "ml-100k"
    if target.is_dir() and not _missing_files(target):
        _log.info("MovieLens ML-100K already present in %s; not downloading", target)
        return target

    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / "ml-100k.zip.part"
    zip_path = dest_dir / "ml-100k.zip"
    zip_path.unlink(missing_ok=True)

    _log.info("downloading %s to %s", url, zip_path)
    try:
        _download(url, part, md5, sha256, timeout_s, progress)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(zip_path)

    try:
        _unpack(zip_path, target, url)
    except BaseException:
        zip_path.unlink(missing_ok=True)
        raise
    _log.info("MovieLens ML-100K ready in %s", target)
    return target


def _download(
    url: str,
    part: Path,
    md5: str | None,
    sha256: str | None,
    timeout_s: float,
    progress: bool,
) -> None:
    """Stream ``url`` into ``part``, checking its length and checksums."""
    md5_digest, sha256_digest = hashlib.md5(), hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, part.open("wb") as out:
            declared = response.headers.get("Content-Length")
            expected_bytes = int(declared) if declared and declared.isdigit() else None
            bar = tqdm(
                total=expected_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress or not sys.stderr.isatty(),
            )
            with bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    md5_digest.update(chunk)
                    sha256_digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the open response
        raise DownloadError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"could not reach {url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"download of {url} failed after {received} bytes: {exc!r}") from exc

    if expected_bytes is not None and received != expected_bytes:
        raise DownloadError(
            f"download of {url} was cut short: got {received} of {expected_bytes} bytes"
        )
    _check_digest(url, "md5", md5, md5_digest.hexdigest())
    _check_digest(url, "sha256", sha256, sha256_digest.hexdigest())
    if md5 is None and sha256 is None:
        _log.warning("no checksum given for %s; the download was not verified", url)


def _check_digest(url: str, kind: str, expected: str | None, got: str) -> None:
    if expected is not None and expected.lower() != got:
        raise DownloadError(f"checksum mismatch for {url}: expected {kind} {expected}, got {got}")


def _unpack(zip_path: Path, target: Path, url: str) -> None:
    """Extract the zip's top-level ``ml-100k/`` folder to ``target`` via a temp dir beside it."""
    staging = Path(tempfile.mkdtemp(prefix=".ml-100k.", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for name in archive.namelist():
                    if _escapes(name):
                        raise DownloadError(
                            f"zip from {url} holds an entry outside its folder: {name!r}"
                        )
                archive.extractall(staging)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            raise DownloadError(f"{url} did not give a readable zip file: {exc}") from exc

        unpacked = staging / "ml-100k"
        missing = _missing_files(unpacked)
        if missing:
            raise DownloadError(f"zip from {url} lacks ml-100k/{', ml-100k/'.join(missing)}")

        if target.exists():
            # An incomplete earlier copy: move it aside first so the rename below cannot fail.
            stale = staging / "stale"
            target.replace(stale)
        unpacked.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _escapes(name: str) -> bool:
    """Whether a zip entry name would land outside the extraction directory."""
    if "\\" in name or re.match(r"^[A-Za-z]:", name):
        return True
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts


def _missing_files(root: Path, names: tuple[str, ...] = REQUIRED_FILES) -> list[str]:
    return [name for name in names if not (root / name).is_file()]


def _read_rows(
    path: Path,
    sep: str,
    columns: tuple[str, ...],
    trailing_blank_ok: bool = False,
    fields_hint: str = "",
) -> pd.DataFrame:
    """Read a ``sep``-separated file into string columns; row i sits on line i + 1."""
    lines = _read_lines(path, trailing_blank_ok)

    expected = len(columns)
    for number, line in enumerate(lines, start=1):
        if line.count(sep) != expected - 1:
            found = "a blank line" if not line.strip() else f"{line.count(sep) + 1} fields"
            raise DataError(f"expected {expected} fields{fields_hint}, found {found}", path, number)

    return pd.read_csv(
        io.StringIO("\n".join(lines)),
        sep=sep,
        header=None,
        names=list(columns),
        dtype=str,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
        skip_blank_lines=False,
        engine="c",
    )


def _read_lines(path: Path, trailing_blank_ok: bool = False) -> list[str]:
    """The file's lines without line endings; raises ``DataError`` if it holds none."""
    try:
        text = path.read_text(encoding=_ENCODING)
    except FileNotFoundError as exc:
        raise DataError("file not found", path) from exc

    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if trailing_blank_ok:
        while lines and not lines[-1].strip():
            lines.pop()
    if not lines:
        raise DataError("file holds no rows", path)
    return lines


def _first(mask: pd.Series | np.ndarray) -> int:
    """Position of the first True in a boolean mask."""
    return int(np.argmax(np.asarray(mask)))


def _integers(column: pd.Series, name: str, path: Path, minimum: int | None = None) -> pd.Series:
    """Convert a string column to int64, rejecting anything but plain decimal integers."""
    values = column.to_numpy()
    # str.isdigit alone would accept superscripts and other Unicode digits.
    plain = np.fromiter(
        (len(v) <= 18 and (v[1:] if v[:1] == "-" else v).isdigit() and v.isascii() for v in values),
        dtype=bool,
        count=len(values),
    )
    if not plain.all():
        row = _first(~plain)
        raise DataError(f"{name} {values[row]!r} is not an integer", path, row + 1)

    integers = column.astype("int64")
    if minimum is not None and (integers < minimum).any():
        row = _first(integers < minimum)
        raise DataError(f"{name} {integers.iat[row]} must be at least {minimum}", path, row + 1)
    return integers


def _positive_ids(column: pd.Series, name: str, path: Path) -> pd.Series:
    ids = _integers(column, name, path)
    if (ids <= 0).any():
        row = _first(ids <= 0)
        raise DataError(f"{name} {ids.iat[row]} must be positive", path, row + 1)
    return ids


def _ratings(column: pd.Series, path: Path) -> pd.Series:
    valid = column.isin(_RATINGS)
    if not valid.all():
        row = _first(~valid)
        raise DataError(f"rating {column.iat[row]!r} is not an integer from 1 to 5", path, row + 1)
    return column.astype("int8").astype("float32")


def _check_unique(ids: pd.Series, name: str, path: Path) -> None:
    duplicated = ids.duplicated(keep="first")
    if duplicated.any():
        row = _first(duplicated)
        first = _first(ids == ids.iat[row])
        raise DataError(
            f"duplicate {name} {ids.iat[row]} (first on line {first + 1})", path, row + 1
        )


def _check_in(
    column: pd.Series,
    allowed: tuple[str, ...],
    what: str,
    path: Path,
    expected: str,
) -> None:
    valid = column.isin(allowed)
    if not valid.all():
        row = _first(~valid)
        raise DataError(f"{what} {column.iat[row]!r} is not {expected}", path, row + 1)


def _check_known(
    ids: pd.Series,
    known: pd.Series,
    name: str,
    source: str,
    path: Path,
) -> None:
    unknown = ~ids.isin(known)
    if unknown.any():
        row = _first(unknown)
        raise DataError(f"{name} {ids.iat[row]} is not in {source}", path, row + 1)


def _read_occupations(path: Path) -> tuple[str, ...]:
    occupations = _read_lines(path)

    for number, name in enumerate(occupations, start=1):
        if not name.strip():
            raise DataError("blank occupation name", path, number)
        if name in occupations[: number - 1]:
            raise DataError(f"duplicate occupation {name!r}", path, number)
    return tuple(occupations)


def _read_genres(path: Path) -> tuple[str, ...]:
    """Genre names ordered by their u.genre index, which must run 0..n-1."""
    rows = _read_rows(path, "|", ("name", "index"), trailing_blank_ok=True)
    indexes = _integers(rows["index"], "genre index", path, minimum=0)

    _check_unique(indexes, "genre index", path)
    _check_unique(rows["name"], "genre", path)
    blank = rows["name"].str.strip() == ""
    if blank.any():
        raise DataError("blank genre name", path, _first(blank) + 1)
    if indexes.max() != len(rows) - 1:
        row = _first(indexes == indexes.max())
        raise DataError(
            f"genre index {indexes.max()} leaves a gap; indexes must run 0..{len(rows) - 1}",
            path,
            row + 1,
        )

    slugs = [_genre_column(name) for name in rows["name"]]
    if len(set(slugs)) != len(slugs):
        raise DataError(f"genre names give clashing column names: {slugs}", path)
    return tuple(rows["name"].iloc[np.argsort(indexes.to_numpy())])


def _genre_column(name: str) -> str:
    """``Children's`` -> ``genre_childrens``, ``Film-Noir`` -> ``genre_film_noir``."""
    slug = re.sub(r"[^0-9a-z]+", "_", name.lower().replace("'", "")).strip("_")
    return f"genre_{slug}"


def _read_users(path: Path, occupations: tuple[str, ...]) -> pd.DataFrame:
    rows = _read_rows(path, "|", _USER_FIELDS)

    users = pd.DataFrame(
        {
            "user_id": _positive_ids(rows["user_id"], "user_id", path),
            "age": _integers(rows["age"], "age", path, minimum=0),
            "gender": rows["gender"],
            "occupation": rows["occupation"],
            "zip_code": rows["zip_code"],
        }
    )
    _check_unique(users["user_id"], "user_id", path)
    _check_in(users["gender"], _GENDERS, "gender", path, "M or F")
    _check_in(users["occupation"], occupations, "occupation", path, "listed in u.occupation")

    return users.sort_values("user_id", kind="stable", ignore_index=True)


def _read_movies(path: Path, genres: tuple[str, ...]) -> pd.DataFrame:
    genre_columns = tuple(_genre_column(name) for name in genres)
    hint = f" ({len(_ITEM_FIELDS)} + {len(genres)} genre flags from u.genre)"
    rows = _read_rows(path, "|", _ITEM_FIELDS + genre_columns, fields_hint=hint)

    movie_ids = _positive_ids(rows["movie_id"], "movie_id", path)
    _check_unique(movie_ids, "movie_id", path)
    movies = pd.DataFrame(
        {
            "movie_id": movie_ids,
            "title": rows["title"],
            "release_year": _release_years(rows["release_date"], path),
        }
    )

    for column in genre_columns:
        _check_in(rows[column], _GENRE_FLAGS, f"genre flag {column}", path, "0 or 1")
        movies[column] = rows[column].astype("int8")
    return movies.sort_values("movie_id", kind="stable", ignore_index=True)


def _release_years(dates: pd.Series, path: Path) -> pd.Series:
    """Year of each ``01-Jan-1995``-style date; NaN where empty or unparseable."""
    parsed = pd.to_datetime(dates, format=_RELEASE_DATE_FORMAT, errors="coerce")
    unknown = parsed.isna()
    if unknown.any():
        row = _first(unknown)
        _log.debug(
            "%s: %d release dates empty or unparseable (first on line %d: %r); year set to NaN",
            path,
            int(unknown.sum()),
            row + 1,
            dates.iat[row],
        )
    return parsed.dt.year.astype("float32")
