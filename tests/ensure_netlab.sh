#!/usr/bin/env bash
# What the partition suite (`make chaos-partition`, tests/system/test_chaos_partition.py) needs beyond
# the services: iproute2 (ip netns, veth, bridge, tuntap), nftables (the cuts), runuser
# (PostgreSQL refuses root) and the PostgreSQL 15 server binaries for a private cluster, and
# redis-server. Installs the missing ones from Debian's packages when it can (root, apt-get).
set -u

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v runuser >/dev/null || missing+=(util-linux)
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)

if [ ${#missing[@]} -eq 0 ]; then
  echo "the partition suite's tools are installed (ip, nft, runuser, redis-server, PostgreSQL 15)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "the partition suite needs these Debian packages: ${missing[*]} (install them as root)" >&2
  exit 1
fi
echo "installing ${missing[*]} for the partition suite"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
  || { echo "could not install ${missing[*]}" >&2; exit 1; }
echo "installed ${missing[*]}"
