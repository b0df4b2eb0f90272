# Two set-up commands for a new machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

# Tools from npm, pinned in package.json with its lock file: the anvil Ethereum node for the
# chain watcher's tests (indexer/chain/anvil.py). The package ships its binary; no install
# script is needed.
NODE_STAMP := node_modules/.installed

# The state machine compiled with mypyc (docs/adr/0003-compiled-state-machine.md), built
# outside the source tree: build/native/statemachine holds the .so files next to copies of
# the sources, so the checkout itself stays pure Python and an edit is never shadowed.
NATIVE := build/native
NATIVE_STAMP := $(NATIVE)/.built
# The compiled modules: pyproject.toml [tool.quorumbook] native-modules (also setup.py's list).
NATIVE_MODULES := $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['quorumbook']['native-modules']))")
# -P and --import-mode=append: build/native comes before the checkout on sys.path.
NATIVE_ENV := QB_NATIVE=1 PYTHONPATH=$(CURDIR)/$(NATIVE):$(CURDIR)
NATIVE_PYTEST := $(NATIVE_ENV) $(BIN)/python -P -m pytest -q -p no:cacheprovider --import-mode=append

.PHONY: demo test test-fast native lint iptables jepsen bench bench-statemachine bench-replication bench-failover bench-api bench-indexer bench-restore bench-chain bench-latency soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Bytecode compiled once: where PYTHONDONTWRITEBYTECODE is set, every process (each node a
# test or the demo starts) would otherwise compile our sources again as it imports them.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q api bench cluster disaster_recovery indexer jepsen statemachine
	touch $(STAMP)

# The demo's nodes run the compiled engine (build/native first on their PYTHONPATH), as an
# installed wheel's do.
$(NODE_STAMP): package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

demo: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m cluster demo

test: $(STAMP) $(NATIVE_STAMP) lint iptables $(NODE_STAMP)
	$(BIN)/python -m pytest -q
	$(NATIVE_PYTEST) tests/statemachine tests/test_golden.py

# The edit-test loop: lint and every test but those that start process clusters (`slow`).
test-fast: $(STAMP) lint $(NODE_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

native: $(NATIVE_STAMP)

# The Jepsen harness's partitions are iptables DROP rules inside per-node network namespaces
# (jepsen/net.py): Debian's iptables, installed when missing. Without root it says so and
# goes on (those tests skip, saying why).
iptables:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v iptables-restore >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "iptables is missing and this is not root: the partition tests will skip"; exit 0; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq iptables >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null && apt-get install -y -qq iptables >/dev/null; }

# The Jepsen harness's long runs (docs/jepsen.md): every nemesis on 3 and 5 nodes and the
# planted bug, 60 s of faults each (about 25 minutes), reports in store/; `make test` runs the
# short ones. JEPSEN_ARGS="--time 20" for a quicker matrix.
jepsen: $(STAMP) $(NATIVE_STAMP) iptables
	$(NATIVE_ENV) $(BIN)/python -P -m jepsen.matrix --out store $(JEPSEN_ARGS)

$(NATIVE_STAMP): $(wildcard statemachine/*.py) pyproject.toml $(STAMP)
	rm -rf $(NATIVE) && mkdir -p $(NATIVE)
	cp -r statemachine $(NATIVE)/
	cd $(NATIVE) && $(CURDIR)/$(BIN)/mypyc $(NATIVE_MODULES) > mypyc.log 2>&1 \
		|| (tail -30 mypyc.log; exit 1)
	$(BIN)/python -m compileall -q $(NATIVE)/statemachine
	touch $@

# mypy over the engine as mypyc's wheel build checks it (the mypyc command of `make native`
# does not report errors in the modules the compiled ones import).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy statemachine

bench: bench-statemachine bench-replication bench-failover bench-api bench-indexer bench-restore bench-chain bench-latency

bench-statemachine: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.statemachine

bench-replication: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.replication

bench-failover: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.failover

bench-api: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.api

bench-indexer: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.indexer

bench-restore: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.restore

bench-chain: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -P -m bench.chain

bench-latency: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.latency

# A long run, not in `make bench`: a node's memory beside its state over minutes of load
# (bench/soak.py). SOAK_ARGS="--minutes 60" for a longer one.
soak: $(STAMP) $(NATIVE_STAMP)
	$(NATIVE_ENV) $(BIN)/python -P -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info node_modules
