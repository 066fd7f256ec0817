"""A foreign Kafka client (confluent-kafka) for switchyard's interoperability tests.

  kafka_client.py produce BOOTSTRAP TOPIC KEY [name=value ...]   < payload lines
  kafka_client.py consume BOOTSTRAP TOPIC GROUP COUNT           > one JSON object per line

Both print or read exactly what a Kafka user sees: key, headers, value.
"""
import json
import sys

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def ensure_topic(bootstrap, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=10).topics:
        return
    for future in admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)]).values():
        try:
            future.result(timeout=30)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def produce(bootstrap, topic, key, headers):
    ensure_topic(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    pairs = [tuple(h.split("=", 1)) for h in headers]
    for line in sys.stdin.read().splitlines():
        producer.produce(topic, key=key.encode(), value=line.encode(), headers=[(k, v.encode()) for k, v in pairs])
    if producer.flush(30) != 0:
        sys.exit("messages left unsent")


def consume(bootstrap, topic, group, count):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    seen = 0
    idle = 0
    while seen < count and idle < 60:
        msg = consumer.poll(1.0)
        if msg is None:
            idle += 1
            continue
        if msg.error():
            sys.exit(f"consume error: {msg.error()}")
        headers = {k: (v.decode() if v is not None else None) for k, v in (msg.headers() or [])}
        key = msg.key().decode() if msg.key() is not None else None
        print(json.dumps({"key": key, "headers": headers, "value": msg.value().decode()}), flush=True)
        consumer.commit(msg, asynchronous=False)
        seen += 1
    consumer.close()
    if seen < count:
        sys.exit(f"only {seen} of {count} messages arrived")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "produce":
        produce(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif cmd == "consume":
        consume(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(__doc__)
