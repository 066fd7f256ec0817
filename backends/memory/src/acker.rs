//! Settling: acks through the member's queue, nacks and returns under the topic's lock.

use std::sync::Arc;

use futures::future::BoxFuture;
use switchyard_core::backend::{settled, Acker};
use switchyard_core::{Error, Nack, Result};

use crate::group::Settled;
use crate::subscription::MemberLink;
use crate::topic::group_of;

/// Settles one delivery.
pub(crate) struct MemoryAcker {
    pub(crate) link: Arc<MemberLink>,
    pub(crate) offset: u64,
}

impl MemoryAcker {
    /// Settles under the topic's lock: nacks, and returns of dropped deliveries.
    fn settle(&self, nack: Option<Nack>) -> Result<()> {
        let link = &self.link;
        let outcome = {
            let mut state = link.topic.state.lock();
            match group_of(&mut state.groups, &link.group_name) {
                Some(group) => group.settle(link.member, self.offset, nack),
                // An ephemeral group dropped with its last member.
                None => Settled::MemberGone,
            }
        };
        match outcome {
            Settled::Done => {
                link.topic.wake_consumers();
                Ok(())
            }
            Settled::MemberGone => Err(self.gone()),
        }
    }

    /// Acks by recording the offset in the member's queue; the group applies it before
    /// it next hands anything out (see [`AckQueue`](crate::group::AckQueue)).
    fn ack_now(&self) -> Result<()> {
        if self.link.acks.push(self.offset) {
            // Someone may be waiting for room in the prefetch window or for this key.
            self.link.topic.wake_consumers();
            Ok(())
        } else {
            Err(self.gone())
        }
    }

    fn gone(&self) -> Error {
        Error::SubscriptionClosed {
            id: format!("{}@{}", self.link.topic.name, self.offset),
        }
    }

    fn settle_later(&self, nack: Option<Nack>) -> BoxFuture<'_, Result<()>> {
        let settle = move || match nack {
            None => self.ack_now(),
            Some(_) => self.settle(nack),
        };
        match self.link.faults.ack_delay() {
            None => settled(settle()),
            Some(delay) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                settle()
            }),
        }
    }
}

impl Acker for MemoryAcker {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        self.settle_later(None)
    }

    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        self.settle_later(Some(action))
    }

    fn dropped_unsettled(&self) {
        let _ = self.settle(Some(Nack::Requeue));
    }
}
