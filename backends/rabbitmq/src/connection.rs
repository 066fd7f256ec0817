//! Opening connections, with bounded retries and a jittered backoff; TLS through
//! rustls with the URL's `tls_*` settings; refusals that retrying cannot fix (a wrong
//! password, a certificate that does not check out) fail at once, typed.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use switchyard_core::backend::Backoff;
use switchyard_core::{Error, Result};
use tokio::time::Instant;

use crate::config::RabbitConfig;
use crate::error::soft_code;
use crate::tls::{self, TlsRefused};
use crate::BACKEND;

/// The broker refused the user name and password (or the mechanism): AMQP's
/// ACCESS_REFUSED at login. Carried as the source of a permanent [`Error::Backend`], so
/// callers can downcast to it. Nothing secret is in it: the broker's text names the
/// mechanism, never the password.
#[derive(Debug)]
pub struct AuthRefused {
    /// The URL connected to, password hidden.
    pub url: String,
    /// The broker's explanation.
    pub detail: String,
}

impl fmt::Display for AuthRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} refused the login: wrong user name or password, or the user may not use \
             this virtual host ({}); check the URL's user:password (percent-encoded) and \
             the user's permissions",
            self.url, self.detail
        )
    }
}

impl std::error::Error for AuthRefused {}

/// Opens a connection named `role` (visible in the management UI and `rabbitmqctl
/// list_connections`). lapin's own auto-recovery stays off: we rebuild topology and
/// consumers ourselves, so we know which deliveries died with the old channels.
pub(crate) async fn connect_once(config: &RabbitConfig, role: &str) -> Result<Connection> {
    connect_within(config, role, HANDSHAKE_LIMIT).await
}

/// How long opening a connection may take: lapin has no overall handshake timeout, and
/// a broker that accepts the socket but never answers must not hang the caller.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How long closing a connection or channel waits for the broker's close-ok. A broker
/// that stops answering (a memory or disk alarm) would otherwise hold a close, and the
/// shutdown waiting on it, for ever; dropped unanswered, the socket closes anyway.
pub(crate) const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Closes `conn`, waiting at most [`CLOSE_LIMIT`] for the broker; the outcome is not
/// needed (a connection closed either way hands its unsettled messages back).
pub(crate) async fn close_connection(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_LIMIT, conn.close(200, reason.into())).await;
}

/// Closes `channel` the same way, within [`CLOSE_LIMIT`].
pub(crate) async fn close_channel(channel: &lapin::Channel, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_LIMIT, channel.close(200, reason.into())).await;
}

/// [`connect_once`], given up after `limit` when that is sooner than the usual 10 s: a
/// caller with a deadline of its own then gets an error naming the handshake that did
/// not finish, not only its own wait.
pub(crate) async fn connect_within(
    config: &RabbitConfig,
    role: &str,
    limit: Duration,
) -> Result<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{} {role}", config.connection_name).into());
    let after = limit.min(HANDSHAKE_LIMIT);
    let tls_failure = Arc::new(parking_lot::Mutex::new(None));
    // Read before connecting: a certificate file gone since startup is a settings
    // error, not a connection one.
    let client = match config.is_tls() {
        true => Some(config.tls.client_config()?),
        false => None,
    };
    let attempt = async {
        match client {
            Some(client) => connect_tls(config, client, props, tls_failure.clone()).await,
            None => Connection::connect(&config.amqp_url, props).await,
        }
    };
    match tokio::time::timeout(after, attempt).await {
        Err(_) => Err(Error::Timeout {
            after,
            what: format!("the AMQP handshake with {}", config.redacted_url),
        }),
        Ok(Ok(c)) => {
            // A broker configured with a smaller frame than the codec allows for.
            let negotiated = c.configuration().frame_max();
            if let Err(e) =
                crate::config::check_frame_max(negotiated, "frame_max (negotiated with the broker)")
            {
                close_connection(&c, "frame_max too small").await;
                return Err(e);
            }
            Ok(c)
        }
        Ok(Err(e)) => Err(connect_error(config, e, tls_failure.lock().take())),
    }
}

/// Classifies a failed connection: a refused login or certificate is permanent (the
/// same settings get the same answer), anything else transient.
fn connect_error(config: &RabbitConfig, e: lapin::Error, tls: Option<TlsRefused>) -> Error {
    if let Some(refused) = tls.or_else(|| tls_alert(config, &e)) {
        return tls::refused(refused);
    }
    // 403 ACCESS_REFUSED at login (RabbitMQ closes the connection with it, as the
    // client asked through the authentication_failure_close capability).
    if soft_code(&e) == Some(403) {
        return Error::permanent(
            BACKEND,
            AuthRefused {
                url: config.redacted_url.clone(),
                detail: e.to_string(),
            },
        );
    }
    Error::transient(
        BACKEND,
        format!("connecting to {}: {e}", config.redacted_url),
    )
}

/// A TLS alert that reached lapin after the handshake: under TLS 1.3 a server that
/// wants a client certificate says so only after the client finished its side.
fn tls_alert(config: &RabbitConfig, e: &lapin::Error) -> Option<TlsRefused> {
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return None;
    };
    tls::classify(io, config.tls_server_name())
}

/// The TLS path: lapin's connector with our own rustls configuration (lapin's own
/// TLS adds a CA to the system's roots and checks the URL's host only). The
/// handshake's typed failure goes to `failure`, since lapin keeps only its text.
async fn connect_tls(
    config: &RabbitConfig,
    client: Arc<rustls::ClientConfig>,
    props: ConnectionProperties,
    failure: Arc<parking_lot::Mutex<Option<TlsRefused>>>,
) -> lapin::Result<Connection> {
    let uri: AMQPUri = config
        .amqp_url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::other(e)))?;
    let connector = RustlsConnector::from(client);
    let name = config.tls_server_name().to_string();
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri
                .authority
                .host
                .trim_start_matches('[')
                .trim_end_matches(']');
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, uri.authority.port))
                .await?
                .collect();
            let plain = AsyncTcpStream::connect(&runtime, addrs).await?;
            plain.into_rustls(&connector, &name).await.map_err(|e| {
                if let Some(refused) = tls::classify(&e, &name) {
                    *failure.lock() = Some(refused);
                }
                lapin::Error::from(e)
            })
        },
        props,
    )
    .await
}

/// The pauses between connection attempts: 50 ms doubling to 1 s, jittered, so clients
/// cut off together do not come back in lockstep.
pub(crate) const RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1));

/// Connects, retrying with [`RECONNECT`] for about 3 s, so a broker that is restarting
/// or a connection that was just closed does not fail the caller at once. A permanent
/// refusal (login, certificate, settings) is returned at once: retrying it would only
/// repeat it, and fill the log.
pub(crate) async fn connect_with_retry(config: &RabbitConfig, role: &str) -> Result<Connection> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut failures = 0;
    loop {
        let err = match connect_once(config, role).await {
            Ok(c) => return Ok(c),
            Err(e) if !e.is_transient() => return Err(e),
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
