//! Interoperability with a foreign Kafka client (Python confluent-kafka, installed by
//! `scripts/test`): what `switchyard publish` writes, confluent-kafka reads with key and
//! headers intact, and what confluent-kafka writes, `switchyard consume` prints.
//! Against the test broker (`SWITCHYARD_KAFKA_URL`, default kafka://127.0.0.1:9092);
//! fails, never skips, when the broker or the client is missing.

mod common;

use std::process::Command;

use common::{run, topic};

fn url() -> String {
    std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

fn bootstrap() -> String {
    url()
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap()
        .to_string()
}

fn client() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/foreign/kafka_client.py"
    )
    .to_string()
}

#[test]
fn confluent_kafka_reads_what_switchyard_writes() {
    let t = topic("out");
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
    ]);
    let ids = run(publish, "first\nsecond\nthird\n");
    assert_eq!(ids.lines().count(), 3, "{ids}");

    let mut consume = Command::new("python3");
    consume.args([
        client().as_str(),
        "consume",
        &bootstrap(),
        &t,
        "py-reader",
        "3",
    ]);
    let got: Vec<serde_json::Value> = run(consume, "")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let values: Vec<&str> = got.iter().map(|v| v["value"].as_str().unwrap()).collect();
    assert_eq!(
        values,
        ["first", "second", "third"],
        "same key: one partition, publish order"
    );
    for v in &got {
        assert_eq!(v["key"], "customer-7");
        assert_eq!(v["headers"]["source"], "cli");
        assert_eq!(v["headers"]["ünï"], "välue ✓");
        assert!(
            v["headers"]["switchyard-id"].is_string(),
            "the id travels as a header: {v}"
        );
    }
}

#[test]
fn switchyard_reads_what_confluent_kafka_writes() {
    let t = topic("in");
    let mut produce = Command::new("python3");
    produce.args([
        client().as_str(),
        "produce",
        &bootstrap(),
        &t,
        "order-9",
        "origin=python",
        "trace=abc",
    ]);
    run(produce, "one\ntwo\n");

    let mut consume = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    consume.args([
        "consume",
        "--url",
        &url(),
        "--topic",
        &t,
        "--group",
        "cli-reader",
        "--count",
        "2",
        "--idle-secs",
        "60",
    ]);
    let got: Vec<serde_json::Value> = run(consume, "")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 2);
    let payloads: Vec<&str> = got.iter().map(|v| v["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["one", "two"]);
    for v in &got {
        assert_eq!(v["key"], "order-9");
        assert_eq!(v["headers"]["origin"], "python");
        assert_eq!(v["headers"]["trace"], "abc");
        // No switchyard id header: the id is derived from where the record sits.
        assert!(
            v["id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("kafka:{t}:")),
            "{v}"
        );
    }
}
