//! Listing dead letters and sending them back to where they came from.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use switchyard_core::backend::validate_name;
use switchyard_core::{AnyBroker, Delivery, Error, Result, SubscribeOptions, Subscription};

use super::headers;
use super::record::{DeadLetterRecord, Selection};

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Replayed {
    /// Ids sent back to their original group or topic (and removed from the
    /// dead-letter topic), in the order they were read.
    pub replayed: Vec<String>,
    /// Dead letters left in the dead-letter topic.
    pub kept: usize,
    /// Of the kept ones, those published again to the dead-letter topic so the reading
    /// group's log position could move past them (see [`DeadLetterAdmin`]).
    pub moved: usize,
    /// Ids selected but left in the dead-letter topic because the header naming where
    /// they go (`x-dlq-original-topic`, and `x-dlq-original-group` when replaying to the
    /// group) is missing or names no valid topic or group.
    pub unroutable: Vec<String>,
    /// Why the replay stopped early, if it did; the letters it had not reached are kept.
    pub error: Option<String>,
}

/// Where replayed dead letters go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayTo {
    /// To the group that failed (`x-dlq-original-group`) only: the topic's other groups
    /// handled the message already. Uses the broker's per-group redelivery
    /// ([`Broker::redeliver_after`](switchyard_core::Broker::redeliver_after) with no
    /// delay): RabbitMQ has one. A Kafka or memory topic cannot address one of its
    /// groups, so there a replay to the group is
    /// [`Error::Unsupported`](switchyard_core::Error::Unsupported); replay to the topic.
    #[default]
    Group,
    /// Republished to the original topic: every group of the topic gets it again.
    Topic,
}

/// Lists and replays dead letters through a broker.
///
/// It reads a dead-letter topic as its own group (default `switchyard-dlq`) and never
/// acks what it only lists, so listing is repeatable. On brokers without replay
/// (RabbitMQ), call [`DeadLetterAdmin::prepare`] once at start-up so that group exists before
/// the first message is dead-lettered.
///
/// A dead letter is known by its message id and the group that failed: a message that
/// failed in two groups has two dead letters, each replayed to its own group.
///
/// A replay settles every dead letter it reads, so no letter is replayed twice: the
/// selected ones are acked once their original group (or topic) has them again, and a
/// kept one that sits in a log below a settled one (Kafka, memory) is first published
/// again to the dead-letter topic, then acked. A log's group position cannot pass an
/// unsettled record, so a kept letter left behind would hold it there and the letters
/// replayed after it would be read, and replayed, again. Readers of the dead-letter
/// topic other than this group see the moved letters again.
///
/// Duplicates remain possible where a replay is cut short between two steps: a crash
/// (or a failed ack or offset commit) after a letter was sent back and before it was
/// acked leaves it in the dead-letter topic, and the next replay sends it again; a
/// crash after a kept letter was moved and before its old copy was acked leaves it
/// twice in the dead-letter topic (listing shows it once; a replay settles both).
#[derive(Clone)]
pub struct DeadLetterAdmin {
    broker: AnyBroker,
    group: String,
    idle: Duration,
    max: usize,
    to: ReplayTo,
}

/// What a replay does with one delivery of the dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Send it back, then ack it.
    Replay,
    /// Leave it unsettled: the broker keeps it.
    Keep,
    /// Publish it again to the dead-letter topic, then ack the old copy.
    Move,
    /// Another copy of the letter read earlier (index): ack it once that one is settled.
    Copy(usize),
}

impl DeadLetterAdmin {
    /// Dead letters on `broker`.
    pub fn new(broker: AnyBroker) -> Self {
        Self {
            broker,
            group: "switchyard-dlq".into(),
            idle: Duration::from_secs(2),
            max: 10_000,
            to: ReplayTo::Group,
        }
    }

    /// The group used to read dead-letter topics.
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// How long reading waits for one more dead letter before it decides it has them all.
    #[must_use]
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The most dead letters read in one call (default 10,000).
    #[must_use]
    pub fn max(mut self, max: usize) -> Self {
        self.max = max.max(1);
        self
    }

    /// Where [`Self::replay`] sends dead letters (default [`ReplayTo::Group`]).
    #[must_use]
    pub fn to(mut self, to: ReplayTo) -> Self {
        self.to = to;
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
        let mut seen = HashSet::new();
        Ok(read?
            .iter()
            .filter(|d| seen.insert(letter_key(d)))
            .map(DeadLetterRecord::from_delivery)
            .collect())
    }

