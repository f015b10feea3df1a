# The two commands of the README. Each creates .venv and installs requirements.txt on first use.
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

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# IFT on the bundled tiny model and sample data, with evaluation; writes runs/demo/ (replaced each time).
# The settings are commands/run_tiny_ift.sh's; DEMO_ARGS adds overrides (e.g. DEMO_ARGS="loss=sft").
demo: $(VENV)/.installed
	rm -rf runs/demo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash commands/run_tiny_ift.sh run_dir=runs/demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/ift_cost.py

clean:
	rm -rf runs outputs .pytest_cache
