#!/usr/bin/env bash
# A separate virtual environment for NVIDIA's kvpress, which pins transformers < 5.3 (attnlab needs 5.x >= 5.3).
# Usage: bash benchmarks/kvpress_env.sh [VENV]   (default /tmp/kvpress-venv); then run
#   VENV/bin/python benchmarks/kvpress_compare.py score ...   (see benchmarks/kvpress_compare.py)
set -euo pipefail
VENV="${1:-/tmp/kvpress-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
# the CPU torch wheel lies on local disk (pip's find-links), so this is quick and needs no index
"$VENV/bin/pip" install "torch==2.13.0"
# kvpress from PyPI with its transformers pin made explicit (it declares transformers>=4.56,<5.3)
"$VENV/bin/pip" install kvpress "transformers>=4.56,<5.3"
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '?', 'transformers', transformers.__version__, 'torch', torch.__version__)"
