# sdesbench: every target creates the virtual environment and installs the package when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install test smoke bench doctor profile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## test: the test suite (CPU, tiny data; tests that need ../shared/data/camvid skip without it), in
## TEST_WORKERS pytest-xdist processes of one torch thread each (a test file stays in one process)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## smoke: the main job on the built-in tiny dataset (Table 3, smoke preset)
smoke: $(STAMP)
	$(VENV)/bin/sdesbench run table3 --preset smoke

bench: $(STAMP)
	$(VENV)/bin/sdesbench bench

## doctor: can this machine run the suite (versions, weights, every method x precision, DDP, speed)
doctor: $(STAMP)
	$(VENV)/bin/sdesbench doctor

profile: $(STAMP)
	$(VENV)/bin/sdesbench profile

clean:
	rm -rf $(VENV) results/runs results/cache .pytest_cache
