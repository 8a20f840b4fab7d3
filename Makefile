# reelrank: `make demo` sets everything up and runs the main job end to end; `make test` tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts/ml-100k
REPORT ?= reports/evaluation
EVAL_FOLDS ?= u1,u2,u3,u4,u5
SEED ?= 0
export REDIS_URL ?= redis://127.0.0.1:6379/0

# MovieLens: $(DATA) if given, else $MOVIELENS_DIR, else the shared copy beside the project,
# else the official zip is downloaded (checksum verified) into the cache by `reelrank data fetch`.
SHARED_DATA := $(wildcard ../shared/data/ml-100k/u.data)
DATA ?= $(or $(MOVIELENS_DIR),$(if $(SHARED_DATA),../shared/data/ml-100k,))
DATA_FLAG = $(if $(DATA),--data $(DATA),)

.PHONY: demo test install data train evaluate lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

data: install
	$(if $(DATA),@echo "using MovieLens in $(DATA)",$(BIN)/reelrank data fetch)

train: data
	$(BIN)/reelrank train $(DATA_FLAG) --out $(ARTIFACTS) --seed $(SEED)

evaluate: data
	$(BIN)/reelrank evaluate $(DATA_FLAG) --out $(REPORT) --seed $(SEED) --folds $(EVAL_FOLDS)

demo: train evaluate

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf artifacts reports feature_repo/data .pytest_cache
