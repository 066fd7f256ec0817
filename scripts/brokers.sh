#!/usr/bin/env bash
# Starts the brokers the tests need and stops what it started.
#   source scripts/brokers.sh; start_tansu; start_rabbitmq; ...; stop_started
# tansu (a Kafka-protocol broker) is installed from crates.io when missing; RabbitMQ is
# started (or installed from Debian's packages) only when 127.0.0.1:5672 does not answer,
# and its management plugin enabled when 127.0.0.1:15672 does not.
set -u

SWITCHYARD_ROOT=${SWITCHYARD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
SCRATCH="$SWITCHYARD_ROOT/.scratch"
TANSU_VERSION=0.6.0
STARTED_PIDS=()
STARTED_RABBITMQ=0
STARTED_POSTGRES=0

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.1
  done
  echo "brokers: $4 did not answer on $1:$2 within $3 s" >&2
  return 1
}

ensure_tansu() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    return 0
  fi
  echo "brokers: installing tansu $TANSU_VERSION from crates.io (7-10 minutes, once per machine)" >&2
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql >&2 || {
    echo "brokers: cargo install tansu failed" >&2
    return 1
  }
}

# tansu 0.6.0's sqlite schema has no index on its header table, so every fetched record
# scans every stored header and consumption slows to a crawl as the database grows
# (switchyard writes an id header on every record). Add the index tansu lacks.
tansu_index() {
  if ! command -v sqlite3 >/dev/null; then
    echo "brokers: installing sqlite3 from Debian's packages (to index tansu's database)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >&2 || return 1
  fi
  local i
  for ((i = 0; i < 50; i++)); do
    sqlite3 "$1" "create index if not exists header_topition_offset on header (topition, offset_id);" 2>/dev/null && return 0
    sleep 0.1 # the schema appears just after the port opens
  done
  echo "brokers: could not add the header index to $1" >&2
  return 1
}

start_tansu() {
  if port_open 127.0.0.1 9092; then
    echo "brokers: something already answers on 127.0.0.1:9092; using it as Kafka" >&2
    return 0
  fi
  ensure_tansu || return 1
  local dir="$SCRATCH/tansu"
  # A fresh database each run: tests use random topic names, and old data only slows it.
  rm -rf "$dir" && mkdir -p "$dir"
  (
    cd "$dir" &&
      exec tansu broker \
        --listener-url tcp://127.0.0.1:9092 \
        --advertised-listener-url tcp://127.0.0.1:9092 \
        --storage-engine sqlite://tansu.db >"$dir/tansu.log" 2>&1
  ) &
  STARTED_PIDS+=($!)
  echo $! >"$dir/tansu.pid"
  wait_port 127.0.0.1 9092 60 tansu || { tail -20 "$dir/tansu.log" >&2; return 1; }
  tansu_index "$dir/tansu.db" || return 1
  echo "brokers: tansu $TANSU_VERSION started (pid $!, sqlite storage in $dir)" >&2
}

start_rabbitmq() {
  if ! port_open 127.0.0.1 5672; then
    if ! command -v rabbitmq-server >/dev/null; then
      echo "brokers: installing rabbitmq-server from Debian's packages" >&2
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >&2 || return 1
    fi
    echo "brokers: starting RabbitMQ" >&2
    rabbitmq-server -detached >&2 || return 1
    STARTED_RABBITMQ=1
    wait_port 127.0.0.1 5672 120 RabbitMQ || return 1
    rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
  ensure_rabbitmq_management
}

# Listing topics goes through the management plugin's HTTP API (AMQP cannot list
# objects). Enabling it on a running node starts it at once; it stays enabled.
ensure_rabbitmq_management() {
  if port_open 127.0.0.1 15672; then
    return 0
  fi
  echo "brokers: enabling RabbitMQ's management plugin (rabbitmq-plugins enable rabbitmq_management)" >&2
  rabbitmq-plugins enable rabbitmq_management >&2 || return 1
  wait_port 127.0.0.1 15672 60 "RabbitMQ's management API" || return 1
}

start_postgres() {
  if port_open 127.0.0.1 5432; then
    return 0
  fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "brokers: installing postgresql from Debian's packages" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || return 1
  fi
  echo "brokers: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start >&2 || return 1
  STARTED_POSTGRES=1
  wait_port 127.0.0.1 5432 60 PostgreSQL || return 1
  # The tests use trust auth and the database "test", as this kind of machine is set up.
  su postgres -c "psql -tc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test" >&2 || true
}

# Foreign clients for the interoperability tests (confluent-kafka, pika), from PyPI.
ensure_python_clients() {
  if python3 -c "import confluent_kafka, pika" 2>/dev/null; then
    return 0
  fi
  echo "brokers: installing confluent-kafka and pika from PyPI" >&2
  python3 -m pip install -q confluent-kafka pika >&2 || return 1
}

stop_started() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  STARTED_PIDS=()
  if [ "$STARTED_RABBITMQ" = 1 ]; then
    rabbitmqctl stop >/dev/null 2>&1 || true
    STARTED_RABBITMQ=0
  fi
  if [ "$STARTED_POSTGRES" = 1 ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main stop >/dev/null 2>&1 || true
    STARTED_POSTGRES=0
  fi
}
