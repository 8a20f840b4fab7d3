"""Small fabricated MovieLens data in the ML-100K file layout, for tests that need no real copy.

Ratings come from a hidden low-rank model (user and movie biases plus a dot product of
``(n_users, 3)`` and ``(n_movies, 3)`` factors, with noise, rounded to 1..5), so a model that
learns anything beats the global mean on them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from training.data import REQUIRED_FILES

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

CAFE_MOVIE_ID = 2  # its title holds a Latin-1 'é'
CAFE_TITLE = "Café au Lait (1993)"
UNDATED_MOVIE_ID = 3  # empty release date, like movie 267 in the real data
MIN_RATINGS_EACH = 3  # every user and every movie gets at least this many ratings
N_FACTORS = 3
FIRST_TIMESTAMP = 874_724_710  # seconds; the start of the real ML-100K collection period
N_FOLDS = 5


def write_movielens(
    root: Path,
    n_users: int = 30,
    n_movies: int = 40,
    n_ratings: int = 600,
    seed: int = 0,
    folds: bool = True,
) -> Path:
    """Write u.data, u.user, u.item, u.genre, u.occupation (and u1..u5 folds) into ``root``."""
    if n_ratings < MIN_RATINGS_EACH * max(n_users, n_movies) or n_ratings > n_users * n_movies:
        raise ValueError(
            f"n_ratings={n_ratings} must lie between {MIN_RATINGS_EACH} per user and movie "
            f"({MIN_RATINGS_EACH * max(n_users, n_movies)}) and n_users * n_movies "
            f"({n_users * n_movies})"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    pairs = _rating_pairs(rng, n_users, n_movies, n_ratings)
    ratings = _hidden_model_ratings(rng, n_users, n_movies, pairs)
    timestamps = FIRST_TIMESTAMP + np.sort(rng.integers(0, 200 * 86_400, size=n_ratings))
    rows = [
        (int(u), int(m), int(r), int(t))
        for (u, m), r, t in zip(pairs, ratings, timestamps, strict=True)
    ]

    _write_ratings(root / "u.data", rows)
    _write_lines(root / "u.user", _user_lines(rng, n_users))
    _write_lines(root / "u.item", _item_lines(rng, n_movies))
    # The real u.genre ends with a blank line; keep that quirk so readers must tolerate it.
    _write_lines(root / "u.genre", [f"{name}|{i}" for i, name in enumerate(GENRES)] + [""])
    _write_lines(root / "u.occupation", list(OCCUPATIONS))

    if folds:
        fold_of_row = rng.permutation(n_ratings) % N_FOLDS
        for fold in range(N_FOLDS):
            test = [row for row, f in zip(rows, fold_of_row, strict=True) if f == fold]
            base = [row for row, f in zip(rows, fold_of_row, strict=True) if f != fold]
            _write_ratings(root / f"u{fold + 1}.base", sorted(base))
            _write_ratings(root / f"u{fold + 1}.test", sorted(test))
    return root


def build_movielens_zip(src_dir: Path, zip_path: Path) -> Path:
    """Zip the files of ``src_dir`` under a top-level ``ml-100k/`` folder, as GroupLens ships it."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ml-100k/", b"")
        for path in sorted(Path(src_dir).iterdir()):
            if path.is_file():
                archive.write(path, f"ml-100k/{path.name}")
    return zip_path


def real_data_dir() -> Path | None:
    """The real ML-100K copy: ``$MOVIELENS_DIR``, else ``../shared/data/ml-100k``, else None."""
    repo_root = Path(__file__).resolve().parent.parent
    configured = os.environ.get("MOVIELENS_DIR")
    candidate = Path(configured) if configured else repo_root.parent / "shared/data/ml-100k"
    if all((candidate / name).is_file() for name in REQUIRED_FILES):
        return candidate
    return None


