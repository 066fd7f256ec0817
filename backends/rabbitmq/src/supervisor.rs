//! The member's supervisor task: owns its connection, reconnects after a loss, and
//! claims, drains and releases partitions so each member holds its fair share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use switchyard_core::backend::Backoff;
use switchyard_core::{Error, Result};

use crate::config::RabbitConfig;
use crate::connection::connect_once;
use crate::error::{map_err, soft_code};
use crate::gate::Gate;
use crate::prefetch::prefetch_shares;
use crate::pump::pump;
use crate::subscription::{Part, Shared};
use crate::topology::{declare_group, GroupNames};

/// How long a delivery may stay unsettled before the member warns that RabbitMQ's
/// consumer ack timeout (30 min by default) is near.
const ACK_TIMEOUT_WARNING: Duration = Duration::from_secs(25 * 60);

/// The pauses between a member's attempts to reconnect and rejoin its group: 100 ms
/// doubling to 5 s, jittered so the members of a group do not all come back at once.
const REJOIN: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// How long a partition being handed over may wait for a requeued message to come back
/// and be handled before it is released anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Owns the member's connection; claims, drains and releases partitions.
pub(crate) struct Supervisor {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Arc<RabbitConfig>,
    pub(crate) names: GroupNames,
    pub(crate) conn: Option<Connection>,
    /// Membership consumer, member and partition-consumer counting.
    pub(crate) control: Option<Channel>,
    pub(crate) membership: Option<Consumer>,
    /// Where this member starts looking for free partitions, so members do not all
    /// race for partition 0.
    pub(crate) first_look: u32,
    /// The `x-expires` of an ephemeral group's queues.
    pub(crate) expires: Option<Duration>,
}

impl Supervisor {
    fn healthy(&self) -> bool {
        match (&self.conn, &self.control) {
            (Some(c), Some(ch)) => c.status().connected() && ch.status().connected(),
            _ => false,
        }
    }

    pub(crate) async fn connect(&mut self) -> Result<()> {
        let role = format!("{} {}", self.shared.topic, self.shared.group);
        let conn = connect_once(&self.config, &role).await?;
        let setup = async {
            declare_group(
                &conn,
                &self.names,
                self.config.partitions,
                self.config.dead_letter_exchange.as_deref(),
                self.expires,
            )
            .await?;
            let control = conn
                .create_channel()
                .await
                .map_err(|e| map_err("opening a channel", e))?;
            // Being a consumer of the membership queue is what makes this member count.
            let membership = control
                .basic_consume(
                    self.names.members().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| map_err("joining the group", e))?;
            Ok::<_, Error>((control, membership))
        }
        .await;
        match setup {
            Ok((control, membership)) => {
                self.conn = Some(conn);
                self.control = Some(control);
                self.membership = Some(membership);
                Ok(())
            }
            Err(e) => {
                crate::connection::close_connection(&conn, "setup failed").await;
                Err(e)
            }
        }
    }

    /// Forgets every partition (their channels died with the connection; their
    /// messages go back to the queues) and the connection itself.
    async fn drop_connection(&mut self) {
        // The connection may still be up (only the control channel failed).
        self.close_parts().await;
        self.membership = None;
        self.control = None;
        if let Some(conn) = self.conn.take() {
            crate::connection::close_connection(&conn, "reconnecting").await;
        }
    }

