"""A foreign RabbitMQ client (pika) for switchyard's interoperability tests.

  rabbitmq_client.py publish URL TOPIC GROUP KEY [name=value ...]  < payload lines
      waits until GROUP has a member, then publishes each line to exchange TOPIC the
      way switchyard does; prints one JSON object per message (id, slot, partition).
  rabbitmq_client.py consume URL TOPIC COUNT
      binds its own queue to every slot of exchange TOPIC, prints "ready", then prints COUNT
      messages as JSON (routing_key, id, key, headers, payload).
  rabbitmq_client.py delete URL TOPIC [GROUP ...]
      deletes the groups' queues and the topic's exchange.

The wire format it speaks (see backends/rabbitmq/src/codec.rs): topic T is the durable
direct exchange T; the routing key is the slot of the key's FNV-1a 64 hash (mod 1024) as
a decimal number ("0" to "1023"); the key travels in the header
x-switchyard-key, the id in message_id, other headers in the headers table as strings.
"""
import json
import sys
import time
import uuid

import pika

KEY_HEADER = "x-switchyard-key"
SLOT_BITS = 10


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def slot(key: str) -> int:
    return fnv1a64(key.encode()) % (1 << SLOT_BITS)


def routing_key(key: str) -> str:
    return str(slot(key))


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def wait_for_member(conn, topic, group):
    deadline = time.time() + 60
    while time.time() < deadline:
        ch = conn.channel()
        try:
            q = ch.queue_declare(queue=f"{topic}:{group}.members", passive=True)
            if q.method.consumer_count > 0:
                ch.close()
                return
            ch.close()
        except pika.exceptions.ChannelClosedByBroker:
            pass  # not declared yet: the passive declaration closed the channel
        time.sleep(0.1)
    sys.exit(f"group {group} of {topic} has no member after 60 s")


def publish(url, topic, group, key, headers):
    conn = connect(url)
    wait_for_member(conn, topic, group)
    ch = conn.channel()
    ch.confirm_delivery()
    pairs = dict(h.split("=", 1) for h in headers)
    for line in sys.stdin.read().splitlines():
        message_id = str(uuid.uuid4())
        props = pika.BasicProperties(
            message_id=message_id,
            delivery_mode=2,
            timestamp=int(time.time()),
            headers={**pairs, KEY_HEADER: key},
        )
        # Confirmed and mandatory: an unroutable message raises here.
        ch.basic_publish(topic, routing_key(key), line.encode(), props, mandatory=True)
        print(json.dumps({"id": message_id, "slot": slot(key), "routing_key": routing_key(key)}), flush=True)
    conn.close()


def consume(url, topic, count):
    conn = connect(url)
    ch = conn.channel()
    # The same declaration as switchyard's, so either may come first.
    ch.exchange_declare(topic, "direct", durable=True)
    queue = ch.queue_declare(queue="", exclusive=True).method.queue
    # A direct exchange has no wildcard: a queue that sees the whole topic binds every slot.
    for s in range(1 << SLOT_BITS):
        ch.queue_bind(queue, topic, str(s))
    print("ready", flush=True)
    seen = 0
    deadline = time.time() + 60
    while seen < count and time.time() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        headers = {k: text(v) for k, v in (props.headers or {}).items()}
        key = headers.pop(KEY_HEADER, None)
        print(json.dumps({
            "routing_key": method.routing_key,
            "expected_routing_key": routing_key(key) if key is not None else None,
            "id": props.message_id,
            "key": key,
            "headers": headers,
            "content_type": props.content_type,
            "payload": body.decode(),
        }), flush=True)
        seen += 1
    conn.close()
    if seen < count:
        sys.exit(f"only {seen} of {count} messages arrived")


def delete(url, topic, groups):
    conn = connect(url)
    ch = conn.channel()
    # Deleting what does not exist is fine: RabbitMQ answers delete-ok.
    for group in groups:
        for name in [f"{topic}:{group}.p{p}" for p in range(8)] + [f"{topic}:{group}.members"]:
            ch.queue_delete(name)
    ch.exchange_delete(topic)
    conn.close()


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "publish":
        publish(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    elif cmd == "consume":
        consume(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "delete":
        delete(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
