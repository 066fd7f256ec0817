//! The PostgreSQL idempotency store through TLS (`sslmode=require`, `sslrootcert`),
//! against the real server (127.0.0.1:5432, user `postgres`, database `test`, no TLS of
//! its own) behind a TLS terminator run by the test (tests/tls). The terminator answers
//! PostgreSQL's SSLRequest with `S` before the handshake, as a TLS-enabled server does.
//! Fails, never skips, when the server is unreachable.

mod tls;

use std::time::Duration;

use switchyard::middleware::{
    Begin, IdempotencyStore, MarkKey, PostgresStore, PostgresTlsProblem, PostgresTlsRefused,
};
use switchyard::Error;
use tls::{Leaf, Opening, Pki, Terminator};

const UPSTREAM: &str = "127.0.0.1:5432";

fn table() -> String {
    format!("sy_tls_{}", &switchyard::new_id().replace('-', "")[20..])
}

async fn terminator(pki: &Pki, leaf: &Leaf) -> Terminator {
    Terminator::start(
        UPSTREAM,
        pki.server_config(leaf, false),
        Opening::PostgresSslRequest,
    )
    .await
}

fn config(t: &Terminator, settings: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=test {settings}",
        t.addr.port()
    )
}

/// Drops a test's table over a plain connection.
async fn drop_table(table: &str) {
    let (client, conn) = tokio_postgres::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=test",
        tokio_postgres::NoTls,
    )
    .await
    .expect("PostgreSQL must be reachable at 127.0.0.1:5432");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .unwrap();
}

fn refusal(err: &Error) -> &PostgresTlsRefused {
    match err {
        Error::Backend {
            transient: false,
            source,
            ..
        } => source
            .downcast_ref::<PostgresTlsRefused>()
            .unwrap_or_else(|| panic!("not a PostgresTlsRefused: {err}")),
        other => panic!("not a permanent backend error: {other:?}"),
    }
}

async fn refused(config: &str) -> Error {
    match PostgresStore::connect(config, Some(&table())).await {
        Ok(_) => panic!("connected, but the handshake should fail"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn the_store_keeps_its_marks_through_tls() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server).await;
    let table = table();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/test?sslmode=require&sslrootcert={}",
        t.addr.port(),
        pki.path("ca.pem")
    );
    let store = PostgresStore::connect(&url, Some(&table))
        .await
        .expect("the store connects through TLS");
    let key = MarkKey::new("g", "id-1");
    assert_eq!(
        store.begin(key, Duration::from_secs(60)).await.unwrap(),
        Begin::Started
    );
    store.complete(key, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        store.begin(key, Duration::from_secs(60)).await.unwrap(),
        Begin::Completed
    );
    drop(store);
    assert!(
        t.connections() >= 1,
        "the store went through the terminator"
    );
    drop_table(&table).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_an_unknown_issuer() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server).await;
    let err = refused(&config(
        &t,
        &format!("sslmode=require sslrootcert={}", pki.path("other-ca.pem")),
    ))
    .await;
    assert_eq!(
        refusal(&err).problem,
        PostgresTlsProblem::UnknownIssuer,
        "{err}"
    );
    assert!(err.to_string().contains("sslrootcert"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_and_one_for_another_host_are_refused() {
    let pki = Pki::new();
    let ca = format!("sslmode=verify-full sslrootcert={}", pki.path("ca.pem"));
    let expired = terminator(&pki, &pki.expired).await;
    let err = refused(&config(&expired, &ca)).await;
    assert_eq!(refusal(&err).problem, PostgresTlsProblem::Expired, "{err}");
    let wrong_host = terminator(&pki, &pki.wrong_host).await;
    let err = refused(&config(&wrong_host, &ca)).await;
    assert_eq!(
        refusal(&err).problem,
        PostgresTlsProblem::WrongName,
        "{err}"
    );
}

#[tokio::test]
async fn tls_settings_are_checked_before_connecting() {
    let pki = Pki::new();
    for (config, setting, says) in [
        (
            format!("host=127.0.0.1 sslrootcert={}", pki.path("ca.pem")),
            "sslrootcert",
            "sslmode=require",
        ),
        (
            "host=127.0.0.1 sslmode=require sslrootcert=/nonexistent/ca.pem".to_string(),
            "sslrootcert",
            "cannot read /nonexistent/ca.pem",
        ),
        (
            "postgres://postgres:hunter22@127.0.0.1/test?sslmode=require&nope=1".to_string(),
            "nope",
            "unknown setting",
        ),
    ] {
        match PostgresStore::connect(&config, None).await {
            Err(Error::Config {
                setting: s,
                message,
            }) => {
                assert_eq!(s, setting, "{config}: {message}");
                assert!(message.contains(says), "{config}: {message}");
                assert!(!message.contains("hunter22"), "{config}: {message}");
            }
            Err(other) => panic!("{config}: {other}"),
            Ok(_) => panic!("{config}: connected"),
        }
    }
}
