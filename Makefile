# Every target is a thin call of the `curate` CLI (or pytest) inside .venv.
# `make` or `make help` lists the targets and the variables they read.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIPELINE ?= pipelines/full.yaml
CONFIG  ?= configs/local.yaml
INPUT   ?=
WORKDIR ?=
DEMO_SAMPLES ?= 5000
DEMO_SHARDS  ?= 10
ARGS    ?=
TEST_WORKERS ?= 2
# One target per stage: a stage is one file in curate/stages/ named as the stage (a test checks it).
STAGES  := $(filter-out __init__,$(basename $(notdir $(wildcard curate/stages/*.py))))

RUN_ARGS = $(if $(INPUT),--input '$(INPUT)') $(if $(WORKDIR),--workdir '$(WORKDIR)') $(ARGS)

.DEFAULT_GOAL := help
.PHONY: help install browser demo test test-fast test-gpu lint docs bench bench-scale synth run stats export report reliability ingest compare \
	cluster-up cluster-down clean distclean $(STAGES)

help: ## list the targets and the variables they read
	@echo "curate: make TARGET [VARIABLE=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  $(STAGES)"
	@echo "                   run PIPELINE up to and including that stage (done stages are skipped)"
	@echo
	@echo "variables: PIPELINE=$(PIPELINE) CONFIG=$(CONFIG) INPUT=<shards> WORKDIR=<dir> ARGS=<more curate args>"
	@echo "           OUT=<export folder> SOURCE=<url list or image folder> DEMO_SAMPLES=$(DEMO_SAMPLES) DEMO_SHARDS=$(DEMO_SHARDS)"
	@echo "           N=<pool sizes for bench-scale> TEST_WORKERS=$(TEST_WORKERS) (pytest-xdist processes; 0: one process)"

install: $(STAMP) ## create .venv and install curate (again only when pyproject.toml changes)

# Reinstall only when pyproject.toml changes (pip of torch & co. takes minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,ocr,nsfw,gcs,privacy,caption]'
	touch $(STAMP)

demo: install ## synthesize a pool, train the tiny scorer, run the demo pipeline, check it against the ground truth
	$(BIN)/python -m curate.tools.demo --samples $(DEMO_SAMPLES) --shards $(DEMO_SHARDS) $(ARGS)

test: install browser lint ## run the whole test suite (offline; what CI runs), after make lint, on TEST_WORKERS processes
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-fast: install browser ## the everyday loop: the suite without the tests marked slow (a few minutes)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(ARGS)

GPU_STAMP := $(VENV)/.installed-gpu
$(GPU_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[gpu]'
	touch $(GPU_STAMP)

# The DALI tests run on DALI's CPU operators where there is no GPU, so this passes on any machine.
lint: install ## ruff, the floors of the package (import-linter) and mypy on the stage contract and the runner
	$(BIN)/ruff check curate tests
	$(BIN)/lint-imports
	$(BIN)/mypy

docs: install ## build the documentation site into site/ (offline, strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict -q -f docs/mkdocs.yml

test-gpu: $(GPU_STAMP) ## install the gpu extra (NVIDIA DALI, ~700 MB) and run the CLIP data-path and forward tests
	$(BIN)/python -m pytest -q tests/stages/test_dali_pipeline.py tests/stages/test_clip_score.py \
		tests/stages/test_clip_forward.py $(ARGS)

# The report test renders the HTML in Debian's chromium; installed here when missing (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
			|| echo "could not install chromium: the report browser test will be skipped"; \
		else echo "chromium missing (not root or no apt-get): the report browser test will be skipped"; fi; }

bench: install ## measure every stage against the raw operation it sits on (work/bench/*.json)
	$(BIN)/python -m curate.bench $(ARGS)

bench-scale: install ## global stages on synthetic partials of N samples (N=1280000 or N="1280000 12800000")
	$(BIN)/python -m curate.bench.scale $(or $(N),1280000) $(ARGS)

synth: install ## write the demo's synthetic pool (DEMO_SAMPLES, DEMO_SHARDS)
	$(BIN)/curate synth --out demo/pool-v3-$(DEMO_SAMPLES)x$(DEMO_SHARDS)-seed0 --samples $(DEMO_SAMPLES) --shards $(DEMO_SHARDS)

run: install ## run PIPELINE with CONFIG (INPUT, WORKDIR override the config)
	$(BIN)/curate run $(PIPELINE) --config $(CONFIG) $(RUN_ARGS)

$(STAGES): install
	$(BIN)/curate run $(PIPELINE) --config $(CONFIG) --until $@ $(RUN_ARGS)

stats: install ## print the funnel of the latest run in WORKDIR (default demo/work)
	$(BIN)/curate stats $(or $(WORKDIR),demo/work)

OUT     ?= demo/out
export: install ## export the curated set of WORKDIR into OUT (ARGS=--overwrite to replace an earlier export)
	$(BIN)/curate export $(or $(WORKDIR),demo/work) --out $(OUT) --config $(CONFIG) $(ARGS)

report: install ## write WORKDIR/report/index.html
	$(BIN)/curate report $(or $(WORKDIR),demo/work)

reliability: install ## the fault-injection suite and its table
	$(BIN)/python -m pytest -q tests/reliability -rA $(ARGS)

SOURCE ?= urls.parquet
INGEST_OUT ?= work/ingested
ingest: install ## URL + caption list (img2dataset) or image folder SOURCE -> WebDataset shards in INGEST_OUT
	$(BIN)/curate ingest $(SOURCE) --out $(INGEST_OUT) $(ARGS)

compare: install ## train the same tiny CLIP on each recipe's output and compare (demo/report/compare.md)
	$(BIN)/python -m curate.tools.compare $(ARGS)

cluster-up: install ## a dask scheduler on 127.0.0.1:8786 and 2 workers (configs/cluster.yaml uses them)
	mkdir -p work/cluster
	$(BIN)/dask scheduler --host 127.0.0.1 --port 8786 --dashboard-address 127.0.0.1:8787 \
		> work/cluster/scheduler.log 2>&1 & echo $$! > work/cluster/scheduler.pid
	sleep 3
	for i in 1 2; do \
		$(BIN)/dask worker tcp://127.0.0.1:8786 --nworkers 1 --nthreads 1 --host 127.0.0.1 \
			> work/cluster/worker$$i.log 2>&1 & echo $$! > work/cluster/worker$$i.pid; \
	done
	@echo "scheduler tcp://127.0.0.1:8786, dashboard http://127.0.0.1:8787"

cluster-down: ## stop the cluster that cluster-up started
	-for f in work/cluster/*.pid; do kill $$(cat $$f) 2>/dev/null; rm -f $$f; done

clean: ## remove work dirs and outputs; keeps the trained demo scorer, synthetic pools and .venv
	rm -rf work demo/work demo/out demo/compare demo/report .pytest_cache

distclean: clean ## remove everything make wrote, the demo scorer, pools and .venv included
	rm -rf demo .venv
