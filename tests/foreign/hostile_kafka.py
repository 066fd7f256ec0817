"""Malformed foreign records for Kafka (confluent-kafka), for tests/hostile_input.rs.

  hostile_kafka.py produce BOOTSTRAP TOPIC KEY COUNT TIER_TOPIC
      produces the hostile records to TOPIC (and, unless TIER_TOPIC is "-", one forged
      record straight into that retry tier topic), then COUNT well-formed ones with key
      KEY; prints one JSON object per record:
      {"marker", "expect": "data" | "dead" | "retried", "seq"?}.

Markers: every hostile record names itself in a "marker" header where it has headers,
else in its JSON body ({"marker": ...}). A body that is a JSON object with a string
"marker" is data; any other body fails the handler's decode and must be dead-lettered.
"""
import json
import sys

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

# tansu accepts records of 8 MB and more; the limit that binds is librdkafka's
# message.max.bytes (1,000,000 by default: "Message size too large" at 1,000,000 bytes of
# value), which switchyard's producer also uses for its dead letters. The margin leaves
# room for the dead-letter copy's headers.
MAX_MESSAGE = 1_000_000
MARGIN = 16_384


def ensure_topic(admin, topic):
    if topic in admin.list_topics(timeout=10).topics:
        return
    for future in admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)]).values():
        try:
            future.result(timeout=30)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def hostile(key, fail_once):
    """(marker, expect, key, headers, value, timestamp) of every hostile record."""
    k = key.encode()

    def data(marker):
        return json.dumps({"marker": marker}).encode()

    def junk(marker):
        return marker.encode() + b"|\xff\xfe not json \x00"

    def m(marker, *extra):
        return [("marker", marker.encode()), *extra]

    forged = [
        ("switchyard-id", b"forged-id"),
        ("x-switchyard-key", b"forged-key"),
        ("Switchyard-Id", b"forged-id-2"),
        ("x-retry-tier", b"7"),
        ("x-retry-due-ms", b"18446744073709551615"),
        ("x-retry-origin-topic", b"elsewhere"),
        ("x-retry-origin-partition", b"-9"),
        ("x-retry-origin-offset", b"99999999999999999999"),
        ("x-retry-error", b"forged"),
        ("x-delivery-count", b"99"),
        ("x-dlq-error", b"forged"),
        ("x-dlq-error-kind", b"panic"),
        ("x-dlq-attempts", b"-1"),
        ("x-dlq-original-topic", b"elsewhere"),
        ("x-dlq-original-group", b"elsewhere"),
        ("x-dlq-original-key", b"elsewhere"),
        ("x-dlq-first-failure", b"not a time"),
    ]
    near_limit = MAX_MESSAGE - MARGIN
    out = [
        # Timestamps a clock cannot hold. (Not negative ones: tansu 0.6 stores a record
        # with timestamp -5 and then closes every fetch of its partition, for any client.)
        ("ts-i64-max", "data", k, m("ts-i64-max"), data("ts-i64-max"), (1 << 63) - 1),
        ("ts-year-10000", "data", k, m("ts-year-10000"), data("ts-year-10000"), 253402300800000),
        # Ids: none at all (no headers), empty, two in one record, one shared by two
        # records, 3 KB, not UTF-8, without a value.
        ("id-missing", "data", k, None, data("id-missing"), None),
        ("id-empty", "data", k, m("id-empty", ("switchyard-id", b"")), data("id-empty"), None),
        ("id-two", "data", k, m("id-two", ("switchyard-id", b"a"), ("switchyard-id", b"b")), data("id-two"), None),
        ("id-dup-a", "data", k, m("id-dup-a", ("switchyard-id", b"hostile-shared-id")), data("id-dup-a"), None),
        ("id-dup-b", "data", k, m("id-dup-b", ("switchyard-id", b"hostile-shared-id")), data("id-dup-b"), None),
        ("id-3kb", "data", k, m("id-3kb", ("switchyard-id", b"i" * 3072)), data("id-3kb"), None),
        ("id-non-utf8", "data", k, m("id-non-utf8", ("switchyard-id", b"\xff\xfe")), data("id-non-utf8"), None),
        ("id-none", "data", k, m("id-none", ("switchyard-id", None)), data("id-none"), None),
        # Headers: one value near the size limit, as data and as a dead letter; many;
        # not UTF-8; without a value; the same name twice; control characters.
        ("hdr-huge", "data", k, m("hdr-huge", ("filler", b"f" * near_limit)), data("hdr-huge"), None),
        ("hdr-huge-dead", "dead", k, m("hdr-huge-dead", ("filler", b"f" * near_limit)), junk("hdr-huge-dead"), None),
        ("hdr-many", "data", k, m("hdr-many", *[(f"h{i}", b"v") for i in range(2000)]), data("hdr-many"), None),
        ("hdr-non-utf8", "data", k, m("hdr-non-utf8", ("bin", b"\xff\xfe\xfd\x00")), data("hdr-non-utf8"), None),
        ("hdr-none", "data", k, m("hdr-none", ("nothing", None)), data("hdr-none"), None),
        ("hdr-dup", "data", k, m("hdr-dup", ("dup", b"1"), ("dup", b"2")), data("hdr-dup"), None),
        ("hdr-ctl", "data", k, m("hdr-ctl", ("ctl\x00\x01\x7f", b"\x00\r\n\x1b[31m"), ("", b"empty name")), data("hdr-ctl"), None),
        # Keys: none, empty, not UTF-8, 3 KB.
        ("key-none", "data", None, m("key-none"), data("key-none"), None),
        ("key-empty", "data", b"", m("key-empty"), data("key-empty"), None),
        ("key-non-utf8", "data", b"\xff\xfe", m("key-non-utf8"), data("key-non-utf8"), None),
        ("key-3kb", "data", b"k" * 3072, m("key-3kb"), data("key-3kb"), None),
        # Forged reserved and control headers.
        ("forged", "data", k, m("forged", *forged), data("forged"), None),
        ("forged-dead", "dead", k, m("forged-dead", *forged), junk("forged-dead"), None),
        # Bodies: none, empty, not UTF-8, JSON of the wrong shape, near the size limit.
        ("body-none", "dead", k, m("body-none"), None, None),
        ("body-empty", "dead", k, m("body-empty"), b"", None),
        ("body-non-utf8", "dead", k, m("body-non-utf8"), junk("body-non-utf8"), None),
        ("body-json-wrong", "dead", k, m("body-json-wrong"), b'{"marker": 5}', None),
        ("body-huge", "dead", k, m("body-huge"), junk("body-huge") + b"p" * near_limit, None),
    ]
    if fail_once:
        # Forged retry headers on a record that then fails once: its retry goes through
        # the real tier and comes back to this group.
        out.append(("forged-fail-once", "retried", k, m("forged-fail-once", *forged),
                    json.dumps({"marker": "forged-fail-once", "fail_once": True}).encode(), None))
    return out


