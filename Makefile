# The commands of the README. Each creates .venv and installs requirements.txt on first use; `test`
# and `eval` also install requirements-eval.txt (lm-eval-harness), which training does not need.
VENV := .venv
PY := $(VENV)/bin/python
# Offline first: nothing in the demo or the tests may need the network.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# OpenMP threads sleep while waiting instead of spinning: spinning stalls steps on a CPU shared with other
# jobs. Set here because OpenMP reads it once, when torch loads, before any code of train.py runs.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast eval bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-eval: $(VENV)/.installed requirements-eval.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-eval.txt
	touch $@

# IFT on the bundled tiny model and sample data, with evaluation; writes runs/demo/ (replaced each time).
# The settings are commands/run_tiny_ift.sh's; DEMO_ARGS adds overrides (e.g. DEMO_ARGS="loss=sft").
demo: $(VENV)/.installed
	rm -rf runs/demo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash commands/run_tiny_ift.sh run_dir=runs/demo $(DEMO_ARGS)

# The suite in TEST_WORKERS processes (pytest-xdist; 2 = the CI machine's cores), a test file per worker at
# a time (--dist loadfile): a file's shared runs (module fixtures) are made once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed $(VENV)/.installed-eval
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The unit tier alone (pytest.ini's markers): no training run, subprocess or second process; under a minute
# on 2 cores (in TEST_WORKERS processes, as `test`). The quick check while editing a loss; `make test` runs
# all three tiers.
test-fast: $(VENV)/.installed $(VENV)/.installed-eval
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m unit tests

# lm-eval-harness on RUN's final/: `make eval RUN=runs/NAME [EVAL_ARGS="--suite quick"]` (see run_eval.py).
# The paper suite downloads its benchmarks, so this target is online unless EVAL_OFFLINE=1.
EVAL_OFFLINE ?= 0
eval: $(VENV)/.installed-eval
	@test -n "$(RUN)" || { echo 'usage: make eval RUN=runs/NAME [EVAL_ARGS="--suite quick --limit 20"]'; exit 2; }
	HF_HUB_OFFLINE=$(EVAL_OFFLINE) HF_DATASETS_OFFLINE=$(EVAL_OFFLINE) TRANSFORMERS_OFFLINE=$(EVAL_OFFLINE) \
		$(PY) run_eval.py $(RUN) $(EVAL_ARGS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks.ift_cost

clean:
	rm -rf runs outputs .pytest_cache
