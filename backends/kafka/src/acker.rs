//! Settling a delivery: ack, nack and the synchronous commit of `commit=sync`.

use std::collections::HashSet;
use std::sync::Arc;

use futures::future::BoxFuture;
use switchyard_core::backend::Acker;
use switchyard_core::{Error, Nack, Result};

use crate::broker::BACKEND;
use crate::config::CommitStrategy;
use crate::subscription::Shared;

/// The ack handle of one delivery: where it came from, under which assignment.
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
    pub(crate) async fn commit_sync(self: &Arc<Self>, partition: i32) -> Result<()> {
        let _serial = self.sync_commit.lock().await;
        let Some(consumer) = self.consumer.lock().clone() else {
            return Ok(()); // the member is gone: its next owner commits
        };
        let shared = self.clone();
        // A synchronous commit blocks on a broker round trip.
        tokio::task::spawn_blocking(move || {
            let only: HashSet<i32> = [partition].into();
            shared.commit(&consumer, Some(&only))
        })
        .await
        .map_err(|e| Error::permanent(BACKEND, e.to_string()))?
    }
}
