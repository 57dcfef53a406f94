# Every target creates/updates the virtual environment itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-e2e test-all bench lab schedule clean browser

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==26.3"
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name fraudlib --display-name "Python (fraudlib)" >/dev/null
	touch $(STAMP)

browser:  ## Debian's chromium for the report tests (headless, driven by playwright), when missing
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the report tests"; \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

setup: $(STAMP)  ## create/update .venv from the pinned requirements

run: $(STAMP)  ## the whole pipeline on the embedded defaults (synthetic data, embedded MLflow + Triton)
	$(BIN)/python run_pipeline.py $(ARGS)

test: $(STAMP) browser  ## the test suite (real Triton, MLflow, papermill), without the slow end-to-end tests
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q -m "not slow" $(ARGS)

test-e2e: $(STAMP) browser  ## the slow end-to-end tests: the whole pipeline twice, then the fraud commands
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q -m slow $(ARGS)

test-all: $(STAMP) browser  ## both
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q $(ARGS)

bench: $(STAMP)  ## benchmarks at full size (print figures; see docs/benchmarks.md)
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_triton.py

lab: $(STAMP)  ## JupyterLab on the notebooks with the registered "Python (fraudlib)" kernel
	$(BIN)/python -m jupyter lab notebooks/

schedule: $(STAMP)  ## a local Prefect server (127.0.0.1:4200, under runs/prefect) serving the monthly and on-ingest lifecycle deployments until Ctrl-C
	$(BIN)/python -m fraudlib.flow schedule $(ARGS)

clean:
	rm -rf runs/* $(VENV)
