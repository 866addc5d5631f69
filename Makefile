# patchserve — the two set-up commands are `make run` and `make test`; both install what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.patchserve-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install model run test test-tools test-unit lint bench-swap bench-blocks bench-agreement clean

# Idempotent: re-runs only when the venv is missing or the dependency list changed.
$(STAMP): pyproject.toml scripts/install.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q packaging
	$(PY) scripts/install.py $(if $(GPU),--gpu,)
	@touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m patches.cli prepare-model

# Serves the embedded model with the demo tenants on 127.0.0.1:8000 (PATCHSERVE_HOST/PORT change it).
# The shipped patch is signed with the committed DEMO-ONLY key (deploy/demo/keys/README.md).
run: model
	@pd=$${PATCHSERVE_PATCH_DIR:-var/patches}; mkdir -p "$$pd" && \
	for f in deploy/demo/patches/*.safetensors; do [ -e "$$pd/$${f##*/}" ] || cp "$$f" "$$pd/"; done && \
	PATCHSERVE_PATCH_DIR="$$pd" PATCHSERVE_TRUST_DIR=$${PATCHSERVE_TRUST_DIR:-deploy/demo/trust} \
	exec $(PY) -m server

# The metrics integration test scrapes the server with a real Prometheus (Debian's package); as root
# with apt this installs it, elsewhere the test skips (and fails under CI=true).
test-tools:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null || \
	    { apt-get update -q >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; }; } || \
	  echo "prometheus could not be installed: tests/integration/test_prometheus.py will skip"

test: model test-tools
	$(PY) -m ruff check server patches tests
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest -m "not engine"

lint: install
	$(PY) -m ruff check server patches tests
	$(PY) -m ruff format --check server patches tests

bench-swap: model
	$(PY) -m bench.swap_latency

bench-blocks: model
	$(PY) -m bench.block_size

# What a patch costs, side by side with the alternatives (bare, system prompt, LoRA, client-side embeddings),
# on real servers over HTTP: ~35 min on 2 cores. QUICK=1 for a smoke run; BENCH_ARGS passes more flags
# (python -m bench.overhead --help). Results in $$PATCHSERVE_BENCH_OUT (default bench-results/).
.PHONY: bench
bench: model
	$(PY) -m bench.overhead $(if $(QUICK),--quick,) $(BENCH_ARGS)

# What patchserve's server layer costs over vLLM's own OpenAI server: the bare tenant vs vLLM's server, same
# engine arguments, both up at once (gpu_memory_utilization 0.12 each), streamed and not, c=1/8/32, interleaved
# rounds (~15 min). QUICK=1 for a smoke run; BENCH_ARGS passes more flags (e.g. --profile 20 for py-spy
# profiles of both API servers). Results in $$PATCHSERVE_BENCH_OUT/server_overhead.{json,md}.
.PHONY: bench-server
bench-server: model
	$(PY) -m bench.server_overhead $(if $(QUICK),--quick,) $(BENCH_ARGS)

# A patch on a real server: bare model vs safety system prompt vs patch, on the held-out split of the
# training files and on prompt sets from other sources (patches/evalsets.py). PATCH="a b" (default: the
# shipped one); results in var/eval/{heldout,external}/eval.{json,md,png}.
.PHONY: eval
eval: model
	$(PY) -m bench.patch_eval $(foreach p,$(PATCH),--patch $(p)) $(EVAL_ARGS)

# Detox patches on a real server: expected maximum toxicity, toxicity probability, refusals and fluency of
# sampled continuations, bare vs instruction vs each patch, on the RTP held-out split and another source.
# PATCH="a b" is required; results in var/eval/detox/{heldout,external}/toxicity.{json,md}.
.PHONY: eval-detox
eval-detox: model
	$(PY) -m bench.detox_eval $(foreach p,$(PATCH),--patch $(p)) $(EVAL_ARGS)

# Fairness patches on a real server: explicit gender-bias score (picks in ambiguous questions, gender attributed
# to a gender-neutral person), refusals and fluency, bare vs fairness system prompt vs each patch, on the held-out
# templates and other sources (WinoBias, BBQ). PATCH="a b" (none: bare model and system prompt only);
# results in var/eval/bias/{heldout,external}/bias.{json,md}.
.PHONY: eval-bias
eval-bias: model
	$(PY) -m bench.bias_eval $(foreach p,$(PATCH),--patch $(p)) $(EVAL_ARGS)

# The control-plane soak of issue 15 on the real engine: 16 streams while 200 swaps, operator rollbacks and
# tenant reloads run for 10 minutes (the suite runs the same test for 45 s). Override SOAK_SECONDS/SOAK_OPS.
.PHONY: soak
soak: model
	SOAK_SECONDS=$${SOAK_SECONDS:-600} SOAK_OPS=$${SOAK_OPS:-200} $(PY) -m pytest -q tests/integration/test_soak.py

# The server's overhead metric (shadow replays) against the benchmark's measured overhead.
bench-agreement: model
	$(PY) -m bench.overhead_agreement

clean:
	rm -rf $(VENV) var bench-results
