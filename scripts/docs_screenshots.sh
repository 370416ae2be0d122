#!/usr/bin/env bash
# Screenshots of every page of the documentation site in headless Chromium, at desktop width
# (1280 px) and at 390 px (a phone), to look at how the site reads, offline (MathJax is
# vendored); and, per page, the count of formulas MathJax typeset and of raw "\(" left.
#
# Usage: bash scripts/docs_screenshots.sh OUT
# Needs Chromium (Debian: apt-get install chromium) and the docs extra (pip install -c
# constraints.txt ".[docs]"). The site is served on 127.0.0.1 only, for the length of the run.
set -euo pipefail
out=${1:?usage: bash scripts/docs_screenshots.sh OUT}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
site=$(mktemp -d "${TMPDIR:-/tmp}/fisher-optim-site.XXXXXX")
python -m mkdocs build --strict -q --config-file "$repo/mkdocs.yml" -d "$site"
port=${PORT:-8765}
python -m http.server "$port" --bind 127.0.0.1 --directory "$site" >/dev/null 2>&1 &
server=$!
trap 'kill "$server"; rm -rf "$site"' EXIT
sleep 1
chrome=(chromium --headless --no-sandbox --disable-gpu --disable-background-networking
        --disable-component-update --disable-sync --no-first-run --hide-scrollbars
        --virtual-time-budget=15000)
(cd "$site" && find . -name index.html -not -path './assets/*' | sort) | while read -r page; do
  path=${page#./}; path=${path%index.html}
  name=${path%/}; name=${name//\//_}; name=${name:-home}
  url="http://127.0.0.1:$port/$path"
  for width in 1280 390; do
    "${chrome[@]}" --window-size="$width,2400" --screenshot="$out/$name-$width.png" "$url" 2>/dev/null
  done
  "${chrome[@]}" --dump-dom "$url" 2>/dev/null > "$out/$name.html"
  python - "$out/$name.html" "$name" <<'PY'
import re, sys
dom = open(sys.argv[1]).read()
text = re.sub(r"<[^>]+>", "", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S))
print(f"{sys.argv[2]:40s} formulas typeset {dom.count('<mjx-container'):4d}   raw \\( left {text.count(chr(92) + '('):3d}")
PY
done
