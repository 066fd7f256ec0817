//! The real `switchyard` binary against RabbitMQ (`SWITCHYARD_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f, with its management plugin on :15672, which
//! `scripts/test` enables): `topics` lists a topic and its group with the group's lag.
//! Fails, never skips, when the broker is unreachable; deletes what it declared (with
//! the pika helper the foreign-client tests use).

mod common;

use common::{amqp_url as url, run, topic, RabbitCleanup};

/// Runs the `switchyard` binary with `args` and `stdin`; its standard output.
fn switchyard(args: &[&str], stdin: &str) -> String {
    let mut cmd = common::switchyard();
    cmd.args(args);
    run(cmd, stdin)
}

#[test]
fn topics_shows_a_topic_and_its_group_with_lag() {
    let topic = topic("topics");
    let group = "lagging";
    let _cleanup = RabbitCleanup {
        topic: topic.clone(),
        groups: vec![group.to_string()],
    };
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