    pub(crate) async fn run(mut self) {
        let _ended = SupervisorEnded(self.shared.clone());
        let mut failures = 0;
        let stop = self.shared.stop.clone();
        loop {
            if stop.is_cancelled() {
                break;
            }
            if !self.healthy() {
                self.drop_connection().await;
                tracing::warn!(
                    topic = %self.shared.topic,
                    group = %self.shared.group,
                    "connection lost; reconnecting"
                );
                match self.connect().await {
                    Ok(()) => {
                        failures = 0;
                        tracing::info!(topic = %self.shared.topic, group = %self.shared.group, "reconnected");
                    }
                    Err(e) if e.is_transient() => {
                        failures += 1;
                        let pause = REJOIN.pause(failures);
                        tracing::warn!(error = %e, ?pause, "reconnect failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot rejoin the group");
                        self.shared.state.lock().fatal = Some(e);
                        self.shared.wake.notify_waiters();
                        break;
                    }
                }
            }
            if let Err(e) = self.rebalance().await {
                tracing::debug!(error = %e, "rebalance step failed");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.config.rebalance_interval) => {}
                _ = self.shared.supervisor.notified() => {}
            }
        }
        self.shutdown().await;
    }

    /// Leaves the group: closes every partition channel, then the connection.
    pub(crate) async fn shutdown(&mut self) {
        self.close_parts().await;
        if let Some(conn) = self.conn.take() {
            crate::connection::close_connection(&conn, "subscription closed").await;
        }
        self.shared.wake.notify_waiters();
    }

    /// Lets go of every partition: closes its channel, which hands its unsettled
    /// messages back to the queue and ends its consumer in one step, then stops its
    /// pump. Not basic.cancel first, nor a dropped lapin `Consumer` (which sends one): a
    /// cancelled consumer frees the queue for another member before this channel's
    /// unacked messages are back, and that member would get later messages first.
    async fn close_parts(&mut self) {
        let parts = std::mem::take(&mut self.shared.state.lock().parts);
        futures::future::join_all(parts.values().map(|part| async move {
            if part.channel.status().connected() {
                crate::connection::close_channel(&part.channel, "partition released").await;
            }
        }))
        .await;
        for (_, part) in parts {
            if let Some(pump) = part.pump {
                pump.abort();
            }
        }
    }

    /// One step: drop dead partitions, finish hand-overs, then claim or give up
    /// partitions so this member holds its fair share (`ceil(partitions / members)`).
    pub(crate) async fn rebalance(&mut self) -> Result<()> {
        let Some(control) = self.control.clone() else {
            return Ok(());
        };
        // Partitions to let go of now: lost ones, and drained ones.
        let released: Vec<(u32, Part)> = {
            let mut st = self.shared.state.lock();
            let done: Vec<u32> = st
                .parts
                .iter()
                .filter(|(_, p)| {
                    p.lost.is_some()
                        || p.draining.is_some_and(|since| {
                            (p.in_flight == 0 && p.gate.quiet()) || since.elapsed() > DRAIN_LIMIT
                        })
                })
                .map(|(n, _)| *n)
                .collect();
            done.into_iter()
                .filter_map(|n| st.parts.remove(&n).map(|p| (n, p)))
                .collect()
        };
        for (n, part) in released {
            if let Some(why) = &part.lost {
                // RabbitMQ says "delivery acknowledgement on channel N timed out".
                if why.contains("acknowledgement") && why.contains("timed out") {
                    tracing::error!(
                        partition = n,
                        "RabbitMQ closed the channel because a delivery stayed unacked past its \
                         consumer_timeout (30 min by default); its messages are redelivered. \
                         Raise consumer_timeout in rabbitmq.conf or shorten the handler"
                    );
                } else {
                    tracing::warn!(partition = n, reason = %why, "partition consumer ended");
                }
            }
            self.release(part).await;
        }
        self.watch_ack_timeout();
        let members = control
            .queue_declare(
                self.names.members().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err("counting group members", e))?
            .consumer_count()
            .max(1);
        let total = self.config.partitions;
        let share = total.div_ceil(members);
        let (owned, draining): (Vec<u32>, usize) = {
            let st = self.shared.state.lock();
            let owned = st
                .parts
                .iter()
                .filter(|(_, p)| p.draining.is_none())
                .map(|(n, _)| *n)
                .collect();
            let draining = st.parts.values().filter(|p| p.draining.is_some()).count();
            (owned, draining)
        };
        if owned.len() as u32 > share {
            // Give up the highest-numbered extras; they are released once drained.
            let extra = owned.len() - share as usize;
            let mut st = self.shared.state.lock();
            for n in owned.iter().rev().take(extra) {
                if let Some(p) = st.parts.get_mut(n) {
                    p.draining = Some(Instant::now());
                }
            }
            drop(st);
            self.shared.supervisor.notify_one();
        } else if (owned.len() as u32) < share && draining == 0 {
            let mut have = owned.len() as u32;
            for i in 0..total {
                if have >= share {
                    break;
                }
                let p = (self.first_look + i) % total;
                if self.shared.state.lock().parts.contains_key(&p) {
                    continue;
                }
                if self.claim(&control, p).await? {
                    have += 1;
                }
            }
        }
        self.apply_qos().await;
        Ok(())
    }

    /// Warns once per delivery that has been unsettled for longer than
    /// [`ACK_TIMEOUT_WARNING`]: RabbitMQ closes the channel at its `consumer_timeout`
    /// (30 min by default) and the message is handled again.
    fn watch_ack_timeout(&self) {
        let mut st = self.shared.state.lock();
        let warned = st.warned_upto;
        let late: Vec<(u64, Duration)> = st
            .handed_out
            .range(warned + 1..)
            .take_while(|(_, at)| at.elapsed() > ACK_TIMEOUT_WARNING)
            .map(|(seq, at)| (*seq, at.elapsed()))
            .collect();
        if let Some((last, _)) = late.last() {
            st.warned_upto = *last;
        }
        drop(st);
        for (_, held) in late {
            tracing::warn!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                held_secs = held.as_secs(),
                "a delivery is still unsettled; RabbitMQ closes the channel when it passes the \
                 broker's consumer_timeout (30 min by default) and the message is delivered again"
            );
        }
    }

    /// Tries to own partition `p` with an exclusive consumer: RabbitMQ lets one consumer
    /// at a time hold an exclusive subscription to a queue, and drops it with its channel
    /// or connection, so a crashed member's partitions become free at once.
    pub(crate) async fn claim(&mut self, control: &Channel, p: u32) -> Result<bool> {
        let Some(conn) = &self.conn else {
            return Ok(false);
        };
        let queue = self.names.partition(p);
        // Look first (on the control channel, where the queue surely exists), so a
        // taken partition costs no refused consume and no broker error log.
        let consumers = control
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(&format!("looking at partition queue {queue:?}"), e))?
            .consumer_count();
        if consumers > 0 {
            return Ok(false);
        }
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| map_err("opening a channel", e))?;
        // The smallest share once this one is owned too; `apply_qos` evens them out.
        let owned = self.shared.state.lock().parts.len() + 1;
        let qos = prefetch_shares(self.shared.prefetch, owned)[owned - 1];
        ch.basic_qos(qos, BasicQosOptions { global: true })
            .await
            .map_err(|e| map_err("setting the prefetch", e))?;
        let tag = format!("switchyard-p{p}");
        let consumer = match ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            // ACCESS_REFUSED: another member got there first. The broker closed `ch`.
            Err(e) if soft_code(&e) == Some(403) => return Ok(false),
            Err(e) => return Err(map_err(&format!("consuming partition queue {queue:?}"), e)),
        };
        let gen = {
            let mut st = self.shared.state.lock();
            st.next_gen += 1;
            let gen = st.next_gen;
            st.parts.insert(
                p,
                Part {
                    gen,
                    channel: ch,
                    qos,
                    gate: Gate::default(),
                    in_flight: 0,
                    draining: None,
                    lost: None,
                    pump: None,
                },
            );
            gen
        };
        let pump = tokio::spawn(pump(self.shared.clone(), p, gen, consumer));
        if let Some(part) = self.shared.state.lock().parts.get_mut(&p) {
            if part.gen == gen {
                part.pump = Some(pump);
            }
        }
        Ok(true)
    }

    /// Lets go of a partition: closing its channel returns its unsettled messages to
    /// their original places in the queue and ends the exclusive consumer, together.
    pub(crate) async fn release(&mut self, part: Part) {
        if part.channel.status().connected() {
            crate::connection::close_channel(&part.channel, "rebalancing").await;
        }
        if let Some(pump) = part.pump {
            pump.abort();
        }
    }
}

/// Fails the subscription if its supervisor panics: nobody would reconnect or claim
/// partitions any more, so the consumer must hear of it rather than wait forever.
struct SupervisorEnded(Arc<Shared>);

impl Drop for SupervisorEnded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut st = self.0.state.lock();
            if st.fatal.is_none() {
                st.fatal = Some(Error::permanent(
                    crate::BACKEND,
                    "the subscription's supervisor task panicked; no partition is read any more",
                ));
            }
            drop(st);
            self.0.wake.notify_waiters();
        }
    }
}

#[cfg(all(test, feature = "broker-tests"))]
mod handover_tests;
