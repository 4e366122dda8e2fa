# Two commands on a fresh machine:  `make pipeline` (the main job) and `make test` (the tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo pipeline test test-slow test-all bench-spec clean

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

# CPU speculative decoding on a pair big enough to show it: the `small` target (8 layers, 512 hidden)
# pre-trained on the demo corpora, `tiny-draft` distilled from it, then the side-by-side benchmark.
SPEC := outputs/spec_pair
bench-spec: $(STAMP)
	test -f data/demo/spm.model || $(BIN)/soaes prepare-demo-data --out data/demo
	test -f $(SPEC)/target/checkpoints/latest || $(BIN)/soaes train --config examples/spec/target_cpt.yaml
	test -f $(SPEC)/draft/checkpoints/latest || $(BIN)/soaes train --config examples/spec/draft_distill.yaml
	$(BIN)/python benchmarks/spec_decode.py --target $(SPEC)/target/checkpoints/iter_0000200 \
	    --draft $(SPEC)/draft/checkpoints/iter_0000200 --tokenizer data/demo/spm.model \
	    --prompts data/demo/corpora/domain.test.jsonl --num-prompts 16 --prompt-len 48 --max-new-tokens 64 \
	    --gammas 2 3 4 --trees 2,1 2,1,1 2,2,1 3,1,1 dynamic:2,4,8 --out $(SPEC)/bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
