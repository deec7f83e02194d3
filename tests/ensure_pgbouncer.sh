#!/usr/bin/env bash
# Makes sure `pgbouncer` is installed (tests/integration/test_pgbouncer.py starts its own, on
# a port of its own, in front of the run's test database): Debian's package, installed with apt-get when
# missing. The package's own service is not started here (the test never uses it).
set -u

command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] && exit 0

if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
  echo "pgbouncer needed by the tests: install it (apt-get install pgbouncer, as root)" >&2
  exit 1
fi
echo "pgbouncer missing: installing Debian's pgbouncer package"
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
if ! install; then
  apt-get update -qq >/dev/null 2>&1 || true
  install || { echo "could not install Debian's pgbouncer package" >&2; exit 1; }
fi
/usr/sbin/pgbouncer --version | head -1
