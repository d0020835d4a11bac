# Every target creates and reuses the virtual environment it needs (.venv), so a fresh clone needs only `make`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo explore visualise test test-fast lint tensorboard bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## train the demo SAE offline on CPU (a fresh outputs/demo each time), then evaluate it
	rm -rf outputs/demo
	$(PY) train.py experiment=demo hydra.run.dir=outputs/demo
	$(PY) evaluate.py run=outputs/demo num_workers=2

explore: $(STAMP)  ## the SAE Explorer on the demo run (after make demo): http://localhost:8501
	$(PY) -m sae_lightning.explorer run=outputs/demo

visualise: $(STAMP)  ## optimised images for 8 random live features of the demo run -> outputs/demo/eval/visualisations
	$(PY) visualise.py run=outputs/demo random_features=8

test: $(STAMP)  ## the whole suite, end-to-end runs included
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

tensorboard: $(STAMP)  ## serve every run's event files on http://localhost:6006
	mkdir -p outputs multirun
	$(VENV)/bin/tensorboard --logdir_spec outputs:outputs,multirun:multirun --host localhost --port 6006

bench: $(STAMP)  ## CPU benchmarks; writes BENCHMARKS.md
	$(PY) -m benchmarks.run

clean:
	rm -rf outputs multirun .pytest_cache