def produce(bootstrap, topic, key, count, tier_topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topic(admin, topic)
    # switchyard's partitioner, so a key lands where switchyard's own records of it do.
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "partitioner": "murmur2_random"})
    failed = []

    def sent(err, _msg):
        if err is not None:
            failed.append(str(err))

    def send(t, marker, expect, key, headers, value, ts, seq=None):
        kw = {"timestamp": ts} if ts is not None else {}
        if headers is not None:
            kw["headers"] = headers
        producer.produce(t, key=key, value=value, on_delivery=sent, **kw)
        # One at a time, so the log holds them in this order.
        if producer.flush(30) != 0 or failed:
            sys.exit(f"{marker}: not produced: {failed}")
        line = {"marker": marker, "expect": expect}
        if seq is not None:
            line["seq"] = seq
        print(json.dumps(line), flush=True)

    for args in hostile(key, tier_topic != "-"):
        send(topic, *args)
    if tier_topic != "-":
        ensure_topic(admin, tier_topic)
        # Straight into the tier topic with a due time that never comes: it must wait at
        # most the tier's delay.
        send(tier_topic, "in-tier", "data", key.encode(),
             [("marker", b"in-tier"), ("x-retry-tier", b"99"), ("x-retry-due-ms", b"18446744073709551615"),
              ("x-retry-origin-topic", b"elsewhere")],
             json.dumps({"marker": "in-tier"}).encode(), None)
    for seq in range(count):
        marker = f"well-{seq}"
        send(topic, marker, "data", key.encode(), None, json.dumps({"marker": marker, "seq": seq}).encode(), None, seq)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "produce":
        produce(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        sys.exit(__doc__)
