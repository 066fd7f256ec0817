"""Deletes the queues and exchanges that switchyard's tests leave on RabbitMQ.

Test runs name their topics and groups with the prefixes below and random suffixes, so
every run adds queues (8 partition queues and a membership queue per group). This
machine's RabbitMQ runs with a small file-handle budget (about 900) and stops answering
when it runs out, so the test command removes them before and after each run.

  python3 scripts/rabbitmq-cleanup.py [amqp-url]
"""
import subprocess
import sys

import pika

# Topic names start the names of everything a group declares: its partition and
# membership queues (T:G.p0, T:G.members), and for delayed redeliveries its hold queues
# and their exchanges (T:G.delay.<ms>) and its return exchange (T:G.return). "syr-" is
# the RabbitMQ backend's own tests.
PREFIXES = ("sy-", "syr-", "durable-", "restart-", "orders-", "orders.", "orders:", "reminders-",
            "rates-")


def names(kind):
    out = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", f"list_{kind}", "name"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    return [n for n in out.splitlines() if n.startswith(PREFIXES)]


def main():
    url = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/%2f"
    queues, exchanges = names("queues"), names("exchanges")
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    for q in queues:
        ch.queue_delete(queue=q)
    for x in exchanges:
        ch.exchange_delete(exchange=x)
    conn.close()
    print(f"rabbitmq-cleanup: deleted {len(queues)} queues and {len(exchanges)} exchanges", file=sys.stderr)


if __name__ == "__main__":
    main()
