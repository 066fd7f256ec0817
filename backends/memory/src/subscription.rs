//! Subscribing: joining a group, taking deliveries within the prefetch window, and
//! leaving (by close, by drop, or by fault injection).

use std::sync::Arc;

use async_trait::async_trait;
use switchyard_core::{
    Delivery, Error, Origin, Result, StartFrom, SubscribeOptions, Subscriber, Subscription,
};

use crate::acker::MemoryAcker;
use crate::faults::FaultState;
use crate::group::{AckQueue, Entry, Group};
use crate::topic::{group_of, Topic, Waiting};
use crate::MemoryBroker;

#[async_trait]
impl Subscriber for MemoryBroker {
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        options.validate()?;
        let topic = self.topic(&options.topic)?;
        let group = {
            let mut state = topic.state.lock();
            let idx = match state.groups.iter().position(|(n, _)| **n == *options.group) {
                Some(i) if state.groups[i].1.ephemeral != options.ephemeral => {
                    return Err(Error::config(
                        "ephemeral",
                        format!(
                            "group {:?} of topic {:?} is {}; all its members must agree",
                            options.group,
                            options.topic,
                            if state.groups[i].1.ephemeral {
                                "ephemeral"
                            } else {
                                "not ephemeral"
                            }
                        ),
                    ));
                }
                Some(i) => i,
                None => {
                    let start = match options.start {
                        StartFrom::Latest => state.end(),
                        _ => state.base,
                    };
                    let mut group = Group::new(start);
                    group.ephemeral = options.ephemeral;
                    state.groups.push((options.group.as_str().into(), group));
                    state.groups.len() - 1
                }
            };
            let (member, acks) = state.groups[idx].1.join();
            (state.groups[idx].0.clone(), member, acks)
        };
        let (group_name, member, acks) = group;
        Ok(Box::new(MemorySubscription {
            link: Arc::new(MemberLink {
                topic,
                group_name,
                member,
                acks,
                faults: self.inner.faults.clone(),
            }),
            prefetch: options.prefetch,
            scratch: Vec::new(),
            closed: false,
        }))
    }
}

/// What a subscription and every ack handle it gives out share: one reference count
/// per delivery instead of one per field.
pub(crate) struct MemberLink {
    pub(crate) topic: Arc<Topic>,
    /// The group's name as the topic holds it: the same allocation, so it tells this
    /// group from a later one of the same name (an ephemeral group dropped and made
    /// again).
    pub(crate) group_name: Arc<str>,
    pub(crate) member: u64,
    pub(crate) acks: Arc<AckQueue>,
    pub(crate) faults: Arc<FaultState>,
}

/// One member of a group.
struct MemorySubscription {
    link: Arc<MemberLink>,
    prefetch: usize,
    scratch: Vec<Entry>,
    closed: bool,
}

/// What one look at the topic found.
enum Took {
    /// Entries are waiting in the scratch buffer.
    Some,
    /// Nothing to hand out now.
    Nothing,
    /// The subscription is over.
    Closed,
}

impl MemorySubscription {
    fn deliver(&self, entry: Entry) -> Delivery {
        let acker = MemoryAcker {
            link: self.link.clone(),
            offset: entry.offset,
        };
        let origin = Origin::new(
            self.link.topic.name.clone(),
            self.link.group_name.clone(),
            None,
            Some(entry.offset as i64),
        );
        Delivery::new(entry.message, entry.attempt, origin, acker)
    }

    /// Takes up to `max` deliverable entries (within the prefetch window) into `scratch`.
    fn take(&mut self, max: usize) -> Took {
        let topic = &self.link.topic;
        let mut state = topic.state.lock();
        if state.closed {
            return Took::Closed;
        }
        let state = &mut *state;
        let Some(group) = group_of(&mut state.groups, &self.link.group_name) else {
            // Dropped by fault injection, its ephemeral group with it.
            self.closed = true;
            return Took::Closed;
        };
        if !group.is_member(self.link.member) {
            // Dropped by fault injection: behave like a dead consumer's stream.
            self.closed = true;
            return Took::Closed;
        }
        group.apply_acks();
        let credit = self
            .prefetch
            .saturating_sub(group.unsettled(self.link.member));
        let before = group.next;
        group.take(
            self.link.member,
            max.min(credit),
            &state.log,
            state.base,
            &mut self.scratch,
        );
        if group.next != before {
            // Reading moved this group on, which may let publishers evict.
            topic.wake_publishers();
        }
        if self.scratch.is_empty() {
            Took::Nothing
        } else {
            Took::Some
        }
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize> {
        if self.closed {
            return Ok(0);
        }
        loop {
            // Look first without registering as a waiter (registering takes the Notify's
            // lock); register and look again only when there was nothing, so a change
            // made in between is still seen.
            let mut took = self.take(max);
            if let Took::Nothing = took {
                let topic = self.link.topic.clone();
                let changed = topic.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let _waiting = Waiting::new(&topic.consumers_waiting);
                took = self.take(max);
                if let Took::Nothing = took {
                    changed.await;
                    continue;
                }
            }
            if let Took::Closed = took {
                return Ok(0);
            }
            let n = self.scratch.len();
            let mut entries = std::mem::take(&mut self.scratch);
            buf.reserve(n);
            buf.extend(entries.drain(..).map(|e| self.deliver(e)));
            self.scratch = entries;
            return Ok(n);
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed = true;
        let topic = &self.link.topic;
        let returned = {
            let mut state = topic.state.lock();
            match group_of(&mut state.groups, &self.link.group_name) {
                Some(group) => {
                    let n = group.leave(self.link.member);
                    let returned = n > 0 || group.has_ready();
                    state.drop_expired();
                    returned
                }
                None => false,
            }
        };
        if returned {
            topic.wake_consumers();
        }
        Ok(())
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        if !self.closed {
            // Dropped without close: behave like a consumer that died, whose unsettled
            // messages go to the rest of the group.
            let topic = &self.link.topic;
            let mut state = topic.state.lock();
            if let Some(group) = group_of(&mut state.groups, &self.link.group_name) {
                group.leave(self.link.member);
                state.drop_expired();
            }
            drop(state);
            topic.wake_consumers();
        }
    }
}
