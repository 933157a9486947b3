# Two commands for a newcomer: `make app` (install, then serve the app) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup app lint format test test-slow test-timm bench bench-quick notebooks notebooks-outputs screenshots clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

app: $(STAMP)
	$(PY) -m app $(APP_ARGS)

lint: $(STAMP)  # ruff (pinned in requirements.txt, configured in pyproject.toml): lint, then the format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -n 2 --timeout 900 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --timeout 3600 -m slow $(PYTEST_ARGS)
	$(MAKE) test-timm

# refresh docs/screenshots/*.png from the browser test (make test never writes into the tree)
screenshots: $(STAMP)
	SPA_VIZ_SCREENSHOTS=1 $(PY) -m pytest -q -p no:xdist tests/app/test_browser.py tests/app/test_browser_scale.py

# timm's own tests/test_models.py on the spa_vit_*/spt_* presets; fetches the timm sdist once into .cache/
test-timm: $(STAMP)
	$(PY) -m tests.timm_upstream $(TIMM_TEST_ARGS)

bench: $(STAMP)
	$(PY) -m spa_viz.cli bench block

bench-quick: $(STAMP)
	$(PY) -m spa_viz.cli bench block --quick

notebooks: $(STAMP)  # JupyterLab is optional (not needed by the tests, which run the notebooks headless)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

# execute the notebooks at full size and store their outputs (so they read on a code host); NOTEBOOKS= picks some
notebooks-outputs: $(STAMP)
	$(PY) notebooks/execute.py $(NOTEBOOKS)

clean-venv:
	rm -rf $(VENV)
