//! Opening connections, with bounded retries and a jittered backoff.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use switchyard_core::{Error, Result};
use tokio::time::Instant;

use crate::config::RabbitConfig;
use crate::BACKEND;

/// Opens a connection named `role` (visible in the management UI and `rabbitmqctl
/// list_connections`). lapin's own auto-recovery stays off: we rebuild topology and
/// consumers ourselves, so we know which deliveries died with the old channels.
pub(crate) async fn connect_once(config: &RabbitConfig, role: &str) -> Result<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{} {role}", config.connection_name).into());
    // lapin has no overall handshake timeout; a broker that accepts the socket but
    // never answers must not hang the caller.
    let after = Duration::from_secs(10);
    match tokio::time::timeout(after, Connection::connect(&config.amqp_url, props)).await {
        Err(_) => Err(Error::Timeout {
            after,
            what: format!("the AMQP handshake with {}", config.redacted_url),
        }),
        Ok(r) => r.map_err(|e| {
            Error::transient(
                BACKEND,
                format!("connecting to {}: {e}", config.redacted_url),
            )
        }),
    }
}

/// Connects, retrying with [`Backoff`] for about 3 s, so a broker that is restarting or
/// a connection that was just closed does not fail the caller at once.
pub(crate) async fn connect_with_retry(config: &RabbitConfig, role: &str) -> Result<Connection> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut backoff = Backoff::new();
    loop {
        let err = match connect_once(config, role).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let pause = backoff.next_pause();
        if Instant::now() + pause >= deadline {
            return Err(err);
        }
        tokio::time::sleep(pause).await;
    }
}

/// Pauses between reconnect attempts: doubling from 50 ms up to 1 s, each drawn at
/// random from its upper half, so clients cut off together do not come back in
/// lockstep.
pub(crate) struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            ceiling: Duration::from_millis(50),
        }
    }

    /// The pause before the next attempt.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.ceiling.mul_f64(0.5 + 0.5 * random_fraction());
        self.ceiling = (self.ceiling * 2).min(Duration::from_secs(1));
        pause
    }
}

/// A number in [0, 1): jitter needs no quality, and every `RandomState` hashes with new
/// keys, so hashing nothing with one gives fresh bits without a dependency.
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_with_jitter() {
        let mut b = Backoff::new();
        let pauses: Vec<Duration> = (0..8).map(|_| b.next_pause()).collect();
        let ceilings = [50, 100, 200, 400, 800, 1000, 1000, 1000];
        for (pause, ms) in pauses.iter().zip(ceilings) {
            let ceiling = Duration::from_millis(ms);
            assert!(*pause >= ceiling / 2 && *pause <= ceiling, "{pauses:?}");
        }
        let spread: std::collections::HashSet<Duration> =
            (0..16).map(|_| Backoff::new().next_pause()).collect();
        assert!(spread.len() > 1, "no jitter: {spread:?}");
    }
}
