# The README's commands. Each target builds the virtualenv first (cluster/install.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := data/demo
QUALITY_SOURCES := quality quality-metro
U_MASK := $(VENV)/bin/u-mask

.PHONY: setup demo quality test bench gpu-check clean-demo clean-quality

setup: $(VENV)/.umask-installed

$(VENV)/.umask-installed: pyproject.toml cluster/install.sh
	bash cluster/install.sh $(VENV)

# synthetic data -> features -> a 2-worker training on an embedded Ray -> an eval of its
# checkpoint on the held-out users; starts afresh each time. tests/test_demo.py runs the same
# steps and checks what they print (docs/after-the-demo.md says what comes next)
demo: setup clean-demo
	$(U_MASK) data synth --out $(DEMO)/raw --users 2000 --days 28 --seed 0
	$(U_MASK) data featurize --config configs/tiny.yaml
	$(U_MASK) data summary --config configs/tiny.yaml
	$(U_MASK) train --config configs/tiny.yaml ray.name=demo
	$(U_MASK) eval --checkpoint runs/demo --split test --out runs/demo/eval-test

# The evaluation tables of README and docs/evaluation.md, one per data source (configs/quality.yaml:
# the personas generator; configs/quality-metro.yaml: the independently written metro generator):
# U-MASK trained with adaptive masks, its ablation trained with uniform masks and the learned
# baseline (model.backbone=mae), each 400 steps, scored with the untrained model and the heuristics
# on held-out and cold-start users, with paired intervals (docs/evaluation.md); starts afresh each time
quality: setup clean-quality
	$(U_MASK) data synth --out data/quality/raw --users 2000 --days 28 --seed 0
	$(U_MASK) data synth --generator metro --out data/quality-metro/raw --users 2000 --days 28 --seed 0
	for source in $(QUALITY_SOURCES); do \
	  $(U_MASK) data featurize --config configs/$$source.yaml || exit 1; \
	  $(U_MASK) train --config configs/$$source.yaml ray.name=$$source-adaptive || exit 1; \
	  $(U_MASK) train --config configs/$$source.yaml ray.name=$$source-uniform model.mask.family=uniform || exit 1; \
	  $(U_MASK) train --config configs/$$source.yaml ray.name=$$source-mae model.backbone=mae || exit 1; \
	  for split in test cold; do \
	    $(U_MASK) eval --checkpoint runs/$$source-adaptive --uniform-checkpoint runs/$$source-uniform \
	      --baseline-checkpoint runs/$$source-mae --split $$split \
	      --out data/$$source/report-$$split || exit 1; done; done

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench

# On a machine with a CUDA GPU: every `-m gpu` test and the GPU benchmarks (attention, tables),
# a report in bench/results/gpu-check (under 8 minutes on one H100/H200; docs/kernels.md).
# Without a GPU it says so and fails at once.
gpu-check: setup
	$(PY) bench/gpu_check.py

clean-demo:
	@rm -rf $(DEMO) runs/demo

clean-quality:
	rm -rf $(foreach s,$(QUALITY_SOURCES),data/$(s) runs/$(s)-adaptive runs/$(s)-uniform runs/$(s)-mae)
