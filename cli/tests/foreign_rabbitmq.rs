//! Interoperability with a foreign RabbitMQ client (Python pika, installed by
//! `scripts/test`): what pika publishes the way switchyard's wire format says,
//! `switchyard consume` prints with id, key and headers intact, in the key's partition;
//! what `switchyard publish` writes, pika reads from its own queue with key and headers
//! intact and the routing key it computes itself. Against the test broker
//! (`SWITCHYARD_AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f); fails, never
//! skips, when the broker or the client is missing. Each test deletes what it declared.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{amqp_url as url, rabbitmq_client as client, run, topic, RabbitCleanup as Cleanup};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn switchyard_reads_what_pika_publishes() {
    let t = topic("rin");
    let _cleanup = Cleanup {
        topic: t.clone(),
        groups: vec!["cli-reader".into()],
    };
    // The consumer subscribes first (RabbitMQ keeps messages only for groups that
    // exist); pika waits until the group has its member, then publishes.
    let consume = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "consume",
            "--url",
            &url(),
            "--topic",
            &t,
            "--group",
            "cli-reader",
            "--count",
            "3",
            "--idle-secs",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the switchyard binary");
    let mut publish = Command::new("python3");
    publish.args([
        client().as_str(),
        "publish",
        &url(),
        &t,
        "cli-reader",
        "order-9",
        "origin=python",
        "ünï=välue ✓",
    ]);
    let sent = json_lines(&run(publish, "one\ntwo\nthree ✓\n"));
    let out = consume.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "switchyard consume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = json_lines(&String::from_utf8(out.stdout).unwrap());
    let payloads: Vec<&str> = got.iter().map(|v| v["payload"].as_str().unwrap()).collect();
    assert_eq!(
        payloads,
        ["one", "two", "three ✓"],
        "one key: publish order"
    );
    for (v, s) in got.iter().zip(&sent) {
        assert_eq!(v["id"], s["id"], "the id is pika's message_id");
        assert_eq!(v["key"], "order-9");
        assert_eq!(v["headers"]["origin"], "python");
        assert_eq!(v["headers"]["ünï"], "välue ✓");
        assert_eq!(
            v["headers"].as_object().unwrap().len(),
            2,
            "no other headers: {v}"
        );
        // Partition i of 8 takes the slots whose low 3 bits are i.
        assert_eq!(
            v["partition"].as_u64().unwrap(),
            s["slot"].as_u64().unwrap() % 8,
            "the key's partition: {v}"
        );
    }
}

#[test]
fn pika_reads_what_switchyard_publishes() {
    let t = topic("rout");
    let _cleanup = Cleanup {
        topic: t.clone(),
        groups: Vec::new(),
    };
    // pika binds its own queue with "#" first (RabbitMQ keeps messages only for
    // queues bound when they are published) and says so.
    let mut reader = Command::new("python3")
        .args([client().as_str(), "consume", &url(), &t, "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be runnable");
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    let first = lines.next().expect("pika says ready").unwrap();
    assert_eq!(first, "ready");

    let mut publish = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    publish.args([
        "publish",
        "--url",
        &url(),
        "--topic",
        &t,
        "--key",
        "customer-7",
        "--header",
        "source=cli",
        "--header",
        "ünï=välue ✓",
        "--header",
        "content-type=text/plain",
    ]);
    let ids: Vec<String> = run(publish, "first\nsecond\nthird\n")
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);

    let got: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = reader.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut reader.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "pika consumer failed: {stderr}");
    let payloads: Vec<&str> = got.iter().map(|v| v["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["first", "second", "third"]);
    for (v, id) in got.iter().zip(&ids) {
        assert_eq!(v["id"], id.as_str(), "the id is the AMQP message_id");
        assert_eq!(
            v["key"], "customer-7",
            "the key is the x-switchyard-key header"
        );
        assert_eq!(v["headers"]["source"], "cli");
        assert_eq!(v["headers"]["ünï"], "välue ✓");
        assert_eq!(v["headers"]["content-type"], "text/plain");
        assert_eq!(v["content_type"], "text/plain", "also the AMQP property");
        assert_eq!(
            v["routing_key"], v["expected_routing_key"],
            "the routing key is the slot pika computes from the key"
        );
    }
}
