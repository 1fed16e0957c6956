# Every target is a thin call of the `curate` CLI (or pytest) inside .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIPELINE ?= pipelines/full.yaml
CONFIG  ?= configs/local.yaml
DEMO_SAMPLES ?= 5000
DEMO_SHARDS  ?= 10
ARGS    ?=

.PHONY: install demo test bench synth run index stats export report reliability ingest compare cluster-up cluster-down clean

install: $(STAMP)

# Reinstall only when pyproject.toml changes (pip of torch & co. takes minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m curate.demo --samples $(DEMO_SAMPLES) --shards $(DEMO_SHARDS) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python -m curate.bench $(ARGS)

synth: install
	$(BIN)/curate synth --out demo/pool-v2 --samples $(DEMO_SAMPLES) --shards $(DEMO_SHARDS)

run: install
	$(BIN)/curate run $(PIPELINE) --config $(CONFIG) $(ARGS)

index: install
	$(BIN)/curate run pipelines/index.yaml --config $(CONFIG) $(ARGS)

stats: install
	$(BIN)/curate stats $(or $(WORKDIR),demo/work)

# A local Dask cluster on 127.0.0.1 for trying the cluster path (configs/cluster.yaml).
cluster-up: install
	mkdir -p work/cluster
	$(BIN)/dask scheduler --host 127.0.0.1 --port 8786 --dashboard-address 127.0.0.1:8787 \
		> work/cluster/scheduler.log 2>&1 & echo $$! > work/cluster/scheduler.pid
	sleep 3
	for i in 1 2; do \
		$(BIN)/dask worker tcp://127.0.0.1:8786 --nworkers 1 --nthreads 1 --host 127.0.0.1 \
			> work/cluster/worker$$i.log 2>&1 & echo $$! > work/cluster/worker$$i.pid; \
	done
	@echo "scheduler tcp://127.0.0.1:8786, dashboard http://127.0.0.1:8787"

cluster-down:
	-for f in work/cluster/*.pid; do kill $$(cat $$f) 2>/dev/null; rm -f $$f; done

clean:
	rm -rf work demo .pytest_cache

WORKDIR ?= demo/work
OUT     ?= demo/out
export: install
	$(BIN)/curate export $(WORKDIR) --out $(OUT) --config $(CONFIG) $(ARGS)

report: install
	$(BIN)/curate report $(WORKDIR)

# Fault-injection suite; prints the table of faults injected, runs completed, samples lost, outputs differing.
reliability: install
	$(BIN)/python -m pytest -q tests/reliability -rA $(ARGS)

# URL list (Parquet/CSV/TSV with url + caption columns) or image folder -> WebDataset shards
SOURCE ?= urls.parquet
INGEST_OUT ?= work/ingested
ingest: install
	$(BIN)/curate ingest $(SOURCE) --out $(INGEST_OUT) $(ARGS)

# Train the same tiny CLIP on each recipe's output and compare (demo/report/compare.md); ~15 min.
compare: install
	$(BIN)/python -m curate.compare $(ARGS)
