//! # switchyard-cli
//!
//! The `switchyard` command: publish, consume, list and replay dead letters, and list
//! topics, against any broker URL (`memory://`, `kafka://…`, `amqp://…`).
//!
//! A separate crate (like `sqlx-cli`) so the library facade never pulls in `clap`; the
//! commands live in this library so tests can run them in-process, which is the only way
//! to exercise them on the in-process `memory://` backend.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use clap::Parser;
//! let mut out = Vec::new();
//! let cli = switchyard_cli::Cli::parse_from(["switchyard", "publish", "--url", "memory://doc", "--topic", "t", "--key", "k"]);
//! switchyard_cli::run(cli, &b"hello\nworld\n"[..], &mut out).await.unwrap();
//! assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2);
//! # });
//! ```
#![forbid(unsafe_code)]
// docs.rs (nightly) marks feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::time::Duration;

use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use switchyard::middleware::dead_letter::ReplayTo;
use switchyard::middleware::{DeadLetterAdmin, Selection};
use switchyard::{
    AnyBroker, Delivery, Error, FailureKind, Message, Result, StartFrom, SubscribeOptions,
};

/// Talk to message brokers through switchyard.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The broker to use.
#[derive(Debug, Args)]
pub struct Broker {
    /// Broker URL: memory://, kafka://host:9092, amqp://user:pass@host:5672/%2f
    #[arg(long, env = "SWITCHYARD_URL", hide_env_values = true)]
    pub url: String,
}

/// Output format of messages.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line: id, key, headers, payload (or payload_base64), origin.
    Json,
    /// The payload only, one per line.
    Raw,
}

/// Where a new group starts.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum From {
    /// The oldest retained message.
    Earliest,
    /// Only messages published from now on.
    Latest,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish one message per line of stdin (or of --file); print each id and where it landed.
    Publish {
        /// The broker to talk to.
        #[command(flatten)]
        broker: Broker,
        /// Topic to publish to.
        #[arg(long)]
        topic: String,
        /// Ordering key for every message.
        #[arg(long)]
        key: Option<String>,
        /// A header, as name=value; repeat for more.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Message id (only with a single message).
        #[arg(long)]
        id: Option<String>,
        /// Read payloads from this file instead of stdin.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Print messages of a topic as one group, acking them unless --no-ack.
    Consume {
        /// The broker to talk to.
        #[command(flatten)]
        broker: Broker,
        /// Topic to read.
        #[arg(long)]
        topic: String,
        /// Group to read as.
        #[arg(long)]
        group: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop when no message arrives for this many seconds.
        #[arg(long, default_value = "10", value_parser = parse_secs)]
        idle_secs: Duration,
        /// Where a new group starts.
        #[arg(long, value_enum, default_value_t = From::Earliest)]
        from: From,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// Leave the messages unacked (they are redelivered to the group).
        #[arg(long)]
        no_ack: bool,
        /// Keep a group this command creates after it ends. Without it, a group that did
        /// not exist is made ephemeral: its broker state goes when its last member has
        /// left (RabbitMQ: its queues expire a minute later; memory: at once), so a
        /// look at a topic does not leave a queue copying every later message. An
        /// existing group is used as it is.
        #[arg(long)]
        durable: bool,
    },
    /// Dead letters of a topic (`<topic>.dlq`).
    Dlq {
        /// list or replay.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// List topics with their size and each group's lag, where the backend can tell.
    Topics {
        /// The broker to talk to.
        #[command(flatten)]
        broker: Broker,
        /// Only this topic (needed where the backend cannot list topics).
        #[arg(long)]
        topic: Option<String>,
        /// Also report this group's lag; repeat for more (Kafka cannot list groups).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

/// Dead-letter actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Show dead letters with their failure headers (nothing is removed).
    List {
        /// The broker to talk to.
        #[command(flatten)]
        broker: Broker,
        /// The original topic (its dead letters are in `<topic>.dlq`).
        #[arg(long)]
        topic: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// How long to wait for one more dead letter, in seconds.
        #[arg(long, default_value = "3", value_parser = parse_secs)]
        idle_secs: Duration,
    },
    /// Send dead letters back to the group that failed them (same id and key), then
    /// remove them; --to-topic republishes them to their topic for every group instead.
    Replay {
        /// The broker to talk to.
        #[command(flatten)]
        broker: Broker,
        /// The original topic (its dead letters are in `<topic>.dlq`).
        #[arg(long)]
        topic: String,
        /// Replay the dead letter with this message id; repeat for more.
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Republish to the original topic, so every group gets the message again
        /// (needed where the broker cannot address one group: Kafka, memory).
        #[arg(long)]
        to_topic: bool,
        /// How long to wait for one more dead letter, in seconds.
        #[arg(long, default_value = "3", value_parser = parse_secs)]
        idle_secs: Duration,
    },
}

/// A `--header` value as (name, value). Public for the fuzz targets in `fuzz/` only.
#[doc(hidden)]
pub fn parse_header(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

/// Seconds as a duration: a finite, non-negative number small enough to be one. Public
/// for the fuzz targets in `fuzz/` only.
#[doc(hidden)]
pub fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        format!("{s:?} is not a usable number of seconds: give a finite number from 0 up")
    })
}

