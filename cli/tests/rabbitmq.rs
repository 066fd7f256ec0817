//! The real `switchyard` binary against RabbitMQ (`SWITCHYARD_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f, with its management plugin on :15672, which
//! `scripts/test` enables): `topics` lists a topic and its group with the group's lag.
//! Fails, never skips, when the broker is unreachable; deletes what it declared (with
//! the pika helper the foreign-client tests use).

use std::io::Write;
use std::process::{Command, Stdio};

fn url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn switchyard(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the switchyard binary");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "switchyard {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Deletes the group's queues and the topic's exchange (at the end, and on a panic).
struct Cleanup(String, &'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let client = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/foreign/rabbitmq_client.py"
        );
        let _ = Command::new("python3")
            .args([client, "delete", &url(), &self.0, self.1])
            .status();
    }
}

#[test]
fn topics_shows_a_topic_and_its_group_with_lag() {
    let topic = format!(
        "sy-cli-topics-{}",
        &switchyard::new_id().replace('-', "")[20..]
    );
    let group = "lagging";
    let _cleanup = Cleanup(topic.clone(), group);
    let url = url();
    // Create the group (a consume that takes nothing), then leave 3 messages for it.
    switchyard(
        &[
            "consume", "--url", &url, "--topic", &topic, "--group", group, "--count", "0",
        ],
        "",
    );
    switchyard(
        &["publish", "--url", &url, "--topic", &topic, "--key", "k"],
        "a\nb\nc\n",
    );
    let listed = switchyard(&["topics", "--url", &url], "");
    let lines: Vec<&str> = listed.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some(topic.as_str()))
        .unwrap_or_else(|| panic!("{topic} is not listed:\n{listed}"));
    assert_eq!(lines[at], format!("{topic} messages=?"), "{listed}");
    assert_eq!(
        lines.get(at + 1).copied(),
        Some(format!("  group={group} lag=3").as_str()),
        "{listed}"
    );
}
