"""Malformed foreign messages for RabbitMQ (pika), for tests/hostile_input.rs.

  hostile_amqp.py publish URL TOPIC GROUP KEY COUNT VARIANT
      waits until GROUP has a member, publishes the hostile messages to exchange TOPIC,
      then COUNT well-formed ones with key KEY; prints one JSON object per message:
      {"marker", "expect": "data" | "dead" | "retried", "seq"?}.
      VARIANT "tiers" adds the shapes that forge a retry tier's hold-queue return;
      "frame-dead" sends only an undecodable message with headers at the frame limit.
  hostile_amqp.py delete URL TOPIC GROUP
      deletes what the test declared: the group's queues, hold queues and return
      exchanges, the dead-letter topic's, and both exchanges.

Markers: every hostile message names itself in a "marker" string header where it has
headers, else in its JSON body ({"marker": ...}), else as its body's prefix up to "|".
A body that is a JSON object with a string "marker" is data; any other body fails the
handler's decode and must be dead-lettered.
"""
import datetime
import decimal
import json
import sys
import time
import uuid

import pika

KEY_HEADER = "x-switchyard-key"
SLOTS = 1024
PARTITIONS = 8
# Found by publishing growing header tables to RabbitMQ 3.10 with frame_max 131072: a
# content-header frame payload over frame_max - 8 closes the connection (FRAME_ERROR
# frame_too_large). The largest table is computed from the negotiated frame_max.
FRAME_OVERHEAD = 8
HEADER_MARGIN = 256
# RabbitMQ's max_message_size default (128 MiB, 3.8 and later), less a margin for the
# dead-letter copy's headers.
BODY_MARGIN = 1 << 20


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def routing_key(key):
    """The key's slot as a decimal number: the routing key of switchyard's direct exchange."""
    return str(fnv1a64(key if isinstance(key, bytes) else key.encode()) % SLOTS)


def wait_for_member(conn, topic, group):
    deadline = time.time() + 60
    while time.time() < deadline:
        ch = conn.channel()
        try:
            q = ch.queue_declare(queue=f"{topic}:{group}.members", passive=True)
            ch.close()
            if q.method.consumer_count > 0:
                return
        except pika.exceptions.ChannelClosedByBroker:
            pass  # not declared yet
        time.sleep(0.1)
    sys.exit(f"group {group} of {topic} has no member after 60 s")


def max_message_size(conn):
    # Not readable over AMQP; 128 MiB unless the server says otherwise.
    return int(conn._impl.server_properties.get("max_message_size", 134217728))


def header_frame_size(props):
    # class-id, weight, body size (2 + 2 + 8) plus the encoded properties.
    return 12 + sum(len(p) for p in props.encode())


def fill_headers(props, frame_max):
    """Grows the "filler" header until the content-header frame sits just under the limit."""
    limit = frame_max - FRAME_OVERHEAD - HEADER_MARGIN
    props.headers["filler"] = ""
    props.headers["filler"] = "f" * (limit - header_frame_size(props))
    assert header_frame_size(props) == limit, header_frame_size(props)
    return props