    /// Sends the selected dead letters back to their original group (or topic, see
    /// [`Self::to`]) with their ids and keys, then removes them from `dlq_topic`; every
    /// other letter read stays there. Each letter is replayed once: see [`DeadLetterAdmin`]
    /// for how kept letters are settled too, and where a duplicate can still occur.
    ///
    /// It stops at the first failure to send or settle a letter, leaving the letters
    /// not reached yet in place, and reports it in [`Replayed::error`] (an `Err` if
    /// nothing was replayed).
    pub async fn replay(&self, dlq_topic: &str, selection: &Selection) -> Result<Replayed> {
        if self.to == ReplayTo::Group && !self.broker.capabilities().delayed_delivery {
            return Err(self.group_unsupported());
        }
        let mut sub = self.subscribe(dlq_topic).await?;
        let read = match self.read_all(&mut sub).await {
            Ok(r) => r,
            Err(e) => {
                let _ = sub.close().await;
                return Err(e);
            }
        };
        let records: Vec<DeadLetterRecord> =
            read.iter().map(DeadLetterRecord::from_delivery).collect();
        let plan = self.plan(&read, &records, selection);
        let mut outcome = Replayed::default();
        let mut settled = vec![false; read.len()];
        let mut first_error = None;
        for (i, (delivery, record)) in read.iter().zip(&records).enumerate() {
            let step = match plan[i] {
                Plan::Keep => continue,
                Plan::Copy(first) if !settled[first] => continue,
                Plan::Copy(_) => delivery.ack().await,
                Plan::Move => self.move_forward(dlq_topic, delivery).await,
                Plan::Replay => self.send_back(record).await,
            };
            // Ack only after the letter is safe elsewhere: a crash in between leaves a
            // duplicate, never a loss.
            let step = match (step, plan[i]) {
                (Ok(()), Plan::Replay | Plan::Move) => delivery.ack().await,
                (other, _) => other,
            };
            match step {
                Err(e) if matches!(plan[i], Plan::Copy(_)) => {
                    // The same record handed out twice may refuse a second ack; the
                    // letter itself is settled already.
                    tracing::debug!(id = %record.message.id, error = %e, "acking a second copy failed");
                }
                Ok(()) => {
                    settled[i] = true;
                    match plan[i] {
                        Plan::Replay => outcome.replayed.push(record.message.id.clone()),
                        Plan::Move => outcome.moved += 1,
                        _ => {}
                    }
                }
                Err(e) => {
                    // Later letters of the same log sit above this unsettled one: replaying
                    // them now would have them read, and replayed, again.
                    tracing::warn!(id = %record.message.id, error = %e, "replay stopped");
                    first_error = Some(e);
                    break;
                }
            }
        }
        let close = sub.close().await;
        drop(read);
        for (i, record) in records.iter().enumerate() {
            if !settled[i] && !matches!(plan[i], Plan::Copy(_)) {
                outcome.kept += 1;
            }
            // Kept in place or moved within the dead-letter topic, it stays there.
            if matches!(plan[i], Plan::Keep | Plan::Move)
                && record.selected(selection)
                && self.target(record).is_none()
            {
                outcome.unroutable.push(record.message.id.clone());
            }
        }
        if let Err(e) = close {
            // On a log the acks take effect with the position committed at close: the
            // letters replayed may be read, and replayed, again.
            tracing::error!(error = %e, replayed = ?outcome.replayed, "closing the dead-letter reader failed");
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) if outcome.replayed.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, replayed = outcome.replayed.len(), "replay partly failed");
                outcome.error = Some(e.to_string());
                Ok(outcome)
            }
            None => Ok(outcome),
        }
    }

    fn group_unsupported(&self) -> Error {
        Error::Unsupported {
            backend: self.broker.backend(),
            what: "replaying dead letters to the failing group only (its topic cannot address one group); replay them to the whole topic instead (ReplayTo::Topic, `switchyard dlq replay --to-topic`)".into(),
        }
    }

    /// Where a record goes: (topic, group), the group only when replaying to it.
    fn target<'a>(&self, record: &'a DeadLetterRecord) -> Option<(&'a str, Option<&'a str>)> {
        // Names another client wrote: one the broker would refuse is no target, so
        // the letter is kept and reported rather than stopping the replay.
        let topic = record.original_topic.as_deref()?;
        validate_name("topic", topic).ok()?;
        match self.to {
            ReplayTo::Topic => Some((topic, None)),
            ReplayTo::Group => {
                let group = record.original_group.as_deref()?;
                validate_name("group", group).ok()?;
                Some((topic, Some(group)))
            }
        }
    }

    /// Decides each delivery's fate before anything is sent, so the letters kept below a
    /// settled one in the same log are known.
    fn plan(
        &self,
        read: &[Delivery],
        records: &[DeadLetterRecord],
        selection: &Selection,
    ) -> Vec<Plan> {
        let mut first: HashMap<(String, Option<String>), usize> = HashMap::new();
        let mut plan: Vec<Plan> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key = (r.message.id.clone(), r.original_group.clone());
                if let Some(&at) = first.get(&key) {
                    return Plan::Copy(at);
                }
                first.insert(key, i);
                if r.selected(selection) && self.target(r).is_some() {
                    Plan::Replay
                } else {
                    Plan::Keep
                }
            })
            .collect();
        // A kept letter read twice is moved, so both copies can be settled.
        for i in 0..plan.len() {
            if let Plan::Copy(at) = plan[i] {
                if plan[at] == Plan::Keep {
                    plan[at] = Plan::Move;
                }
            }
        }
        // The highest offset settled in each partition: kept letters below it are moved.
        let mut frontier: HashMap<Option<i32>, i64> = HashMap::new();
        for (d, p) in read.iter().zip(&plan) {
            if let (true, Some(offset)) = (*p != Plan::Keep, d.origin().offset) {
                let f = frontier.entry(d.origin().partition).or_insert(offset);
                *f = (*f).max(offset);
            }
        }
        for (d, p) in read.iter().zip(plan.iter_mut()) {
            let origin = d.origin();
            let below = origin
                .offset
                .zip(frontier.get(&origin.partition))
                .is_some_and(|(o, f)| o < *f);
            if *p == Plan::Keep && below {
                *p = Plan::Move;
            }
        }
        plan
    }

    async fn send_back(&self, record: &DeadLetterRecord) -> Result<()> {
        match self.target(record) {
            Some((topic, None)) => self
                .broker
                .publish(topic, record.original())
                .await
                .map(drop),
            Some((topic, Some(group))) => {
                let sent = self
                    .broker
                    .redeliver_after(topic, group, record.original(), Duration::ZERO)
                    .await;
                match sent {
                    Err(Error::Unsupported { .. }) => Err(self.group_unsupported()),
                    other => other,
                }
            }
            None => Err(Error::config("dead letter", "no original topic")),
        }
    }

    async fn move_forward(&self, dlq_topic: &str, delivery: &Delivery) -> Result<()> {
        self.broker
            .publish(dlq_topic, delivery.message().clone())
            .await
            .map(drop)
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
        // Copies of one letter (a record handed out twice across a rebalance, or a
        // letter moved by a replay that stopped before acking the old copy) are all
        // returned: the callers show one and settle all.
        if out.len() >= self.max {
            tracing::warn!(
                max = self.max,
                "more dead letters than one read takes; raise DeadLetterAdmin::max"
            );
        }
        Ok(out)
    }
}

