# reelrank: `make demo` sets everything up and runs the main job end to end; `make test` tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts/ml-100k
REPORT ?= reports/evaluation
EVAL_FOLDS ?= u1,u2,u3,u4,u5
SEED ?= 0
export REDIS_URL ?= redis://127.0.0.1:6379/0
SERVE_PORT ?= 50051
METRICS_PORT ?= 9464
WORKERS ?= 1
DEMO_USERS ?= 1,42,405
NODE_CLIENT := tests/node_client/node_modules/.package-lock.json

# MovieLens: $(DATA) if given, else $MOVIELENS_DIR, else the shared copy beside the project,
# else the official zip is downloaded (checksum verified) into the cache by `reelrank data fetch`.
SHARED_DATA := $(wildcard ../shared/data/ml-100k/u.data)
DATA ?= $(or $(MOVIELENS_DIR),$(if $(SHARED_DATA),../shared/data/ml-100k,))
DATA_FLAG = $(if $(DATA),--data $(DATA),)

.PHONY: demo test install data train evaluate materialize serve protos lint clean

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

materialize: train
	$(BIN)/reelrank materialize --artifacts $(ARTIFACTS)

serve: materialize
	$(BIN)/reelrank serve --artifacts $(ARTIFACTS) --port $(SERVE_PORT) --workers $(WORKERS) \
	  --metrics-port $(METRICS_PORT)

# Train (unless $(ARTIFACTS) holds a run of this version), evaluate, materialize, start the
# service, rank a few users through the gRPC client and stop the service again.
demo: data
	$(BIN)/reelrank demo $(DATA_FLAG) --artifacts $(ARTIFACTS) --report $(REPORT) \
	  --seed $(SEED) --users $(DEMO_USERS)

protos: install
	$(BIN)/python -m ranker.protogen

# The independent gRPC client the tests call the service with (Node's @grpc/grpc-js).
$(NODE_CLIENT): tests/node_client/package-lock.json
	npm ci --prefix tests/node_client --no-audit --no-fund

test: install $(NODE_CLIENT)
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf artifacts reports feature_repo/data .pytest_cache
