# pvt-vision: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pvt-installed
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint docs clean browser

setup: $(STAMP)

# Re-runs only when the project's requirements change; otherwise `make setup` is instant.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	# A tritonserver binary for tests/test_triton.py (Linux x86-64, glibc >= 2.35; the test skips,
	# saying why, where it cannot be had). --no-deps: its requirements would downgrade numpy.
	$(PY) -m pip install --quiet --no-deps 'nvidia-pytriton==0.7.0' || echo "no nvidia-pytriton here: the Triton server test will skip"
	touch $@

demo: setup
	$(PY) examples/demo.py $(DEMO_ARGS)

test: setup browser
	$(PY) -m pytest

# Debian's chromium and its driver for the browser test of `pvt serve` (Selenium is pointed at them:
# nothing is downloaded at test time). Installed only when missing; apt-get update only then.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

lint: setup
	$(PY) -m ruff check src tests examples docs/_ext
	$(PY) -m ruff format --check src tests examples docs/_ext
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# The documentation site (docs/, Sphinx + MyST): warnings are errors; the pages land in docs/_build/html.
docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
