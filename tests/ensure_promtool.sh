#!/usr/bin/env bash
# Makes sure `promtool` (tests/unit/test_docker_files.py) and the `prometheus` server
# (tests/integration/test_prometheus.py) are available: on PATH, or in .venv/bin. Missing ones are
# unpacked from Debian's prometheus package into .venv/bin (the package is only downloaded
# and unpacked, never installed: no Prometheus service is set up; the test starts its own).
set -u
cd "$(dirname "$0")/.."

missing=()
for tool in promtool prometheus; do
  command -v "$tool" >/dev/null 2>&1 || [ -x ".venv/bin/$tool" ] || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "${missing[*]} needed by the tests: install Prometheus (promtool and prometheus)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "${missing[*]} missing: unpacking from Debian's prometheus package into .venv/bin"
download() { (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); }
if ! download; then
  apt-get update -qq >/dev/null 2>&1 || true
  download || { echo "could not download Debian's prometheus package" >&2; exit 1; }
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
for tool in "${missing[@]}"; do
  install -m 0755 "$work/x/usr/bin/$tool" ".venv/bin/$tool"
  ".venv/bin/$tool" --version 2>&1 | head -1
done
