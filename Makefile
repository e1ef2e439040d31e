# Two entry points: `make demo` and `make test`. Both set up what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3
# the one place the version is written; the wheel, the image tag and the manifests follow it
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' tokenscaler/__init__.py)
IMAGE  ?= ghcr.io/tokenscaler/tokenscaler

.PHONY: demo test lint docs prometheus bench generate generate-check dist image clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[lab,test,docs]'
	touch $@

# Debian's `prometheus` package brings both `prometheus` and `promtool`.
prometheus:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's prometheus package (brings promtool)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else \
	    echo "prometheus/promtool missing and not root: install Debian's 'prometheus' package" >&2; exit 1; \
	  fi; \
	fi

# The live demo (about 3 minutes): a fleet of simulators, sidecars, the controller and
# (when Debian's prometheus is installed) Prometheus on 127.0.0.1; report in demo-out/.
# `make demo DEMO_ARGS="--duration-s 60"` shortens it.
DEMO_ARGS ?=
demo: $(STAMP)
	$(VENV)/bin/tokenscaler demo $(DEMO_ARGS)

# ruff, the layer contracts, and the type checker (pyproject.toml's [tool.mypy]: strict on core,
# sidecar and control, checked everywhere in the package; an ignore that ignores nothing fails)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml: docs/, with README.md as its home page) into site/;
# tests/test_docs.py builds it the same way, so a broken link or a missing page fails `make test`.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: $(STAMP) prometheus
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

# Every generated file in the repository (gRPC stubs, CRDs, dashboards, PrometheusRule, recording
# rules, the package's copy of the ScaledObject, the experiments' claims table in docs/experiments.md):
# tools/generate.py. tests/test_generated.py fails when one drifts.
generate: $(STAMP)
	$(PY) -m tools.generate

generate-check: $(STAMP)
	$(PY) -m tools.generate --check

# The release artefacts: dist/tokenscaler-$(VERSION).tar.gz and the wheel, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

# The one image every role runs from, tagged with the version (needs a docker engine).
image:
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

bench: $(STAMP)
	$(PY) benchmarks/allocator.py
	$(PY) benchmarks/sim.py
	$(PY) benchmarks/sidecar.py
	$(PY) benchmarks/controller.py

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .hypothesis .mypy_cache
