//! When a consumer settles a delivery relative to its handler: the delivery guarantee.

/// When a consumer acks a delivery: before or after its handler runs. The same switch on
/// every backend; set it with [`Consumer::guarantee`](crate::Consumer::guarantee) (or
/// [`SubscribeOptions::guarantee`](crate::SubscribeOptions::guarantee), which the backend
/// sees too).
///
/// Effectively-once is not a third mode: it is [`AtLeastOnce`](Self::AtLeastOnce) plus
/// the idempotency middleware, which makes the redelivered duplicates harmless.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Guarantee {
    /// Ack after the handler succeeded; a failure is nacked for redelivery. A crash or a
    /// kill redelivers what was unacked, so a message may be handled more than once but
    /// is never lost. The default.
    #[default]
    AtLeastOnce,
    /// Ack when the delivery is received, before the handler runs. A message is never
    /// handled twice, but one whose handler fails (or is running when the process dies)
    /// is lost: no redelivery, no retry, no dead letter. Middleware that works by
    /// redelivery (retry, dead-letter) has nothing to do under it.
    ///
    /// Per backend: RabbitMQ still acks (on receipt) rather than consuming without acks,
    /// so `prefetch` keeps bounding what a member holds; Kafka commits the offset
    /// synchronously before the handler runs (this implies `commit=sync` for the
    /// subscription); memory forgets the message on receipt.
    AtMostOnce,
}

impl Guarantee {
    /// The name used in settings and logs: `at-least-once` or `at-most-once`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AtLeastOnce => "at-least-once",
            Self::AtMostOnce => "at-most-once",
        }
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