/// What tells dead letters apart: the message id and the group that failed.
fn letter_key(d: &Delivery) -> (String, Option<String>) {
    let m = d.message();
    (
        m.id.clone(),
        m.headers.get(headers::ORIGINAL_GROUP).cloned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use switchyard_core::{Message, Publisher, SubscribeOptions, Subscriber};

    #[tokio::test]
    async fn a_letter_naming_no_valid_topic_is_kept_and_the_others_replayed() {
        let broker = Arc::new(switchyard_memory::MemoryBroker::new());
        let mut back = broker
            .subscribe(SubscribeOptions::new("t", "g"))
            .await
            .unwrap();
        let admin = DeadLetterAdmin::new(broker.clone())
            .to(ReplayTo::Topic)
            .idle(Duration::from_millis(100));
        admin.prepare("t.dlq").await.unwrap();
        let bad = Message::new("a").with_header(headers::ORIGINAL_TOPIC, "");
        let good = Message::new("b").with_header(headers::ORIGINAL_TOPIC, "t");
        for m in [&bad, &good] {
            broker.publish("t.dlq", m.clone()).await.unwrap();
        }
        let done = admin.replay("t.dlq", &Selection::All).await.unwrap();
        assert_eq!(done.replayed, std::slice::from_ref(&good.id), "{done:?}");
        assert_eq!(done.unroutable, std::slice::from_ref(&bad.id), "{done:?}");
        assert_eq!((done.kept + done.moved, done.error), (1, None));
        assert_eq!(back.recv().await.unwrap().unwrap().id(), good.id);
        let left: Vec<String> = admin
            .list("t.dlq")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.message.id)
            .collect();
        assert_eq!(left, std::slice::from_ref(&bad.id), "the bad letter stays");
    }
}
