//! A durable idempotency store on PostgreSQL (feature `postgres`).
//!
//! Why PostgreSQL rather than Redis: marks must outlive restarts of the store itself
//! (Redis here keeps nothing on disk), and a relational store lets the handler's own
//! writes and the completed mark share one database — the seed's
//! `processedEventRepository` pattern. Each mark is one row; `begin` is a single
//! `INSERT … ON CONFLICT … DO UPDATE … WHERE expired` statement, so two consumers racing
//! for one id cannot both win.

use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::{Error, Result};
use tokio_postgres::{Client, NoTls, Statement};

use super::{Begin, IdempotencyStore};

const BACKEND: &str = "postgres";

/// Idempotency marks in a PostgreSQL table (created if missing).
pub struct PostgresStore {
    client: Client,
    begin: Statement,
    state: Statement,
    complete: Statement,
    abandon: Statement,
}

fn pg(e: tokio_postgres::Error) -> Error {
    // Connection trouble may pass; SQL errors (a bad table name, permissions) will not.
    let transient = e.is_closed() || e.as_db_error().is_none();
    Error::Backend {
        backend: BACKEND,
        transient,
        source: Box::new(e),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// Connects (`postgres://user@host:port/db` or `host=… user=… dbname=…`) and creates
    /// the table `table` (default name: `switchyard_idempotency`) if it does not exist.
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
        let (client, connection) = tokio_postgres::connect(config, NoTls).await.map_err(pg)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!(error = %e, "idempotency store connection ended");
            }
        });
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    key TEXT PRIMARY KEY,
                    state TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
                    expires_at TIMESTAMPTZ NOT NULL
                )"
            ))
            .await
            .map_err(pg)?;
        let begin = client
            .prepare(&format!(
                "INSERT INTO {table} (key, state, expires_at)
                 VALUES ($1, 'in_flight', now() + $2::bigint * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE
                   SET state = 'in_flight', expires_at = EXCLUDED.expires_at
                   WHERE {table}.expires_at <= now()
                 RETURNING state"
            ))
            .await
            .map_err(pg)?;
        let state = client
            .prepare(&format!(
                "SELECT state FROM {table} WHERE key = $1 AND expires_at > now()"
            ))
            .await
            .map_err(pg)?;
        let complete = client
            .prepare(&format!(
                "INSERT INTO {table} (key, state, expires_at)
                 VALUES ($1, 'completed', now() + $2::bigint * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE
                   SET state = 'completed', expires_at = EXCLUDED.expires_at"
            ))
            .await
            .map_err(pg)?;
        let abandon = client
            .prepare(&format!(
                "DELETE FROM {table} WHERE key = $1 AND state = 'in_flight'"
            ))
            .await
            .map_err(pg)?;
        Ok(Self {
            client,
            begin,
            state,
            complete,
            abandon,
        })
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin(&self, key: &str, lease: Duration) -> Result<Begin> {
        // Two rounds at most: the row can vanish (abandoned) between the two statements.
        for _ in 0..2 {
            if self
                .client
                .query_opt(&self.begin, &[&key, &millis(lease)])
                .await
                .map_err(pg)?
                .is_some()
            {
                return Ok(Begin::Started);
            }
            if let Some(row) = self
                .client
                .query_opt(&self.state, &[&key])
                .await
                .map_err(pg)?
            {
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

    async fn complete(&self, key: &str, retention: Duration) -> Result<()> {
        self.client
            .execute(&self.complete, &[&key, &millis(retention)])
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn abandon(&self, key: &str) -> Result<()> {
        self.client
            .execute(&self.abandon, &[&key])
            .await
            .map_err(pg)?;
        Ok(())
    }
}
