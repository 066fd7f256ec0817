//! Group and topic administration: moving a group's position (replay) and reading
//! partitions' watermarks and committed offsets (`topics`, `lag`).

use std::time::SystemTime;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use switchyard_core::backend::validate_name;
use switchyard_core::{Error, Result};

use crate::broker::{config_error, kafka_error, KafkaBroker, BACKEND};

/// Where [`KafkaBroker::replay`] moves a group's position.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayFrom {
    /// The oldest retained record of every partition.
    Earliest,
    /// The same offset in every partition.
    Offset(i64),
    /// Explicit `(partition, offset)` pairs; other partitions keep their position.
    Offsets(Vec<(i32, i64)>),
    /// The first record stamped at or after this time, in every partition (the end of
    /// the partition where there is none).
    Timestamp(SystemTime),
}

impl KafkaBroker {
    /// Moves `group`'s committed position on `topic`, so its next members re-read from
    /// there (replay after a bug fix, or skip ahead). Stop the group's members first: a
    /// running member would overwrite the position with its next commit (Apache Kafka
    /// refuses to reset an active group for the same reason).
    pub async fn replay(&self, topic: &str, group: &str, from: ReplayFrom) -> Result<()> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.ensure_topic(topic).await?;
        let consumer: BaseConsumer = self
            .inner
            .config
            .consumer(group, true)
            .create()
            .map_err(|e| config_error("consumer", e))?;
        let timeout = self.inner.config.publish_timeout;
        let topic = topic.to_string();
        let servers = self.servers().to_string();
        // Metadata, offset look-ups and the commit are blocking round trips.
        tokio::task::spawn_blocking(move || -> Result<()> {
            let wrap = |what: &str, e| kafka_error(format!("{what} for {topic:?} on {servers}"), e);
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| wrap("reading partitions", e))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut tpl = TopicPartitionList::new();
            match from {
                ReplayFrom::Earliest => {
                    for p in partitions {
                        let (low, _) = consumer
                            .fetch_watermarks(&topic, p, timeout)
                            .map_err(|e| wrap("reading the oldest offset", e))?;
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(low));
                    }
                }
                ReplayFrom::Offset(o) => {
                    for p in partitions {
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
                    }
                }
                ReplayFrom::Offsets(list) => {
                    for (p, o) in list {
                        let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(o));
                    }
                }
                ReplayFrom::Timestamp(t) => {
                    let mut query = TopicPartitionList::new();
                    for p in &partitions {
                        let _ = query.add_partition_offset(
                            &topic,
                            *p,
                            Offset::Offset(crate::record::millis(t)),
                        );
                    }
                    let found = consumer
                        .offsets_for_times(query, timeout)
                        .map_err(|e| wrap("looking up offsets by time", e))?;
                    for e in found.elements() {
                        let offset = match e.offset() {
                            Offset::Offset(o) => o,
                            _ => {
                                consumer
                                    .fetch_watermarks(&topic, e.partition(), timeout)
                                    .map_err(|e| wrap("reading the end offset", e))?
                                    .1
                            }
                        };
                        let _ =
                            tpl.add_partition_offset(&topic, e.partition(), Offset::Offset(offset));
                    }
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| wrap("committing the replay position", e))
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
    }

    /// Partitions of `topic` with their low and high watermarks, and `group`'s committed
    /// offsets when a group is given. Blocking round trips, run off the async threads.
    pub(crate) async fn offsets(
        &self,
        topic: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<PartitionOffsets>> {
        // A group id is needed to read committed offsets; without one, any will do.
        let consumer: BaseConsumer = self
            .inner
            .config
            .consumer(group.unwrap_or("switchyard-inspect"), true)
            .create()
            .map_err(|e| config_error("consumer", e))?;
        let timeout = self.inner.config.publish_timeout;
        let topic = topic.map(str::to_string);
        let with_group = group.is_some();
        let servers = self.servers().to_string();
        tokio::task::spawn_blocking(move || -> Result<Vec<PartitionOffsets>> {
            let wrap = |what: &str, e| kafka_error(format!("{what} on {servers}"), e);
            let metadata = consumer
                .fetch_metadata(topic.as_deref(), timeout)
                .map_err(|e| wrap("reading topic metadata", e))?;
            let mut out = Vec::new();
            let mut tpl = TopicPartitionList::new();
            for t in metadata.topics() {
                if t.name().starts_with("__") || t.partitions().is_empty() {
                    continue;
                }
                for p in t.partitions() {
                    let (low, high) = consumer
                        .fetch_watermarks(t.name(), p.id(), timeout)
                        .map_err(|e| wrap("reading watermarks", e))?;
                    out.push(PartitionOffsets {
                        topic: t.name().to_string(),
                        low,
                        high,
                        committed: None,
                    });
                    tpl.add_partition(t.name(), p.id());
                }
            }
            if with_group && tpl.count() > 0 {
                let committed = consumer
                    .committed_offsets(tpl, timeout)
                    .map_err(|e| wrap("reading committed offsets", e))?;
                for (slot, e) in out.iter_mut().zip(committed.elements()) {
                    if let Offset::Offset(o) = e.offset() {
                        slot.committed = Some(o);
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
    }
}

/// One partition's offsets, for `topics()` and `lag()`.
pub(crate) struct PartitionOffsets {
    pub(crate) topic: String,
    pub(crate) low: i64,
    pub(crate) high: i64,
    pub(crate) committed: Option<i64>,
}
