#!/usr/bin/env bash
# Makes sure `promtool` is available for tests/test_docker_files.py: on PATH, or in .venv/bin.
# Missing: unpacks it from Debian's prometheus package into .venv/bin (the package is only
# downloaded and unpacked, never installed, so no Prometheus server is set up or started).
set -u
cd "$(dirname "$0")/.."

command -v promtool >/dev/null 2>&1 && exit 0
[ -x .venv/bin/promtool ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is needed to check docker/prometheus-alerts.yml: install Prometheus's promtool" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "promtool is missing: unpacking it from Debian's prometheus package into .venv/bin"
download() { (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); }
if ! download; then
  apt-get update -qq >/dev/null 2>&1 || true
  download || { echo "could not download Debian's prometheus package for promtool" >&2; exit 1; }
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
install -m 0755 "$work/x/usr/bin/promtool" .venv/bin/promtool
.venv/bin/promtool --version 2>&1 | head -1
