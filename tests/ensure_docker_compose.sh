#!/usr/bin/env bash
# Makes sure `docker-compose` is on PATH (tests/unit/test_docker_files.py runs `docker-compose config`).
# Present: exits 0 at once. Missing: installs Debian's docker-compose package with apt-get
# (running `apt-get update` only when the first attempt fails); cannot install: says what to
# install and exits 1. No Docker engine is needed: `docker-compose config` only parses the file.
set -u

have() { command -v docker-compose >/dev/null 2>&1; }

have && exit 0

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1; }
  echo "docker-compose is missing: installing Debian's docker-compose package"
  if ! apt_install; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt_install || true
  fi
fi

if have; then
  docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /'
  exit 0
fi
echo "docker-compose is needed to validate docker/compose.yaml:" \
  "install it as root with 'apt-get update && apt-get install docker-compose'" \
  "(Debian/Ubuntu), or put any docker-compose >= 1.29 on PATH" >&2
exit 1
