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

/// The ids in `replayed <id>` lines or JSON lines, sorted: keyless messages on
/// RabbitMQ spread over a group's partition queues, so they come in no fixed order.
fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn ids_of(json_lines: &str) -> Vec<String> {
    json_lines
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn dlq_list_and_replay_by_id_and_all_reach_the_failing_group_only() {
    let topic = topic("dlq");
    let dlq = format!("{topic}.dlq");
    let (failing, other) = ("payment", "audit");
    let _cleanup = (
        RabbitCleanup {
            topic: topic.clone(),
            groups: vec![failing.to_string(), other.to_string()],
        },
        RabbitCleanup {
            topic: dlq.clone(),
            groups: vec!["switchyard-dlq".to_string()],
        },
    );
    let url = url();
    let quick = ["--idle-secs", "1"];
    for group in [failing, other] {
        switchyard(
            &[
                "consume", "--url", &url, "--topic", &topic, "--group", group, "--count", "0",
            ],
            "",
        );
    }
    // The reading group exists before anything is dead-lettered (RabbitMQ keeps
    // messages only for groups that exist).
    let none = switchyard(
        &[
            &["dlq", "list", "--url", &url, "--topic", &topic][..],
            &quick,
        ]
        .concat(),
        "",
    );
    assert_eq!(none, "");
    let origin_topic = format!("x-dlq-original-topic={topic}");
    let origin_group = format!("x-dlq-original-group={failing}");
    let published = switchyard(
        &[
            "publish",
            "--url",
            &url,
            "--topic",
            &dlq,
            "--header",
            &origin_topic,
            "--header",
            &origin_group,
            "--header",
            "x-dlq-error-kind=permanent",
            "--header",
            "x-dlq-error=card declined",
        ],
        "one\ntwo\nthree\n",
    );
    let ids: Vec<String> = published
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{published}");

    let listed = switchyard(
        &[
            &["dlq", "list", "--url", &url, "--topic", &topic][..],
            &quick,
        ]
        .concat(),
        "",
    );
    assert_eq!(sorted(ids_of(&listed)), sorted(ids.clone()), "{listed}");
    let first: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(first["original_group"], failing, "{listed}");
    assert_eq!(first["kind"], "permanent", "{listed}");

    let by_id = switchyard(
        &[
            &[
                "dlq", "replay", "--url", &url, "--topic", &topic, "--id", &ids[1],
            ][..],
            &quick,
        ]
        .concat(),
        "",
    );
    assert_eq!(by_id.trim(), format!("replayed {}", ids[1]));
    let listed = switchyard(
        &[
            &["dlq", "list", "--url", &url, "--topic", &topic][..],
            &quick,
        ]
        .concat(),
        "",
    );
    let left = sorted(vec![ids[0].clone(), ids[2].clone()]);
    assert_eq!(sorted(ids_of(&listed)), left, "{listed}");
    let all = switchyard(
        &[
            &["dlq", "replay", "--url", &url, "--topic", &topic, "--all"][..],
            &quick,
        ]
        .concat(),
        "",
    );
    let replayed = all
        .lines()
        .map(|l| l.trim_start_matches("replayed ").to_string());
    assert_eq!(
        sorted(replayed.collect()),
        left,
        "the letter replayed by id is not replayed again: {all}"
    );

    // Each letter reached the failing group once; the other group got none.
    let back = switchyard(
        &[
            &[
                "consume", "--url", &url, "--topic", &topic, "--group", failing,
            ][..],
            &quick,
        ]
        .concat(),
        "",
    );
    assert_eq!(sorted(ids_of(&back)), sorted(ids), "{back}");
    let elsewhere = switchyard(
        &[
            &[
                "consume", "--url", &url, "--topic", &topic, "--group", other,
            ][..],
            &quick,
        ]
        .concat(),
        "",
    );
    assert_eq!(elsewhere, "", "replay is for the failing group only");
}

#[test]
fn consume_killed_mid_stream_loses_nothing() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;

    let topic = topic("kill");
    let group = "piped";
    let _cleanup = RabbitCleanup {
        topic: topic.clone(),
        groups: vec![group.to_string()],
    };
    let url = url();
    let consume = [
        "consume",
        "--url",
        &url,
        "--topic",
        &topic,
        "--group",
        group,
        "--idle-secs",
        "3",
    ];
    switchyard(&[&consume[..], &["--count", "0"]].concat(), "");
    // More output than a pipe buffers, so the consumer is mid-stream, blocked on its
    // reader, when it is killed.
    let pad = "x".repeat(200);
    let lines: String = (0..1000).map(|i| format!("m{i}-{pad}\n")).collect();
    let published = switchyard(&["publish", "--url", &url, "--topic", &topic], &lines);
    let sent: std::collections::HashSet<String> = published
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(sent.len(), 1000);

    let mut cmd = common::switchyard();
    cmd.args(consume)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut killed_run = String::new();
    for _ in 0..100 {
        assert!(
            out.read_line(&mut killed_run).unwrap() > 0,
            "the consumer stopped early"
        );
    }
    child.kill().unwrap(); // SIGKILL: no chance to flush or settle anything
    child.wait().unwrap();
    out.read_to_string(&mut killed_run).unwrap();
    let first = ids_of(&killed_run);
    assert!(first.len() < 1000, "killed after all {} lines", first.len());

    let next_run = switchyard(&consume, "");
    let mut seen: std::collections::HashSet<String> = first.into_iter().collect();
    seen.extend(ids_of(&next_run));
    let lost: Vec<&String> = sent.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "{} messages acked by the killed consumer never reached its reader: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
