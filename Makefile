# The README's commands. Each target builds the virtualenv first (cluster/install.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := data/demo

.PHONY: setup demo test bench clean-demo

setup: $(VENV)/.umask-installed

$(VENV)/.umask-installed: pyproject.toml cluster/install.sh
	bash cluster/install.sh $(VENV)

# synthetic data -> features -> a 2-worker training on an embedded Ray; starts afresh each time
demo: setup clean-demo
	$(PY) -m trainer data synth --out $(DEMO)/raw --users 2000 --days 28 --seed 0
	$(PY) -m trainer data featurize --config configs/tiny.yaml
	$(PY) -m trainer data summary --config configs/tiny.yaml
	$(PY) -m trainer train --config configs/tiny.yaml ray.name=demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench

clean-demo:
	rm -rf $(DEMO) runs/demo