fn io(e: std::io::Error) -> Error {
    Error::permanent("cli", e)
}

/// Runs a command, reading payloads from `input` and writing results to `out`, which
/// may be buffered: `consume` flushes it before it acks what it wrote, and every
/// command flushes it at the end.
pub async fn run(cli: Cli, input: impl BufRead, out: &mut impl Write) -> Result<()> {
    let done = run_command(cli, input, out).await;
    let flushed = out.flush().map_err(io);
    done.and(flushed)
}

async fn run_command(cli: Cli, input: impl BufRead, out: &mut impl Write) -> Result<()> {
    match cli.command {
        Command::Publish {
            broker,
            topic,
            key,
            headers,
            id,
            file,
        } => {
            let broker = connect(&broker).await?;
            let lines: Vec<String> = match file {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|e| {
                        Error::config("file", format!("cannot read {}: {e}", path.display()))
                    })?
                    .lines()
                    .map(str::to_string)
                    .collect(),
                None => input.lines().collect::<std::io::Result<_>>().map_err(io)?,
            };
            if id.is_some() && lines.len() != 1 {
                return Err(Error::config(
                    "id",
                    format!(
                        "--id names one message, but {} lines were given",
                        lines.len()
                    ),
                ));
            }
            for line in lines {
                let mut m = Message::new(line.into_bytes());
                m.key.clone_from(&key);
                for (k, v) in &headers {
                    m = m.with_header(k, v);
                }
                if let Some(id) = &id {
                    m = m.with_id(id);
                }
                let r = broker.publish(&topic, m).await?;
                let at = match (r.partition, r.offset) {
                    (Some(p), Some(o)) => format!(" partition={p} offset={o}"),
                    (None, Some(o)) => format!(" offset={o}"),
                    _ => String::new(),
                };
                writeln!(out, "{}{at}", r.id).map_err(io)?;
            }
            broker.close().await
        }
        Command::Consume {
            broker,
            topic,
            group,
            count,
            idle_secs,
            from,
            format,
            no_ack,
            durable,
        } => {
            let broker = connect(&broker).await?;
            let start = if from == From::Latest {
                StartFrom::Latest
            } else {
                StartFrom::Earliest
            };
            let options = SubscribeOptions::new(&topic, &group)
                .start(start)
                .prefetch(count.unwrap_or(256).clamp(1, 1024));
            let window = options.prefetch;
            let mut sub = if durable {
                broker.subscribe(options).await?
            } else {
                match broker.subscribe(options.clone().ephemeral(true)).await {
                    Ok(sub) => sub,
                    // The group exists and is durable: join it as it is.
                    Err(e) if is_ephemeral_mismatch(&e) => broker.subscribe(options).await?,
                    Err(e) => return Err(e),
                }
            };
            let mut printed = 0;
            let mut held = Vec::new();
            let mut batch = Vec::new();
            loop {
                let want = count.map_or(window, |c| c - printed).min(window);
                if want == 0 {
                    break;
                }
                match tokio::time::timeout(idle_secs, sub.recv_many(&mut batch, want)).await {
                    Err(_) | Ok(Ok(0)) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                }
                for d in &batch {
                    print_delivery(out, d, format)?;
                }
                // A line is handed on only once flushed: acking before that would lose
                // the message if this process or its reader died with it in a buffer.
                // An error here leaves the batch unacked, so it is redelivered.
                out.flush().map_err(io)?;
                printed += batch.len();
                for d in batch.drain(..) {
                    if no_ack {
                        held.push(d);
                    } else {
                        d.ack().await?;
                    }
                }
            }
            sub.close().await?;
            drop(held);
            broker.close().await
        }
        Command::Dlq {
            action:
                DlqAction::List {
                    broker,
                    topic,
                    format,
                    idle_secs,
                },
        } => {
            let broker = connect(&broker).await?;
            let letters = DeadLetterAdmin::new(broker.clone()).idle(idle_secs);
            for r in letters.list(&format!("{topic}.dlq")).await? {
                match format {
                    Format::Raw => writeln!(
                        out,
                        "{} kind={} deliveries={} failed_at={} error={}",
                        r.message.id,
                        r.kind.map_or("?", FailureKind::as_str),
                        r.deliveries,
                        r.message
                            .headers
                            .get(switchyard::middleware::dead_letter::headers::LAST_FAILURE)
                            .map_or("?", String::as_str),
                        r.error
                    )
                    .map_err(io)?,
                    Format::Json => {
                        let mut v = message_json(&r.message);
                        v["error"] = r.error.clone().into();
                        v["kind"] = r.kind.map(FailureKind::as_str).into();
                        v["deliveries"] = r.deliveries.into();
                        v["original_topic"] = r.original_topic.clone().into();
                        v["original_group"] = r.original_group.clone().into();
                        writeln!(out, "{v}").map_err(io)?;
                    }
                }
            }
            broker.close().await
        }
        Command::Dlq {
            action:
                DlqAction::Replay {
                    broker,
                    topic,
                    ids,
                    all,
                    to_topic,
                    idle_secs,
                },
        } => {
            let broker = connect(&broker).await?;
            let to = if to_topic {
                ReplayTo::Topic
            } else {
                ReplayTo::Group
            };
            let letters = DeadLetterAdmin::new(broker.clone()).idle(idle_secs).to(to);
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids.iter().cloned().collect::<HashSet<_>>())
            };
            let replayed = letters.replay(&format!("{topic}.dlq"), &selection).await;
            let done = match replayed {
                Ok(done) => done,
                Err(e) => {
                    let _ = broker.close().await;
                    return Err(e);
                }
            };
            for id in &done.replayed {
                writeln!(out, "replayed {id}").map_err(io)?;
            }
            out.flush().map_err(io)?;
            broker.close().await?;
            if let Some(e) = &done.error {
                return Err(Error::permanent(
                    "cli",
                    format!(
                        "replay stopped after {} dead letters: {e}",
                        done.replayed.len()
                    ),
                ));
            }
            if !done.unroutable.is_empty() {
                return Err(Error::config(
                    "id",
                    format!(
                        "dead letters {:?} name no valid original {} to replay to",
                        done.unroutable,
                        if to_topic { "topic" } else { "topic and group" }
                    ),
                ));
            }
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !done.replayed.contains(id))
                .collect();
            if !missing.is_empty() {
                return Err(Error::config(
                    "id",
                    format!("no dead letter with id {missing:?} in {topic}.dlq"),
                ));
            }
            Ok(())
        }
        Command::Topics {
            broker,
            topic,
            groups,
        } => {
            let broker = connect(&broker).await?;
            let listed = match broker.topics().await {
                Ok(list) => list,
                // A backend that cannot list topics can still answer for a named one.
                Err(Error::Unsupported { .. }) if topic.is_some() => Vec::new(),
                Err(e) => return Err(e),
            };
            let mut topics: Vec<switchyard::TopicInfo> = listed
                .into_iter()
                .filter(|t| topic.as_ref().is_none_or(|name| &t.name == name))
                .collect();
            if let (Some(name), true) = (&topic, topics.is_empty()) {
                topics.push(switchyard::TopicInfo::new(name.clone(), None, Vec::new()));
            }
            for t in topics {
                let size = t.messages.map_or("?".into(), |n| n.to_string());
                writeln!(out, "{} messages={size}", t.name).map_err(io)?;
                let mut shown = Vec::new();
                for g in &t.groups {
                    let lag = g.lag.map_or("?".into(), |n| n.to_string());
                    writeln!(out, "  group={} lag={lag}", g.name).map_err(io)?;
                    shown.push(g.name.clone());
                }
                for g in groups.iter().filter(|g| !shown.contains(g)) {
                    let lag = broker.lag(&t.name, g).await?;
                    writeln!(out, "  group={g} lag={lag}").map_err(io)?;
                }
            }
            broker.close().await
        }
    }
}

