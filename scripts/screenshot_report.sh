#!/usr/bin/env bash
# Screenshot an attnlab report page in headless Chromium (Debian package `chromium`).
# Usage: scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
# The page must render with the network off: these flags keep Chromium from reaching out.
set -euo pipefail
html="$(realpath "$1")"; out="$(realpath -m "$2")"; size="${3:-1400,3000}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "needs Chromium: apt-get update && apt-get install -y chromium" >&2; exit 1
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" --window-size="$size" \
  --screenshot="$out" "file://$html" 2>/dev/null
# A 256-colour palette keeps the PNG small (docs/report.png stays well under 1 MB); needs Pillow.
python3 - "$out" <<'PY' 2>/dev/null || true
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").quantize(256).save(sys.argv[1], optimize=True)
PY
echo "wrote $out ($(stat -c %s "$out") bytes)"