def _rating_pairs(
    rng: np.random.Generator,
    n_users: int,
    n_movies: int,
    n_ratings: int,
) -> list[tuple[int, int]]:
    """Distinct 1-based (user_id, movie_id) pairs, at least 3 per user and per movie, shuffled."""
    chosen: set[tuple[int, int]] = set()
    for user_id in range(1, n_users + 1):
        for movie_id in rng.choice(n_movies, size=MIN_RATINGS_EACH, replace=False) + 1:
            chosen.add((user_id, int(movie_id)))
    for movie_id in range(1, n_movies + 1):
        have = sum(1 for _, m in chosen if m == movie_id)
        others = [u for u in range(1, n_users + 1) if (u, movie_id) not in chosen]
        for user_id in rng.choice(others, size=max(0, MIN_RATINGS_EACH - have), replace=False):
            chosen.add((int(user_id), movie_id))

    rest = [
        (u, m)
        for u in range(1, n_users + 1)
        for m in range(1, n_movies + 1)
        if (u, m) not in chosen
    ]
    n_extra = n_ratings - len(chosen)
    if n_extra < 0:
        raise ValueError(f"n_ratings={n_ratings} is too few to give everyone 3 ratings")
    extra = rng.choice(len(rest), size=n_extra, replace=False)

    pairs = sorted(chosen) + [rest[i] for i in extra]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _hidden_model_ratings(
    rng: np.random.Generator,
    n_users: int,
    n_movies: int,
    pairs: list[tuple[int, int]],
) -> np.ndarray:
    """Ratings 1..5 from biases + (n_users, 3) x (n_movies, 3) factors + noise."""
    user_factors = rng.normal(size=(n_users, N_FACTORS))
    movie_factors = rng.normal(size=(n_movies, N_FACTORS))
    user_bias = rng.normal(scale=0.4, size=n_users)
    movie_bias = rng.normal(scale=0.5, size=n_movies)

    users = np.array([u for u, _ in pairs]) - 1
    movies = np.array([m for _, m in pairs]) - 1
    affinity = np.sum(user_factors[users] * movie_factors[movies], axis=1) / np.sqrt(N_FACTORS)
    noise = rng.normal(scale=0.3, size=len(pairs))
    raw = 3.5 + user_bias[users] + movie_bias[movies] + 0.9 * affinity + noise
    return np.clip(np.rint(raw), 1, 5).astype(int)


def _user_lines(rng: np.random.Generator, n_users: int) -> list[str]:
    lines = []
    for user_id in range(1, n_users + 1):
        age = int(rng.integers(16, 70))
        gender = "MF"[int(rng.integers(0, 2))]
        occupation = OCCUPATIONS[(user_id - 1) % len(OCCUPATIONS)]
        # User 1's zip keeps a leading zero, which only survives if zip codes stay strings.
        zip_code = "01002" if user_id == 1 else f"{int(rng.integers(10000, 99999))}"
        lines.append(f"{user_id}|{age}|{gender}|{occupation}|{zip_code}")
    return lines


def _item_lines(rng: np.random.Generator, n_movies: int) -> list[str]:
    lines = []
    for movie_id in range(1, n_movies + 1):
        year = int(rng.integers(1930, 1999))
        title = f"Movie {movie_id} ({year})"
        date = f"{int(rng.integers(1, 29)):02d}-{MONTHS[int(rng.integers(0, 12))]}-{year}"
        if movie_id == CAFE_MOVIE_ID:
            title, date = CAFE_TITLE, "01-Jan-1993"
        if movie_id == UNDATED_MOVIE_ID:
            title, date = "unknown", ""

        flags = np.zeros(len(GENRES), dtype=int)
        n_genres = int(rng.integers(1, 4))
        flags[rng.choice(np.arange(1, len(GENRES)), size=n_genres, replace=False)] = 1
        url = f"http://us.imdb.com/M/title-exact?Movie%20{movie_id}"
        lines.append("|".join([str(movie_id), title, date, "", url, *map(str, flags)]))
    return lines


def _write_ratings(path: Path, rows: list[tuple[int, int, int, int]]) -> None:
    _write_lines(path, ["\t".join(map(str, row)) for row in rows])


def _write_lines(path: Path, lines: list[str]) -> None:
    # newline="" keeps "\n" endings on every platform, as in the GroupLens files.
    with path.open("w", encoding="latin-1", newline="") as out:
        out.write("".join(f"{line}\n" for line in lines))
