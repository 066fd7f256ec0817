//! Reading dead letters and sending them back to where they came from.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use switchyard_core::{AnyBroker, Delivery, Message, Result, SubscribeOptions, Subscription};

use super::headers;

/// Which dead letters to replay.
#[derive(Clone, Debug)]
pub enum Selection {
    /// Every dead letter.
    All,
    /// Those with these message ids.
    Ids(HashSet<String>),
    /// Those whose last failure lies in `[from, to)`.
    FailedBetween(SystemTime, SystemTime),
}

/// A dead letter as read back, with its failure headers parsed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetterRecord {
    /// The message as stored in the dead-letter topic (failure headers included).
    pub message: Message,
    /// The error's text.
    pub error: String,
    /// The failure kind (`transient`, `permanent`, `decode`, `panic`).
    pub kind: String,
    /// Broker deliveries before it was dead-lettered.
    pub attempts: u32,
    /// The topic to replay it to.
    pub original_topic: Option<String>,
    /// The group that failed.
    pub original_group: Option<String>,
    /// The original message key.
    pub original_key: Option<String>,
    /// The last failure.
    pub failed_at: Option<SystemTime>,
}

impl DeadLetterRecord {
    fn from_message(message: Message) -> Self {
        let get = |k: &str| message.headers.get(k).cloned();
        Self {
            error: get(headers::ERROR).unwrap_or_default(),
            kind: get(headers::ERROR_KIND).unwrap_or_default(),
            attempts: get(headers::ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            original_topic: get(headers::ORIGINAL_TOPIC),
            original_group: get(headers::ORIGINAL_GROUP),
            original_key: get(headers::ORIGINAL_KEY),
            failed_at: get(headers::LAST_FAILURE).and_then(|v| humantime::parse_rfc3339(&v).ok()),
            message,
        }
    }

    fn selected(&self, selection: &Selection) -> bool {
        match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&self.message.id),
            Selection::FailedBetween(from, to) => {
                self.failed_at.is_some_and(|t| t >= *from && t < *to)
            }
        }
    }

    /// The original message: same id, key, payload and headers, failure headers removed
    /// (the dead-letter ones and the retry tiers' `x-retry-*`, so a replay starts afresh).
    pub fn original(&self) -> Message {
        let mut m = self.message.clone();
        m.key = m.headers.get(headers::ORIGINAL_KEY).cloned();
        for h in headers::ALL {
            m.headers.remove(*h);
        }
        m.headers.retain(|k, _| !k.starts_with("x-retry-"));
        m
    }
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Replayed {
    /// Ids republished to their original topic (and removed from the dead-letter topic).
    pub replayed: Vec<String>,
    /// Dead letters left where they were.
    pub kept: usize,
}

/// Lists and replays dead letters through a broker.
///
/// It reads a dead-letter topic as its own group (default `switchyard-dlq`) and never
/// acks what it only lists, so listing is repeatable. On brokers without replay
/// (RabbitMQ), call [`DeadLetters::prepare`] once at start-up so that group exists before
/// the first message is dead-lettered.
#[derive(Clone)]
pub struct DeadLetters {
    broker: AnyBroker,
    group: String,
    idle: Duration,
    max: usize,
}

impl DeadLetters {
    /// Dead letters on `broker`.
    pub fn new(broker: AnyBroker) -> Self {
        Self {
            broker,
            group: "switchyard-dlq".into(),
            idle: Duration::from_secs(2),
            max: 10_000,
        }
    }

    /// The group used to read dead-letter topics.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// How long reading waits for one more dead letter before it decides it has them all.
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The most dead letters read in one call (default 10,000).
    pub fn max(mut self, max: usize) -> Self {
        self.max = max.max(1);
        self
    }

    /// Makes sure the reading group exists on `dlq_topic`.
    pub async fn prepare(&self, dlq_topic: &str) -> Result<()> {
        self.subscribe(dlq_topic).await?.close().await
    }

    /// Every dead letter in `dlq_topic` (up to `max`), oldest first; none is removed.
    pub async fn list(&self, dlq_topic: &str) -> Result<Vec<DeadLetterRecord>> {
        let mut sub = self.subscribe(dlq_topic).await?;
        let read = self.read_all(&mut sub).await;
        // Unsettled, so the broker keeps them for the next reader.
        sub.close().await?;
        Ok(read?
            .into_iter()
            .map(|d| DeadLetterRecord::from_message(d.message().clone()))
            .collect())
    }

    /// Republishes the selected dead letters to their original topics, keeping their
    /// ids, then removes them from `dlq_topic`. A dead letter without an original topic
    /// header is kept.
    pub async fn replay(&self, dlq_topic: &str, selection: &Selection) -> Result<Replayed> {
        let mut sub = self.subscribe(dlq_topic).await?;
        let read = match self.read_all(&mut sub).await {
            Ok(r) => r,
            Err(e) => {
                let _ = sub.close().await;
                return Err(e);
            }
        };
        let mut outcome = Replayed::default();
        let mut first_error = None;
        for delivery in &read {
            let record = DeadLetterRecord::from_message(delivery.message().clone());
            let Some(topic) = record
                .original_topic
                .clone()
                .filter(|_| record.selected(selection))
            else {
                outcome.kept += 1;
                continue;
            };
            match self.broker.publish(&topic, record.original()).await {
                // Ack only after the original topic has it again: a crash in between
                // leaves a duplicate, never a loss.
                Ok(_) => match delivery.ack().await {
                    Ok(()) => outcome.replayed.push(record.message.id.clone()),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
                Err(e) => {
                    outcome.kept += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        sub.close().await?;
        drop(read);
        match first_error {
            Some(e) if outcome.replayed.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, replayed = outcome.replayed.len(), "replay partly failed");
                Ok(outcome)
            }
            None => Ok(outcome),
        }
    }

    async fn subscribe(&self, dlq_topic: &str) -> Result<Box<dyn Subscription>> {
        let options = SubscribeOptions::new(dlq_topic, &self.group).prefetch(self.max);
        self.broker.subscribe(options).await
    }

    async fn read_all(&self, sub: &mut Box<dyn Subscription>) -> Result<Vec<Delivery>> {
        let mut out: Vec<Delivery> = Vec::new();
        let mut buf = Vec::new();
        while out.len() < self.max {
            match tokio::time::timeout(self.idle, sub.recv_many(&mut buf, self.max - out.len()))
                .await
            {
                Err(_) | Ok(Ok(0)) => break,
                Ok(Ok(_)) => out.append(&mut buf),
                Ok(Err(e)) if e.is_transient() => continue,
                Ok(Err(e)) => return Err(e),
            }
        }
        // Redeliveries of what we hold cannot happen (we hold them), but a broker may
        // hand the same record twice across a rebalance: keep the first.
        let mut seen = HashSet::new();
        out.retain(|d| seen.insert(d.id().to_string()));
        if out.len() >= self.max {
            tracing::warn!(
                max = self.max,
                "more dead letters than one read takes; raise DeadLetters::max"
            );
        }
        Ok(out)
    }
}
