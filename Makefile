# Set-up and checks. `make test` is the README's test command and what CI runs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this disk; asking PyPI instead would pull a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0
WHEELS ?= /opt/wheels
# Debian packages the tests need; installed only when missing. Open MPI: Horovod and mpi4py;
# gcc: the native kernels (commhooks/native), which tests/native builds and checks.
APT_PACKAGES ?= openmpi-bin libopenmpi-dev gcc
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test test-fast bench-kernels bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/ensure-apt.sh scripts/install-horovod.sh
	bash scripts/ensure-apt.sh $(APT_PACKAGES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(if $(wildcard $(WHEELS)),--find-links $(WHEELS)) -e ".[dev,mpi,demo]"
	# Horovod built from its sdist against this torch; the wheel is cached outside the repo.
	bash scripts/install-horovod.sh $(PY)
	touch $(STAMP)

# The main job: 4 torchrun workers on digits, dense against the featured compressors.
# DEMO_ARGS="--rate 20mbit --hidden 1024" runs it over shaped links (root).
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/commhooks-demo --out demo-out $(DEMO_ARGS)

# Codec speed of every compressor against memcpy (4M, 16M, 64M elements); see docs/benchmarks.md.
# THP_MEM_ALLOC_ENABLE=1: torch backs large tensors with huge pages; fresh 256 MB outputs
# otherwise spend more time in page faults than in the codec (measured there).
bench-kernels: setup
	THP_MEM_ALLOC_ENABLE=1 $(PY) benchmarks/codec_speed.py --out bench-kernels.json --markdown bench-kernels.md

# End to end over shaped links (root: network namespaces): step time against dense and torch's
# hooks, wire bytes against the interfaces' counters, time to accuracy on digits; about 30-40
# minutes here. Tables and plots in bench-out/; see benchmarks/e2e.py. Then FSDP2 on 2 nodes x 2
# ranks over 100 Mbit/s, dense HSDP against the hierarchical compressed mode
# (bench-out/fsdp_shaped.*; see benchmarks/fsdp_shaped.py), a few minutes more.
bench: setup
	THP_MEM_ALLOC_ENABLE=1 $(PY) benchmarks/e2e.py --out bench-out
	THP_MEM_ALLOC_ENABLE=1 $(PY) benchmarks/fsdp_shaped.py --rate 100mbit \
		--out bench-out/fsdp_shaped.json --markdown bench-out/fsdp_shaped.md

# The whole suite; the 25 slowest tests are listed at the end. TEST_WORKERS pytest-xdist
# workers, each taking a whole test module at a time (module fixtures start once), modules
# with launcher, root or slow tests first (tests/_tags.py); tests that create network
# namespaces take turns on a lock (tests/conftest.py).
# Python's default of caching bytecode (in __pycache__, git-ignored) holds for the tests even
# where the environment sets PYTHONDONTWRITEBYTECODE: otherwise each of the suite's few hundred
# launched processes compiles the package again, and each worker rewrites every test module.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q
test: setup
	$(PYTEST) --durations=25 $(XDIST)

# The edit loop: unit, contract and 2-rank tests; no frameworks, launchers, benchmarks or
# network namespaces; no 4-rank layouts (tags by path in tests/_tags.py). Same workers as `test`.
test-fast: setup
	$(PYTEST) -m "not slow and not launcher and not root" $(XDIST)

# On a machine with a CUDA device: the CUDA-marked tests, the kernels' speed on the device
# (25M and 100M elements), DDP jobs over NCCL (1 process) and gloo (2 processes sharing the
# GPU) with every compressor; report in gpu-check/report.md (docs/gpu.md). Without a GPU it
# says so and exits 0.
gpu-check: setup
	THP_MEM_ALLOC_ENABLE=1 $(PY) scripts/gpu_check.py --out gpu-check

lint: setup
	$(VENV)/bin/ruff check commhooks tests benchmarks examples
	$(VENV)/bin/ruff format --check commhooks tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo-out bench-kernels.* bench-out gpu-check
