# Every target creates/updates the virtual environment itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench kernel lab clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==26.3"
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name fraudlib --display-name "Python (fraudlib)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)  ## create/update .venv from the pinned requirements

run: $(STAMP)  ## the whole pipeline on the embedded defaults (synthetic data, embedded MLflow + Triton)
	$(BIN)/python run_pipeline.py $(ARGS)

test: $(STAMP)  ## all tests, the slow end-to-end pipeline test included
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q $(ARGS)

test-fast: $(STAMP)  ## tests without the slow end-to-end ones
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)  ## benchmarks (print figures; see docs/benchmarks.md)
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_triton.py

lab: $(STAMP)  ## JupyterLab on the notebooks with the registered "Python (fraudlib)" kernel
	$(BIN)/python -m jupyter lab notebooks/

clean:
	rm -rf runs/* $(VENV)
