# Two commands on a fresh machine:  `make pipeline` (the main job) and `make test` (the tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo pipeline test test-slow test-all clean

$(STAMP): requirements/cpu.txt setup.py csrc/tree_verify.cpp csrc/tree_verify.h
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/soaes demo --out outputs/demo

pipeline: $(STAMP)
	$(BIN)/soaes pipeline --config examples/tiny/pipeline.yaml

# Default tier: < 20 min on 2 cores. Slow tier: multi-process and larger runs marked @pytest.mark.slow.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
