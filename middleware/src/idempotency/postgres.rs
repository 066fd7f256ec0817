//! A durable idempotency store on PostgreSQL (feature `postgres`).
//!
//! Why PostgreSQL rather than Redis: marks must outlive restarts of the store itself
//! (Redis here keeps nothing on disk), and a relational store lets the handler's own
//! writes and the completed mark share one database. Each mark is one row; `begin` is a
//! single `INSERT … ON CONFLICT … DO UPDATE … WHERE expired` statement, so two consumers
//! racing for one id cannot both win.
//!
//! Connections come from a pool that replaces closed ones, so the store recovers by
//! itself after a PostgreSQL restart; until then its calls fail, and
//! [`IdempotencyLayer`](super::IdempotencyLayer) holds the deliveries and tries again.
//! Expired rows are deleted in bounded batches by a background sweep.
//!
//! TLS is asked for in the connection string: `sslmode=require` (the server's
//! certificate is then always checked, authority and host name) and `sslrootcert=<PEM
//! file>` for a private CA; see [`PostgresStore::connect`].

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use sha2::{Digest, Sha256};
use switchyard_core::{Error, Result};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

use super::{Begin, IdempotencyStore, MarkKey};

mod tls;

pub use tls::{PostgresTlsProblem, PostgresTlsRefused};

const BACKEND: &str = "postgres";

/// Keys longer than this are stored as their digest: a btree index entry holds at most
/// about 2.7 KB, and a long key stored whole would fail every time.
const MAX_KEY_BYTES: usize = 512;

/// How long a connection may take to open, to be lent, or to be checked.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool's most connections: enough for a consumer's concurrent handlers, since each
/// call holds one only for its statements.
const POOL_SIZE: usize = 16;

/// Idempotency marks in a PostgreSQL table (created if missing).
///
/// Rows past their lease or retention are deleted in the background every minute, at
/// most 1,000 per statement (see [`PostgresStore::sweep_every`]).
pub struct PostgresStore {
    pool: Pool,
    sql: Arc<Sql>,
    sweeper: Option<JoinHandle<()>>,
}

/// The store's statements, for its table.
struct Sql {
    begin: String,
    state: String,
    complete: String,
    release: String,
    sweep: String,
}

fn pg(e: tokio_postgres::Error) -> Error {
    // A certificate that does not check out will not check out next time either.
    if let Some(refused) = tls::refused(&e) {
        return Error::permanent(BACKEND, refused);
    }
    // Connection trouble may pass; SQL errors (a bad table name, permissions) will not.
    let transient = e.is_closed() || e.as_db_error().is_none();
    Error::Backend {
        backend: BACKEND,
        transient,
        source: Box::new(e),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => Error::transient(BACKEND, other),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The row key of `key`: `<group>/<id>`, or, when that is too long for the index,
/// `sha256:` and its digest in hex (which has no `/`, so no short key equals it).
fn row_key(key: MarkKey<'_>) -> String {
    let joined = key.to_string();
    if joined.len() <= MAX_KEY_BYTES {
        return joined;
    }
    let mut hashed = String::with_capacity(7 + 64);
    hashed.push_str("sha256:");
    for byte in Sha256::digest(joined.as_bytes()) {
        let _ = write!(hashed, "{byte:02x}");
    }
    hashed
}

impl PostgresStore {
    /// Connects (`postgres://user@host:port/db` or `host=… user=… dbname=…`) and creates
    /// the table `table` (default name: `switchyard_idempotency`) if it does not exist.
    ///
    /// TLS (rustls): `sslmode=require` turns it on, and the server's certificate is
    /// then checked against the system's authorities, or only those of
    /// `sslrootcert=<PEM file>`, and against the host name (libpq's `verify-full`;
    /// `verify-ca` and `verify-full` are accepted and mean the same here). The default
    /// `prefer`, and `disable`, connect without TLS. A certificate that does not check
    /// out fails with a permanent error whose source is a [`PostgresTlsRefused`].
    pub async fn connect(config: &str, table: Option<&str>) -> Result<Self> {
        let table = table.unwrap_or("switchyard_idempotency");
        if table.is_empty()
            || !table
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::config(
                "table",
                format!("{table:?}: use lower-case letters, digits and '_' only"),
            ));
        }
        let split = tls::split(config)?;
        // The string is not shown: it may hold a password.
        let mut pg_config: tokio_postgres::Config =
            split.config.parse().map_err(|e: tokio_postgres::Error| {
                // The reason is in the source: "unknown option `x`" and the like.
                let reason =
                    std::error::Error::source(&e).map_or(e.to_string(), |s| format!("{e}: {s}"));
                tls::parse_error(&reason, &split.keys)
            })?;
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A restart closes every connection: lend only open ones.
        let manager_config = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match pg_config.get_ssl_mode() {
            SslMode::Require => {
                let client = tls::client_config(split.ca_file.as_deref())?;
                Manager::from_config(pg_config, tls::MakeRustls(client), manager_config())
            }
            _ if split.ca_file.is_some() => {
                return Err(Error::config(
                    "sslrootcert",
                    "a CA file without sslmode=require would not be used: add sslmode=require",
                ))
            }
            _ => Manager::from_config(pg_config, NoTls, manager_config()),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| Error::config("postgres", e.to_string()))?;
        let client = pool.get().await.map_err(pool_error)?;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    key TEXT PRIMARY KEY,
                    state TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
                    expires_at TIMESTAMPTZ NOT NULL
                );
                CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at)"
            ))
            .await
            .map_err(pg)?;
        drop(client);
        let sql = Arc::new(Sql {
            begin: format!(
                "INSERT INTO {table} (key, state, expires_at)
                 VALUES ($1, 'in_flight', now() + $2::bigint * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE
                   SET state = 'in_flight', expires_at = EXCLUDED.expires_at
                   WHERE {table}.expires_at <= now()
                 RETURNING state"
            ),
            state: format!("SELECT state FROM {table} WHERE key = $1 AND expires_at > now()"),
            complete: format!(
                "INSERT INTO {table} (key, state, expires_at)
                 VALUES ($1, 'completed', now() + $2::bigint * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE
                   SET state = 'completed', expires_at = EXCLUDED.expires_at"
            ),
            release: format!("DELETE FROM {table} WHERE key = $1 AND state = 'in_flight'"),
            // The outer test of the expiry holds even if a row was taken over (a new
            // lease) between the two scans.
            sweep: format!(
                "DELETE FROM {table}
                 WHERE ctid IN (SELECT ctid FROM {table} WHERE expires_at <= now() LIMIT $1)
                   AND expires_at <= now()"
            ),
        });
        let store = Self {
            pool,
            sql,
            sweeper: None,
        };
        Ok(store.sweep_every(Duration::from_secs(60), 1_000))
    }

    /// Deletes expired rows every `every`, at most `batch` per statement, until none is
    /// left; replaces the default sweep (every minute, batches of 1,000). Small batches
    /// keep each statement's locks and WAL short on a large table.
    #[must_use]
    pub fn sweep_every(mut self, every: Duration, batch: u32) -> Self {
        if let Some(old) = self.sweeper.take() {
            old.abort();
        }
        let pool = self.pool.clone();
        let sql = self.sql.clone();
        let every = every.max(Duration::from_millis(1));
        let batch = batch.max(1);
        self.sweeper = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                loop {
                    match sweep_batch(&pool, &sql, batch).await {
                        Ok(n) if n >= u64::from(batch) => tokio::task::yield_now().await,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "idempotency sweep failed; trying next round");
                            break;
                        }
                    }
                }
            }
        }));
        self
    }

    /// Deletes up to `limit` expired rows now; returns how many it deleted.
    pub async fn sweep_batch(&self, limit: u32) -> Result<u64> {
        sweep_batch(&self.pool, &self.sql, limit).await
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(pool_error)
    }
}

