# `make study` and `make test` are the whole quick start: each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXPERIMENT ?= experiments/ablation.yaml
EXP ?=

.PHONY: install study smoke test report bench clean

# --no-compile: pip byte-compiles every file of every package, one at a time (about 95 of a
# 2-core machine's 200 s install); what the project imports is compiled instead by importing
# it once (42 s). PYTHONDONTWRITEBYTECODE, where a machine sets it, is lifted for that import
# and for the tests: without bytecode on disk every process compiles every module it imports
# (the suite ran about three times slower)
WRITE_BYTECODE := env -u PYTHONDONTWRITEBYTECODE
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	$(WRITE_BYTECODE) $(PY) -c "import study.run, study.trainable, study.sync, reports.build, \
		reports.analysis, reports.figures, seaborn, ipykernel.kernelapp, mlflow.server, xdist"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(PY) -m study.run $(EXPERIMENT)

smoke: $(STAMP)
	$(PY) -m study.run experiments/smoke.yaml

# three tests at a time: a test mostly waits on the processes it starts (Ray, MLflow, trials),
# so on 2 cores the suite took 1006 s with -n 3 against 1378 s one at a time (same machine);
# loadgroup: the tests that read one shared study or report (xdist_group) run in one worker,
# which builds it once; the 20 slowest listed at the end, to keep the suite's time in view
test: $(STAMP)
	$(WRITE_BYTECODE) $(PY) -m pytest -q -n 3 --dist loadgroup --durations=20

report: $(STAMP)
	@test -n "$(EXP)" || { echo "usage: make report EXP=<experiment name>"; exit 2; }
	$(PY) -m reports.build --experiment $(EXP) \
		--tracking-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/runs/$(EXP)/mlflow.db}

bench: $(STAMP)  # DATA=PATH: an image-folder copy of CIFAR-10 (default: torchvision's download)
	$(PY) bench/speed.py $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) reports/out .pytest_cache