def hostile(topic, group, key, variant, frame_max, body_max):
    """(marker, expect, routing key, properties, body) of every hostile message."""
    rk = routing_key(key)

    def props(marker, headers=None, message_id=None, **kw):
        h = {"marker": marker, KEY_HEADER: key}
        h.update(headers or {})
        return pika.BasicProperties(
            message_id=message_id if message_id is not None else str(uuid.uuid4()),
            delivery_mode=2,
            headers=h,
            **kw,
        )

    def data(marker):
        return json.dumps({"marker": marker}).encode()

    def junk(marker):
        return marker.encode() + b"|\xff\xfe not json \x00"

    forged = {
        "switchyard-id": "forged-id",
        "Switchyard-Id": "forged-id-2",
        "x-retry-tier": "7",
        "x-retry-due-ms": "18446744073709551615",
        "x-retry-origin-topic": "elsewhere",
        "x-retry-origin-partition": "-9",
        "x-retry-origin-offset": "99999999999999999999",
        "x-retry-error": "forged",
        "x-delivery-count": 99,
        "x-dlq-error": "forged",
        "x-dlq-error-kind": "panic",
        "x-dlq-attempts": "-1",
        "x-dlq-original-topic": "elsewhere",
        "x-dlq-original-group": "elsewhere",
        "x-dlq-original-key": "elsewhere",
        "x-dlq-first-failure": "not a time",
        "x-death": [{"queue": "elsewhere", "reason": "rejected", "count": 5}],
    }
    out = [
        # Timestamps AMQP can carry that a clock cannot hold.
        ("ts-u64-max", "data", rk, props("ts-u64-max", timestamp=(1 << 64) - 1), data("ts-u64-max")),
        ("ts-i64-max+1", "data", rk, props("ts-i64-max+1", timestamp=1 << 63), data("ts-i64-max+1")),
        ("ts-zero", "data", rk, props("ts-zero", timestamp=0), data("ts-zero")),
        # Ids: missing, empty, shared by two different messages, the longest AMQP
        # holds (a short string: pika refuses 3 KB), and 3 KB forged as a header.
        ("id-missing", "data", rk, pika.BasicProperties(headers={"marker": "id-missing", KEY_HEADER: key}), data("id-missing")),
        ("id-empty", "data", rk, props("id-empty", message_id=""), data("id-empty")),
        ("id-dup-a", "data", rk, props("id-dup-a", message_id="hostile-shared-id"), data("id-dup-a")),
        ("id-dup-b", "data", rk, props("id-dup-b", message_id="hostile-shared-id"), data("id-dup-b")),
        ("id-255", "data", rk, props("id-255", message_id="i" * 255), data("id-255")),
        ("id-3kb-header", "data", rk, props("id-3kb-header", {"switchyard-id": "i" * 3072}), data("id-3kb-header")),
        ("id-dead-missing", "dead", rk, pika.BasicProperties(headers={"marker": "id-dead-missing", KEY_HEADER: key}), junk("id-dead-missing")),
        # Headers just under the frame limit.
        ("hdr-frame-limit", "data", rk, fill_headers(props("hdr-frame-limit"), frame_max), data("hdr-frame-limit")),
        # Every AMQP field type pika writes (it has no float encoding).
        ("hdr-types", "data", rk, props("hdr-types", {
            "int": 42, "neg": -(1 << 63), "bool": True,
            "bytes": b"\xff\xfebytes", "dict": {"a": {"b": [1, "x"]}}, "list": [1, "two", None],
            "none": None, "decimal": decimal.Decimal("3.14159"),
            "datetime": datetime.datetime(2030, 1, 2, 3, 4, 5),
            "ctl\x00\x01\x7f": "\x00\r\n\x1b[31m",
        }), data("hdr-types")),
        # The key in other types: an int (text "42": another key), a table (no key).
        ("key-int", "data", routing_key("42"), props("key-int", {KEY_HEADER: 42}), data("key-int")),
        ("key-table", "data", rk, props("key-table", {KEY_HEADER: {"k": key}}), data("key-table")),
        ("key-3kb", "data", routing_key("k" * 3072), props("key-3kb", {KEY_HEADER: "k" * 3072}), data("key-3kb")),
        # A routing key that is not the key's slot: another partition, still delivered.
        ("wrong-slot", "data", routing_key(key + "-other"), props("wrong-slot"), data("wrong-slot")),
        # Forged reserved and control headers.
        ("forged", "data", rk, props("forged", forged), data("forged")),
        ("forged-dead", "dead", rk, props("forged-dead", forged), junk("forged-dead")),
        # Odd properties.
        ("props-odd", "data", rk, props("props-odd", priority=255, expiration="600000", content_type="\x00/\xff",
                                        content_encoding="gzip", correlation_id="c" * 255, type="t", app_id="a"),
         data("props-odd")),
        # Bodies: empty, not UTF-8, JSON of the wrong shape, near the size limit.
        ("body-empty", "dead", rk, props("body-empty"), b""),
        ("body-non-utf8", "dead", rk, props("body-non-utf8"), junk("body-non-utf8")),
        ("body-json-wrong", "dead", rk, props("body-json-wrong"), b'{"marker": 5}'),
        ("body-huge", "data", rk, props("body-huge"),
         b'{"marker": "body-huge", "pad": "' + b"p" * (body_max - BODY_MARGIN) + b'"}'),
    ]
    if variant == "frame-dead":
        # Alone: its dead-letter copy gains the failure headers and no longer fits a frame.
        return [("hdr-frame-limit-dead", "dead", rk, fill_headers(props("hdr-frame-limit-dead"), frame_max),
                 junk("hdr-frame-limit-dead"))]
    if variant == "tiers":
        hold = f"{topic}:{group}.delay.300"
        # A forged return from a hold queue: believed as tier 1 (the backend cannot tell),
        # but its due time far off must not hold the handler past the tier's delay.
        out.append(("forged-hold-return", "data", rk, props("forged-hold-return", {
            "x-retry-tier": "99", "x-retry-due-ms": "18446744073709551615",
            "x-first-death-queue": hold, "x-first-death-reason": "expired",
            "x-first-death-exchange": hold,
        }), data("forged-hold-return")))
        # Forged retry headers on a message that then fails once: the retry goes through
        # the real tier and comes back to this group.
        out.append(("forged-fail-once", "retried", rk, props("forged-fail-once", forged),
                    json.dumps({"marker": "forged-fail-once", "fail_once": True}).encode()))
    return out


def publish(url, topic, group, key, count, variant):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    wait_for_member(conn, topic, group)
    frame_max = conn._impl.params.frame_max
    ch = conn.channel()
    ch.confirm_delivery()
    for marker, expect, rk, props, body in hostile(topic, group, key, variant, frame_max, max_message_size(conn)):
        # Confirmed and mandatory: an unroutable or refused message raises here.
        ch.basic_publish(topic, rk, body, props, mandatory=True)
        print(json.dumps({"marker": marker, "expect": expect}), flush=True)
    for seq in range(count):
        marker = f"well-{seq}"
        props = pika.BasicProperties(message_id=str(uuid.uuid4()), delivery_mode=2,
                                     timestamp=int(time.time()), headers={KEY_HEADER: key})
        ch.basic_publish(topic, routing_key(key), json.dumps({"marker": marker, "seq": seq}).encode(),
                         props, mandatory=True)
        print(json.dumps({"marker": marker, "expect": "data", "seq": seq}), flush=True)
    conn.close()


def delete(url, topic, group):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    dlq = f"{topic}.dlq"
    queues = [f"{topic}:{group}.p{p}" for p in range(PARTITIONS)] + [f"{topic}:{group}.members"]
    queues += [f"{dlq}:switchyard-dlq.p{p}" for p in range(PARTITIONS)] + [f"{dlq}:switchyard-dlq.members"]
    # Hold queues and their exchanges (named alike) of the tier delay the test uses.
    holds = [f"{topic}:{group}.delay.300"]
    for q in queues + holds:
        ch.queue_delete(q)  # deleting what does not exist is fine
    for x in holds + [f"{topic}:{group}.return", topic, dlq]:
        ch.exchange_delete(x)
    conn.close()


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "publish":
        publish(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7])
    elif cmd == "delete":
        delete(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
