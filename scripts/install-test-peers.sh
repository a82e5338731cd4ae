#!/usr/bin/env bash
# Peers the tests compare against that do not come from the package's extras:
#  - llama-cpp-python (llama.cpp) compiles from source: ~11 min once, then pip's wheel cache reuses it
#  - Debian's chromium for the web-page test (Playwright drives it; it never downloads a browser)
set -euo pipefail
VENV=${1:-.venv}
PIP="$VENV/bin/pip -q --disable-pip-version-check"
if ! "$VENV/bin/python" -c "import llama_cpp, llama_cpp.server.app" 2>/dev/null; then
  echo "installing llama-cpp-python (compiles llama.cpp once; cached afterwards)"
  $PIP install 'llama-cpp-python[server]'
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: chromium could not be installed; the browser test will be skipped"
  fi
fi
