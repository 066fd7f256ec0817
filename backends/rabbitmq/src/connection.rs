//! Opening connections, with bounded retries and a jittered backoff.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use switchyard_core::backend::Backoff;
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

/// The pauses between connection attempts: 50 ms doubling to 1 s, jittered, so clients
/// cut off together do not come back in lockstep.
pub(crate) const RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1));

/// Connects, retrying with [`RECONNECT`] for about 3 s, so a broker that is restarting
/// or a connection that was just closed does not fail the caller at once.
pub(crate) async fn connect_with_retry(config: &RabbitConfig, role: &str) -> Result<Connection> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut failures = 0;
    loop {
        let err = match connect_once(config, role).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        failures += 1;
        let pause = RECONNECT.pause(failures);
        if Instant::now() + pause >= deadline {
            return Err(err);
        }
        tokio::time::sleep(pause).await;
    }
}
