"""RabbitMQ's RPC pattern in pika (tutorial 6), for switchyard's request/reply interop tests.

  pika_rpc.py server URL TOPIC QUEUE COUNT
      binds QUEUE to every slot of the direct exchange TOPIC (declaring both), prints
      "ready", answers COUNT requests, then exits. The answer to payload n is fib(n), sent
      to the request's reply_to through the default exchange with its correlation_id; a
      payload that is not a number gets an error reply (header x-reply-error).
  pika_rpc.py client URL TOPIC N
      declares a server-named exclusive callback queue, publishes N to exchange TOPIC
      (routing key "0") with reply_to = that queue and a fresh correlation_id, waits for
      the reply carrying that correlation_id and prints it as JSON (body, headers).

Nothing switchyard-specific: reply_to and correlation_id are AMQP properties, replies go
to the default exchange, the topic is a direct exchange whose routing keys are slots
"0" to "1023" (see backends/rabbitmq/src/codec.rs).
"""
import json
import sys
import time
import uuid

import pika

SLOTS = 1024


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def server(url, topic, queue, count):
    conn = connect(url)
    ch = conn.channel()
    ch.exchange_declare(exchange=topic, exchange_type="direct", durable=True)
    ch.queue_declare(queue=queue, auto_delete=True)
    for slot in range(SLOTS):
        ch.queue_bind(queue=queue, exchange=topic, routing_key=str(slot))
    print("ready", flush=True)
    answered = 0
    for method, props, body in ch.consume(queue, inactivity_timeout=60):
        if method is None:
            sys.exit("no request came for 60 s")
        try:
            reply, headers = str(fib(int(body))).encode(), None
        except ValueError:
            reply, headers = b"", {"x-reply-error": f"not a number: {body!r}"}
        ch.basic_publish(
            exchange="",
            routing_key=props.reply_to,
            properties=pika.BasicProperties(
                correlation_id=props.correlation_id, headers=headers
            ),
            body=reply,
        )
        ch.basic_ack(delivery_tag=method.delivery_tag)
        answered += 1
        if answered == count:
            break
    ch.cancel()
    conn.close()


def client(url, topic, n):
    conn = connect(url)
    ch = conn.channel()
    callback = ch.queue_declare(queue="", exclusive=True).method.queue
    correlation_id = str(uuid.uuid4())
    ch.basic_publish(
        exchange=topic,
        routing_key="0",
        properties=pika.BasicProperties(reply_to=callback, correlation_id=correlation_id),
        body=str(n).encode(),
    )
    deadline = time.time() + 60
    for method, props, body in ch.consume(callback, auto_ack=True, inactivity_timeout=1):
        if method is not None and props.correlation_id == correlation_id:
            headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in (props.headers or {}).items()}
            print(json.dumps({"body": body.decode(), "headers": headers}), flush=True)
            break
        if time.time() > deadline:
            sys.exit("no reply came for 60 s")
    ch.cancel()
    conn.close()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) == 5 and sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
