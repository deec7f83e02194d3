#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ answer on localhost: start an installed but stopped one,
# fail with what to install when one is missing.
set -u

pg_up() { pg_isready -q -h localhost -p 5432 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

wait_for() {
  local check=$1 i
  for i in $(seq 1 30); do $check && return 0; sleep 1; done
  return 1
}

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "PostgreSQL is not answering: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_for pg_up || { echo "PostgreSQL did not start on localhost:5432" >&2; exit 1; }
  else
    echo "PostgreSQL is needed on localhost:5432 (trust auth): install it (apt-get install postgresql)" >&2
    exit 1
  fi
fi

if ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "Redis is not answering: starting it"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for redis_up || { echo "Redis did not start on localhost:6379" >&2; exit 1; }
  else
    echo "Redis is needed on localhost:6379: install it (apt-get install redis-server)" >&2
    exit 1
  fi
fi
rabbitmq_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbitmq_up; then
  if command -v rabbitmq-server >/dev/null; then
    echo "RabbitMQ is not answering: starting it"
    rabbitmq-server -detached || true
    wait_for rabbitmq_up || { echo "RabbitMQ did not start on localhost:5672" >&2; exit 1; }
    rabbitmqctl await_startup >/dev/null 2>&1 || true
  else
    echo "RabbitMQ is needed on localhost:5672: install it (apt-get install rabbitmq-server)" >&2
    exit 1
  fi
fi
echo "PostgreSQL, Redis and RabbitMQ answer on localhost"