async fn sweep_batch(pool: &Pool, sql: &Sql, limit: u32) -> Result<u64> {
    let client = pool.get().await.map_err(pool_error)?;
    let statement = client.prepare_cached(&sql.sweep).await.map_err(pg)?;
    client
        .execute(&statement, &[&i64::from(limit)])
        .await
        .map_err(pg)
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.abort();
        }
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin(&self, key: MarkKey<'_>, lease: Duration) -> Result<Begin> {
        let key = row_key(key);
        let client = self.client().await?;
        let begin = client.prepare_cached(&self.sql.begin).await.map_err(pg)?;
        let state = client.prepare_cached(&self.sql.state).await.map_err(pg)?;
        // Two rounds at most: the row can vanish (released) between the two statements.
        for _ in 0..2 {
            if client
                .query_opt(&begin, &[&key, &millis(lease)])
                .await
                .map_err(pg)?
                .is_some()
            {
                return Ok(Begin::Started);
            }
            if let Some(row) = client.query_opt(&state, &[&key]).await.map_err(pg)? {
                let state: &str = row.get(0);
                return Ok(if state == "completed" {
                    Begin::Completed
                } else {
                    Begin::InFlight
                });
            }
        }
        Ok(Begin::InFlight)
    }

    async fn complete(&self, key: MarkKey<'_>, retention: Duration) -> Result<()> {
        let key = row_key(key);
        let client = self.client().await?;
        let complete = client
            .prepare_cached(&self.sql.complete)
            .await
            .map_err(pg)?;
        client
            .execute(&complete, &[&key, &millis(retention)])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn release(&self, key: MarkKey<'_>) -> Result<()> {
        let key = row_key(key);
        let client = self.client().await?;
        let release = client.prepare_cached(&self.sql.release).await.map_err(pg)?;
        client.execute(&release, &[&key]).await.map_err(pg)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_become_a_fixed_length_digest() {
        let short = row_key(MarkKey::new("g", "0190-abc"));
        assert_eq!(short, "g/0190-abc");
        let long_id = "x".repeat(10 * 1024);
        let long = row_key(MarkKey::new("g", &long_id));
        assert_eq!(long.len(), 7 + 64);
        assert!(long.starts_with("sha256:"));
        let other_id = format!("{long_id}y");
        assert_ne!(long, row_key(MarkKey::new("g", &other_id)));
        assert_ne!(long, row_key(MarkKey::new("h", &long_id)));
    }

    #[tokio::test]
    async fn a_malformed_connection_string_shows_no_part_of_its_password() {
        for config in [
            "POSTGRES://app:S3cret@db/x",
            " postgres://app:S3cret@db/x",
            "jdbc:postgresql://app:S3cret@db/x?ssl=S3cret",
            "host=db password=S3cret horse",
            "host=db password=S3cret horse=battery",
            "host=db password=S3cret horse='battery",
            "postgres://app@db/x?password=S3cret&horse=battery",
        ] {
            let Err(err) = PostgresStore::connect(config, None).await else {
                panic!("{config} was taken");
            };
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains("S3cret") && !shown.contains("horse"),
                "{config}: {shown}"
            );
        }
        let Err(err) = PostgresStore::connect("host=db sslmod=require", None).await else {
            panic!("an unknown setting was taken");
        };
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "sslmod"),
            "a setting's name is still shown: {err}"
        );
    }
}
