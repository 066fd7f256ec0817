//! The CLI's commands run in-process against the in-process `memory://` backend (a
//! separate `switchyard` process would start with an empty memory broker).

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

use clap::Parser;
use switchyard::middleware::DeadLetterLayer;
use switchyard::{
    handler_fn, CancellationToken, Consumer, Delivery, HandlerError, SubscribeOptions,
};
use switchyard_cli::{run, Cli};
use tower::ServiceBuilder;

async fn cli(args: &[&str], input: &str) -> switchyard::Result<String> {
    let mut argv = vec!["switchyard"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    run(Cli::parse_from(argv), input.as_bytes(), &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn publish_then_consume_as_json_keeps_key_headers_and_binary() {
    let url = "memory://cli-roundtrip";
    let _keep = switchyard::connect(url).await.unwrap(); // keeps the named broker alive between commands
    let published = cli(
        &[
            "publish",
            "--url",
            url,
            "--topic",
            "orders",
            "--key",
            "c-1",
            "--header",
            "source=cli",
            "--header",
            "x=a=b",
        ],
        "first\nsecond\n",
    )
    .await
    .unwrap();
    let ids: Vec<&str> = published
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        published.contains("offset=0") && published.contains("offset=1"),
        "{published}"
    );

    let out = cli(
        &[
            "consume",
            "--durable",
            "--url",
            url,
            "--topic",
            "orders",
            "--group",
            "g",
            "--count",
            "2",
        ],
        "",
    )
    .await
    .unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], ids[0]);
    assert_eq!(lines[0]["payload"], "first");
    assert_eq!(lines[1]["payload"], "second");
    assert_eq!(lines[0]["key"], "c-1");
    assert_eq!(lines[0]["headers"]["source"], "cli");
    assert_eq!(lines[0]["headers"]["x"], "a=b");
    assert_eq!(lines[0]["delivery_count"], 1);

    // Acked: the group has nothing more; --no-ack leaves messages for the next reader.
    let again = cli(
        &[
            "consume",
            "--durable",
            "--url",
            url,
            "--topic",
            "orders",
            "--group",
            "g",
            "--idle-secs",
            "0.2",
        ],
        "",
    )
    .await
    .unwrap();
    assert!(again.is_empty(), "{again}");
    let peek = cli(
        &[
            "consume",
            "--durable",
            "--url",
            url,
            "--topic",
            "orders",
            "--group",
            "h",
            "--count",
            "1",
            "--format",
            "raw",
            "--no-ack",
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(peek, "first\n");
    let still = cli(
        &[
            "consume",
            "--durable",
            "--url",
            url,
            "--topic",
            "orders",
            "--group",
            "h",
            "--count",
            "2",
            "--format",
            "raw",
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(still, "first\nsecond\n");

    let topics = cli(&["topics", "--url", url], "").await.unwrap();
    assert!(topics.contains("orders messages=2"), "{topics}");
    assert!(
        topics.contains("group=g lag=0") && topics.contains("group=h lag=0"),
        "{topics}"
    );
}

#[tokio::test]
async fn bad_arguments_are_clear_errors() {
    let err = cli(
        &[
            "publish",
            "--url",
            "memory://cli-bad",
            "--topic",
            "t",
            "--id",
            "x",
        ],
        "a\nb\n",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--id names one message"), "{err}");
    let err = cli(
        &[
            "publish",
            "--url",
            "memory://cli-bad",
            "--topic",
            "bad topic",
        ],
        "a\n",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("invalid topic name"), "{err}");
    let err = cli(&["topics", "--url", "nats://x"], "").await.unwrap_err();
    assert!(
        err.to_string().contains("unknown broker URL scheme"),
        "{err}"
    );
    assert!(
        Cli::try_parse_from(["switchyard", "publish", "--topic", "t"]).is_err()
            || std::env::var("SWITCHYARD_URL").is_ok()
    );
    assert!(Cli::try_parse_from([
        "switchyard",
        "publish",
        "--url",
        "memory://",
        "--topic",
        "t",
        "--header",
        "novalue"
    ])
    .is_err());
    assert!(
        Cli::try_parse_from([
            "switchyard",
            "dlq",
            "replay",
            "--url",
            "memory://",
            "--topic",
            "t"
        ])
        .is_err(),
        "replay needs --id or --all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_by_id() {
    let url = "memory://cli-dlq";
    let broker = switchyard::connect(url).await.unwrap();
    // A consumer whose handler rejects "bad" payloads dead-letters them.
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()))
        .service(handler_fn(|d: Delivery| async move {
            if d.payload().starts_with(b"bad") {
                return Err(HandlerError::permanent(std::io::Error::other(
                    "unknown product",
                )));
            }
            Ok(())
        }));
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("orders", "inventory"), service)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    let out = cli(
        &["publish", "--url", url, "--topic", "orders"],
        "good\nbad-1\nbad-2\n",
    )
    .await
    .unwrap();
    let ids: Vec<String> = out
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    let mut listed = String::new();
    for _ in 0..50 {
        listed = cli(
            &[
                "dlq",
                "list",
                "--url",
                url,
                "--topic",
                "orders",
                "--idle-secs",
                "0.2",
            ],
            "",
        )
        .await
        .unwrap();
        if listed.lines().count() == 2 {
            break;
        }
    }
    token.cancel();
    running.join().await.unwrap();
    let letters: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{listed}");
    assert_eq!(letters[0]["id"], ids[1]);
    assert_eq!(letters[0]["kind"], "permanent");
    assert_eq!(letters[0]["error"], "unknown product");
    assert_eq!(letters[0]["original_topic"], "orders");
    assert_eq!(letters[0]["original_group"], "inventory");

    // A memory topic cannot address its failing group alone: say so, touch nothing.
    let err = cli(
        &[
            "dlq",
            "replay",
            "--url",
            url,
            "--topic",
            "orders",
            "--id",
            &ids[2],
            "--idle-secs",
            "0.2",
        ],
        "",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, switchyard::Error::Unsupported { .. })
            && err.to_string().contains("--to-topic"),
        "{err}"
    );
    let replayed = cli(
        &[
            "dlq",
            "replay",
            "--url",
            url,
            "--topic",
            "orders",
            "--id",
            &ids[2],
            "--to-topic",
            "--idle-secs",
            "0.2",
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(replayed.trim(), format!("replayed {}", ids[2]));
    let left = cli(
        &[
            "dlq",
            "list",
            "--url",
            url,
            "--topic",
            "orders",
            "--format",
            "raw",
            "--idle-secs",
            "0.2",
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(left.lines().count(), 1, "{left}");
    assert!(
        left.starts_with(&ids[1]) && left.contains("kind=permanent"),
        "{left}"
    );
    // The replayed message is back on its topic with its id.
    let back = cli(
        &[
            "consume",
            "--durable",
            "--url",
            url,
            "--topic",
            "orders",
            "--group",
            "audit",
            "--idle-secs",
            "0.3",
        ],
        "",
    )
    .await
    .unwrap();
    assert!(back.lines().any(|l| l.contains(&ids[2])), "{back}");
    let err = cli(
        &[
            "dlq",
            "replay",
            "--url",
            url,
            "--topic",
            "orders",
            "--id",
            "nope",
            "--to-topic",
            "--idle-secs",
            "0.2",
        ],
        "",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no dead letter with id"), "{err}");
    // The replayed letter is gone for good: --all replays only the one left, once.
    let all_args = [
        "dlq",
        "replay",
        "--url",
        url,
        "--topic",
        "orders",
        "--all",
        "--to-topic",
        "--idle-secs",
        "0.2",
    ];
    let all = cli(&all_args, "").await.unwrap();
    assert_eq!(all.trim(), format!("replayed {}", ids[1]));
    assert_eq!(cli(&all_args, "").await.unwrap(), "");
    let back = cli(
        &[
            "consume",
            "--durable",
            "--url",
            url,
            "--topic",
            "orders",
            "--group",
            "audit",
            "--idle-secs",
            "0.3",
        ],
        "",
    )
    .await
    .unwrap();
    let back: Vec<String> = ids_in(back.as_bytes());
    assert_eq!(back, vec![ids[1].clone()], "each replayed once");
    let _ = Arc::strong_count(&broker);
}

/// A pipe to a reader that goes away: it takes lines only on flush, and after `lines`
/// lines every write and flush fails, dropping what was written but not flushed.
struct DyingReader {
    taken: Arc<Mutex<Vec<u8>>>,
    pending: Vec<u8>,
    lines: usize,
}

impl Write for DyingReader {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let seen = self.pending.iter().filter(|&&b| b == b'\n').count()
            + self
                .taken
                .lock()
                .unwrap()
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
        if seen >= self.lines {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.taken.lock().unwrap().append(&mut self.pending);
        Ok(())
    }
}

fn ids_in(json_lines: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(json_lines)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn consume_acks_only_what_its_reader_took() {
    let url = "memory://cli-flush";
    let _keep = switchyard::connect(url).await.unwrap();
    let payloads: String = (0..40).map(|i| format!("m{i}\n")).collect();
    let published = cli(&["publish", "--url", url, "--topic", "t"], &payloads)
        .await
        .unwrap();
    let sent: HashSet<String> = published
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(sent.len(), 40);
    let consume = [
        "switchyard",
        "consume",
        "--durable",
        "--url",
        url,
        "--topic",
        "t",
        "--group",
        "g",
        "--idle-secs",
        "0.3",
    ];
    // The reader dies after 15 lines: the consume fails, and what it acked must be
    // what the reader took.
    let taken = Arc::new(Mutex::new(Vec::new()));
    let mut dying = DyingReader {
        taken: taken.clone(),
        pending: Vec::new(),
        lines: 15,
    };
    let first = run(Cli::parse_from(consume), &b""[..], &mut dying).await;
    assert!(first.is_err(), "the broken pipe is an error");
    let mut second = Vec::new();
    run(Cli::parse_from(consume), &b""[..], &mut second)
        .await
        .unwrap();
    let mut seen: HashSet<String> = ids_in(&taken.lock().unwrap()).into_iter().collect();
    seen.extend(ids_in(&second));
    let lost: Vec<&String> = sent.difference(&seen).collect();
    assert!(lost.is_empty(), "acked but never handed on: {lost:?}");
}

#[tokio::test]
async fn consume_makes_new_groups_ephemeral_and_joins_existing_ones_as_they_are() {
    let url = "memory://cli-ephemeral";
    let _broker = switchyard::connect(url).await.unwrap();
    cli(
        &["publish", "--url", url, "--topic", "t", "--key", "k"],
        "one\ntwo\n",
    )
    .await
    .unwrap();
    let consume = |group: &'static str, extra: &'static [&'static str]| async move {
        let mut args = vec![
            "consume",
            "--url",
            url,
            "--topic",
            "t",
            "--group",
            group,
            "--idle-secs",
            "0.2",
            "--format",
            "raw",
        ];
        args.extend_from_slice(extra);
        cli(&args, "").await.unwrap()
    };
    // A new group is ephemeral: gone when the command ends, so a second look starts over.
    assert_eq!(consume("look", &[]).await, "one\ntwo\n");
    assert_eq!(consume("look", &[]).await, "one\ntwo\n");
    // --durable keeps it: what was acked is not seen again.
    assert_eq!(
        consume("kept", &["--durable", "--count", "1"]).await,
        "one\n"
    );
    // An existing durable group is joined as it is, without --durable too.
    assert_eq!(consume("kept", &[]).await, "two\n");
    assert_eq!(consume("kept", &[]).await, "");
}
