//! Settling a delivery: ack, nack and the synchronous commit of `commit=sync`.

use std::collections::HashSet;
use std::sync::Arc;

use futures::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer};
use switchyard_core::{Acker, Error, Nack, Result};

use crate::broker::{kafka_error, BACKEND};
use crate::config::CommitStrategy;
use crate::subscription::Shared;

pub(crate) struct KafkaAcker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
}

impl Acker for KafkaAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.shared
                .settle(self.partition, self.offset, self.epoch, None)?;
            if self.shared.commit == CommitStrategy::Sync {
                self.shared.commit_sync(self.partition).await?;
            }
            Ok(())
        })
    }

    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.shared
                .settle(self.partition, self.offset, self.epoch, Some(action))?;
            if action == Nack::Reject && self.shared.commit == CommitStrategy::Sync {
                self.shared.commit_sync(self.partition).await?;
            }
            Ok(())
        })
    }

    fn dropped_unsettled(&self) {
        // A forgotten delivery is redelivered rather than lost.
        let _ = self
            .shared
            .settle(self.partition, self.offset, self.epoch, Some(Nack::Requeue));
    }
}

impl Shared {
    /// Settles one delivery. `Err` when its partition is no longer this member's (it
    /// was revoked or the subscription closed): the next owner redelivers it.
    pub(crate) fn settle(
        &self,
        partition: i32,
        offset: i64,
        epoch: u64,
        nack: Option<Nack>,
    ) -> Result<()> {
        let mut st = self.state();
        let Some(entry) = st.settle(partition, offset, epoch, nack) else {
            return Err(Error::SubscriptionClosed {
                id: format!("{}:{partition}:{offset}", self.topic),
            });
        };
        let revoking = !st.revoking.is_empty();
        drop(st);
        if nack == Some(Nack::Reject) {
            tracing::warn!(topic = %self.topic, group = %self.group, partition, offset, id = %entry.message.id, "message rejected; it is skipped (committed past)");
        }
        if revoking {
            self.settled.notify_all();
        }
        self.wake.notify_waiters();
        Ok(())
    }

    /// `commit=sync`: commit the partition's watermark before the ack returns.
    pub(crate) async fn commit_sync(&self, partition: i32) -> Result<()> {
        let _serial = self.sync_commit.lock().await;
        let only: HashSet<i32> = [partition].into_iter().collect();
        let offsets = self.state().to_commit(Some(&only));
        let consumer = self.consumer.lock().clone();
        let (Some(consumer), false) = (consumer, offsets.is_empty()) else {
            return Ok(());
        };
        let commit_tpl = self.offsets(&offsets);
        // A synchronous commit blocks on a broker round trip.
        let r = tokio::task::spawn_blocking(move || consumer.commit(&commit_tpl, CommitMode::Sync))
            .await
            .map_err(|e| Error::permanent(BACKEND, e.to_string()))?;
        match r {
            Ok(()) => {
                self.state().mark_committed(&offsets);
                Ok(())
            }
            Err(e) => Err(kafka_error(
                format!(
                    "committing offsets of {} for group {}",
                    self.topic, self.group
                ),
                e,
            )),
        }
    }
}
