//! What the poll thread told librdkafka about fetching: the back-pressure decision
//! and which partitions we paused. Pure; the poll thread and the rebalance callbacks
//! carry the decisions out.

use std::collections::HashSet;

/// What the poll thread told librdkafka about fetching.
#[derive(Default)]
pub(crate) struct Fetching {
    /// The member is back-pressured: every assigned partition must be paused.
    pub(crate) paused: bool,
    /// Partitions paused by us and not resumed since. librdkafka keeps this flag across
    /// unassign and assign, and resuming a partition that is not paused restarts its
    /// fetch from where it began (re-reading what was handed out), so we track it.
    pub(crate) app_paused: HashSet<i32>,
    /// Partitions assigned or revoked since the poll thread last looked: records it
    /// polled from them before that belong to the previous assignment.
    pub(crate) touched: HashSet<i32>,
}

impl Fetching {
    /// Decides whether the member is back-pressured: from `limit` records or
    /// `max_bytes` buffered on, until the buffer drained to half of both, so it does
    /// not flap around the limit.
    pub(crate) fn pressure(
        &mut self,
        (records, bytes): (usize, usize),
        limit: usize,
        max_bytes: usize,
    ) -> bool {
        self.paused = if self.paused {
            records >= limit / 2 || bytes >= max_bytes / 2
        } else {
            records >= limit || bytes >= max_bytes
        };
        self.paused
    }

    /// Those of `partitions` whose pause flag differs from `paused`: the ones to pause
    /// or resume. Resuming only what we paused matters: resuming a running partition
    /// restarts its fetch.
    pub(crate) fn to_flip(&self, partitions: &[i32], paused: bool) -> Vec<i32> {
        partitions
            .iter()
            .copied()
            .filter(|p| self.app_paused.contains(p) != paused)
            .collect()
    }

    /// librdkafka paused (or resumed) these partitions.
    pub(crate) fn flipped(&mut self, partitions: &[i32], paused: bool) {
        for p in partitions {
            if paused {
                self.app_paused.insert(*p);
            } else {
                self.app_paused.remove(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_pressure_holds_until_the_buffer_drained_to_half() {
        let mut f = Fetching::default();
        assert!(!f.pressure((99, 0), 100, 1000));
        assert!(f.pressure((100, 0), 100, 1000));
        assert!(f.pressure((50, 0), 100, 1000), "not drained to half yet");
        assert!(!f.pressure((49, 499), 100, 1000));
        assert!(f.pressure((0, 1000), 100, 1000), "bytes count too");
        assert!(!f.pressure((0, 499), 100, 1000));
    }

    #[test]
    fn only_partitions_we_paused_are_resumed() {
        let mut f = Fetching::default();
        assert_eq!(f.to_flip(&[0, 1, 2], true), vec![0, 1, 2]);
        f.flipped(&[0, 1], true);
        assert_eq!(
            f.to_flip(&[0, 1, 2], true),
            vec![2],
            "a failed pause is retried"
        );
        assert_eq!(f.to_flip(&[0, 1, 2], false), vec![0, 1]);
        f.flipped(&[0], false);
        assert_eq!(f.to_flip(&[0, 1, 2], false), vec![1]);
    }
}
