# The README's commands. Each target builds the virtualenv first (cluster/install.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := data/demo

.PHONY: setup demo test bench clean-demo

setup: $(VENV)/.umask-installed

$(VENV)/.umask-installed: pyproject.toml cluster/install.sh
	bash cluster/install.sh $(VENV)

demo: setup
	$(PY) -m trainer data synth --out $(DEMO)/raw --users 2000 --days 28 --seed 0
	$(PY) -m trainer data featurize --config configs/tiny.yaml data.source=$(DEMO)/raw data.features=$(DEMO)/features
	$(PY) -m trainer data summary --config configs/tiny.yaml data.features=$(DEMO)/features

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench

clean-demo:
	rm -rf $(DEMO)
