# fedcmp: set-up, code generation, tests, demo and benchmarks. `make demo` and `make test` are
# the two commands a fresh machine needs; both install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch (a local wheel on the project's build machines); override for CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning costs 15-30x.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install proto test demo bench-system bench-client bench-train bench-quality bench-quality-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

proto: install
	$(PY) -m fedcmp.common.protogen

# The micro zoo is built (or found) before the suite, outside pytest's per-test timeout: a fresh
# machine builds it once (minutes on 2 busy cores), then every test shares it.
export FEDCMP_CACHE ?= $(HOME)/.cache/fedcmp

test: install
	$(PY) -c "from fedcmp.common.zoo import ensure_micro_zoo; print('micro zoo:', ensure_micro_zoo().root)"
	$(PY) -m pytest -q

demo: install
	$(PY) deploy/local_demo.py --clients 4 --rounds 5 --out runs/demo

# Flower for the system benchmark only, in its own environment: flwr pins protobuf < 7, fedcmp
# needs >= 7.35.1. The Flower App's pyproject pins the version (bench/flower_app).
FLOWER_VENV ?= .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed

$(FLOWER_STAMP): bench/flower_app/pyproject.toml
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOWER_VENV)/bin/python -m pip install --quiet -e bench/flower_app
	touch $(FLOWER_STAMP)

bench-system: install $(FLOWER_STAMP)
	$(PY) bench/bench_system.py --flower-venv $(FLOWER_VENV) --out docs/PERFORMANCE.md

bench-client: install bench-train
	$(PY) bench/bench_client.py --out docs/CLIENT.md

bench-train: install
	$(PY) bench/bench_train_throughput.py

bench-quality: install
	$(PY) bench/bench_quality.py --out docs

bench-quality-quick: install
	$(PY) bench/bench_quality.py --quick --out runs/bench-quick

clean:
	rm -rf $(VENV) $(FLOWER_VENV) build dist *.egg-info .pytest_cache runs