async fn connect(broker: &Broker) -> Result<AnyBroker> {
    switchyard::connect(&broker.url).await
}

fn message_json(m: &Message) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": m.id,
        "key": m.key,
        "headers": m.headers,
    });
    match std::str::from_utf8(&m.payload) {
        Ok(text) => v["payload"] = text.into(),
        Err(_) => {
            v["payload_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&m.payload)
                .into()
        }
    }
    v
}

/// Whether subscribing failed only because the group exists with `ephemeral` unset
/// (memory says so through the setting, RabbitMQ through its declare conflict).
fn is_ephemeral_mismatch(e: &Error) -> bool {
    match e {
        Error::Config { setting, .. } => setting == "ephemeral",
        other => other.to_string().contains("SubscribeOptions::ephemeral"),
    }
}

fn print_delivery(out: &mut impl Write, d: &Delivery, format: Format) -> Result<()> {
    match format {
        Format::Raw => {
            out.write_all(d.payload()).map_err(io)?;
            writeln!(out).map_err(io)
        }
        Format::Json => {
            let mut v = message_json(d.message());
            v["topic"] = d.topic().into();
            v["partition"] = d.origin().partition.into();
            v["offset"] = d.origin().offset.into();
            v["delivery_count"] = d.delivery_count().into();
            writeln!(out, "{v}").map_err(io)
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// `--header` takes any text: `name=value` with a name is split at the first
        /// `=`, and joins back to what was given; anything else is an error.
        #[test]
        fn any_header_argument_splits_or_is_refused(s in prop_oneof!["\\PC{0,24}", "\\PC{0,6}=\\PC{0,12}"]) {
            match parse_header(&s) {
                Ok((name, value)) => {
                    prop_assert!(!name.is_empty() && !name.contains('='));
                    prop_assert_eq!(format!("{name}={value}"), s);
                }
                Err(_) => prop_assert!(s.split_once('=').is_none_or(|(k, _)| k.is_empty())),
            }
        }

        /// Any text gives a duration or an error, never a panic.
        #[test]
        fn any_seconds_argument_parses_or_is_refused(s in prop_oneof![
            "\\PC{0,16}",
            "[ +-]?[0-9]{0,22}(\\.[0-9]{0,12})?([eE][+-]?[0-9]{1,3})?",
            "[+-]?(inf|infinity|NaN|nan)",
        ]) {
            if let Ok(d) = parse_secs(&s) {
                let secs: f64 = s.trim().parse().unwrap();
                prop_assert!(secs >= 0.0 && secs.is_finite());
                prop_assert_eq!(Ok(d), Duration::try_from_secs_f64(secs));
            }
        }

        /// Seconds written with up to millisecond precision come back exactly below
        /// 2^22 s (48 days), where an f64 still tells nanoseconds apart; above, to the
        /// nearest f64.
        #[test]
        fn written_seconds_parse_back(secs in 0..(1u32 << 22), millis in 0..1000u32) {
            let given = format!("{secs}.{millis:03}");
            prop_assert_eq!(
                parse_secs(&given),
                Ok(Duration::from_secs(u64::from(secs)) + Duration::from_millis(u64::from(millis)))
            );
        }
    }
}
