# camera-vllm: `make demo` and `make test` install everything on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.camera-vllm-installed
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install demo lint test test-fast kernel-test bench bench-model bench-load gpu-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

demo: install
	$(PY) -m camera_vllm.demo $(DEMO_ARGS)

# The kernel tests go first in their own process: they need Triton's interpreter, which
# must be switched on before anything (vLLM) imports Triton in compiled mode.
# Lint and format check first: seconds, and a red line here needs no engine start to find.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -ra tests/kernels $(PYTEST_ARGS)
	$(PY) -m pytest -q -ra --ignore=tests/kernels $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -ra -m "not vllm" $(PYTEST_ARGS)

# The kernel package's own tests only (tests/kernels: Triton interpreter, CPU kernel, reference).
kernel-test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests/kernels $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# The benchmark MoE (trained on this CPU, ~20-35 min; cached in bench/.cache, outside git).
bench-model: install
	$(PY) bench/build_model.py $(BENCH_MODEL_ARGS)

# The harder benchmark MoE: fine-grained Qwen2-MoE (32 experts, top-4, shared expert) on
# Shakespeare + KJV + Python docs (~35 min on 2 idle cores). Check the recipe first with
# make bench-model-hard BENCH_MODEL_ARGS=--smoke
.PHONY: bench-model-hard
bench-model-hard: install
	$(PY) bench/build_model.py --preset hard $(BENCH_MODEL_ARGS)

# vllm serve under 32 concurrent streaming clients for 2 minutes (docs/load-test.md).
bench-load: install
	$(PY) bench/load_test.py $(LOAD_ARGS)

# lm-eval accuracy of the quality table's checkpoints through vllm serve (docs/quality.md).
# A quick check: make bench-eval EVAL_ARGS="--only dense --limit 50"
.PHONY: bench-eval
bench-eval: install
	$(PY) bench/lm_eval_run.py $(EVAL_ARGS)

# The Triton kernel correctness check and benchmark, on a CUDA machine (bench/run_gpu_bench.sh).
gpu-bench:
	bash bench/run_gpu_bench.sh

# Every CPU benchmark: quality table, compressor cost, CPU speed table (2-3 h on 2 cores;
# trains the benchmark model first if its cache is missing). BENCH_STEPS=quality|cost|speed
bench: install
	bash bench/run_all.sh $(BENCH_STEPS)
