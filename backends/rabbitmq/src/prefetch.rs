//! The member's prefetch split over the channels of the partitions it owns.

use lapin::options::BasicQosOptions;
use lapin::Channel;

use crate::supervisor::Supervisor;

impl Supervisor {
    /// Splits the member's prefetch over the channels of the partitions it owns, so
    /// what the broker has delivered to it and not had settled (in its key gates or
    /// handed out) stays within `max(prefetch, partitions owned)`, not prefetch per
    /// partition. Re-applied on every rebalance step, as ownership and holdings change.
    ///
    /// `global` qos, which RabbitMQ applies per channel (shared by the channel's
    /// consumers; here one): unlike a per-consumer limit, which only a later
    /// `basic.consume` picks up, a new value takes effect on the running consumer.
    ///
    /// A channel's limit is never set below what it holds plus the requeued messages on
    /// their way back: a lower limit would keep a requeued key head from returning
    /// while its successors, held in the gate, keep the slots. Lowering recalls nothing,
    /// so after ownership grows a channel may hold its old share until those messages
    /// are settled; the next steps bring it down.
    pub(crate) async fn apply_qos(&mut self) {
        let changes: Vec<(u32, u64, Channel, u16)> = {
            let st = self.shared.state.lock();
            let shares = prefetch_shares(self.shared.prefetch, st.parts.len());
            st.parts
                .iter()
                .zip(shares)
                .filter(|((_, part), _)| part.lost.is_none())
                .filter_map(|((p, part), share)| {
                    let held = part.gate.len() + part.in_flight + part.gate.awaiting();
                    let want = share.max(clamp_qos(held));
                    (want != part.qos).then(|| (*p, part.gen, part.channel.clone(), want))
                })
                .collect()
        };
        for (p, gen, channel, qos) in changes {
            match channel
                .basic_qos(qos, BasicQosOptions { global: true })
                .await
            {
                Ok(()) => {
                    if let Some(part) = self.shared.state.lock().parts.get_mut(&p) {
                        if part.gen == gen {
                            part.qos = qos;
                        }
                    }
                }
                // The channel is going away; its pump reports it and the partition is
                // claimed again with a fresh limit.
                Err(e) => tracing::debug!(partition = p, error = %e, "setting the prefetch failed"),
            }
        }
    }
}

/// A `basic.qos` prefetch count: at least 1 (0 means unlimited), at most `u16::MAX`.
fn clamp_qos(n: usize) -> u16 {
    n.clamp(1, usize::from(u16::MAX)) as u16
}

/// `prefetch` split over `owned` channels, the remainder to the first ones: they add
/// up to `prefetch`, or to `owned` when each must have at least 1.
pub(crate) fn prefetch_shares(prefetch: usize, owned: usize) -> Vec<u16> {
    let Some(base) = prefetch.checked_div(owned) else {
        return Vec::new();
    };
    let rem = prefetch % owned;
    (0..owned)
        .map(|i| clamp_qos(base + usize::from(i < rem)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::prefetch_shares;

    #[test]
    fn shares_add_up_to_the_prefetch_with_at_least_one_each() {
        assert_eq!(prefetch_shares(12, 8), vec![2, 2, 2, 2, 1, 1, 1, 1]);
        assert_eq!(prefetch_shares(12, 4), vec![3, 3, 3, 3]);
        assert_eq!(prefetch_shares(3, 8), vec![1; 8]);
        assert_eq!(prefetch_shares(1_000_000, 2), vec![u16::MAX; 2]);
        assert!(prefetch_shares(12, 0).is_empty());
    }
}
