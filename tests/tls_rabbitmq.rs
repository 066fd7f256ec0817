//! RabbitMQ through TLS: `amqps://` with a private CA, mutual TLS and a server name,
//! against the real broker (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL`
//! overrides) behind a TLS terminator run by the test (tests/tls). Bad certificates
//! and a wrong password each fail at once with their typed error, after one connection
//! attempt. Fails, never skips, when the broker is unreachable.

mod tls;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use switchyard::rabbitmq::{AuthRefused, RabbitBroker, TlsProblem, TlsRefused};
use switchyard::{Broker, Error, Message, Publisher, SubscribeOptions, Subscriber};
use switchyard_conformance::support::unique_name;
use tls::{Leaf, Opening, Pki, Terminator};

fn plain_url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The broker's `host:port`, from the plain URL.
fn upstream() -> String {
    let url = plain_url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5672")
    }
}

async fn terminator(pki: &Pki, leaf: &Leaf, client_auth: bool) -> Terminator {
    Terminator::start(
        &upstream(),
        pki.server_config(leaf, client_auth),
        Opening::Tls,
    )
    .await
}

/// `amqps://user:pass@127.0.0.1:<terminator>/%2f?<settings>`.
fn tls_url(t: &Terminator, userinfo: &str, settings: &str) -> String {
    format!(
        "amqps://{userinfo}@127.0.0.1:{}/%2f?{settings}",
        t.addr.port()
    )
}

/// Deletes a group's queues and the topic's exchange, over a plain connection.
async fn cleanup(topic: &str, group: &str) {
    let conn = lapin::Connection::connect(&plain_url(), lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable at SWITCHYARD_AMQP_URL (default 127.0.0.1:5672)");
    let ch = conn.create_channel().await.unwrap();
    for q in (0..8)
        .map(|p| format!("{topic}:{group}.p{p}"))
        .chain([format!("{topic}:{group}.members")])
    {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Publishes one message and receives it back.
async fn round_trip(url: &str) {
    let broker = RabbitBroker::connect(url)
        .await
        .expect("connect through TLS");
    let topic = unique_name("syr-tls-rt");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, "g"))
        .await
        .unwrap();
    broker
        .publish(&topic, Message::new("through tls").with_key("k"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("a delivery within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(d.payload(), b"through tls");
    d.ack().await.unwrap();
    sub.close().await.unwrap();
    broker.close().await.unwrap();
    cleanup(&topic, "g").await;
}

/// The typed refusal inside a failed connect.
fn tls_refusal(err: &Error) -> &TlsRefused {
    match err {
        Error::Backend {
            transient: false,
            source,
            ..
        } => source
            .downcast_ref::<TlsRefused>()
            .unwrap_or_else(|| panic!("not a TlsRefused: {err}")),
        other => panic!("not a permanent backend error: {other:?}"),
    }
}

async fn refused_connect(url: &str) -> Error {
    match RabbitBroker::connect(url).await {
        Ok(_) => panic!("connected, but the handshake should fail"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn publish_and_consume_through_tls_with_a_private_ca() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, false).await;
    let url = tls_url(
        &t,
        "guest:guest",
        &format!("tls_ca_file={}", pki.path("ca.pem")),
    );
    // PLAIN login (guest/guest) inside the TLS connection.
    round_trip(&url).await;
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, true).await;
    let url = tls_url(
        &t,
        "guest:guest",
        &format!(
            "tls_ca_file={}&tls_cert_file={}&tls_key_file={}",
            pki.path("ca.pem"),
            pki.path("client.pem"),
            pki.path("client.key")
        ),
    );
    round_trip(&url).await;
}

#[tokio::test]
async fn without_a_client_certificate_mutual_tls_is_refused() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, true).await;
    let url = tls_url(
        &t,
        "guest:guest",
        &format!("tls_ca_file={}", pki.path("ca.pem")),
    );
    let err = refused_connect(&url).await;
    assert_eq!(
        tls_refusal(&err).problem,
        TlsProblem::ClientCertificateRefused,
        "{err}"
    );
    assert!(err.to_string().contains("tls_cert_file"), "{err}");
    assert_eq!(t.connections(), 1, "a refused certificate is not retried");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_an_unknown_issuer() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, false).await;
    let url = tls_url(
        &t,
        "guest:guest",
        &format!("tls_ca_file={}", pki.path("other-ca.pem")),
    );
    let err = refused_connect(&url).await;
    assert_eq!(
        tls_refusal(&err).problem,
        TlsProblem::UnknownIssuer,
        "{err}"
    );
    assert!(err.to_string().contains("tls_ca_file"), "{err}");
    assert_eq!(t.connections(), 1, "a refused certificate is not retried");
}

#[tokio::test]
async fn the_system_roots_do_not_trust_a_private_ca() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, false).await;
    let err = refused_connect(&tls_url(&t, "guest:guest", "")).await;
    assert_eq!(
        tls_refusal(&err).problem,
        TlsProblem::UnknownIssuer,
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.expired, false).await;
    let url = tls_url(
        &t,
        "guest:guest",
        &format!("tls_ca_file={}", pki.path("ca.pem")),
    );
    let err = refused_connect(&url).await;
    assert_eq!(tls_refusal(&err).problem, TlsProblem::Expired, "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(t.connections(), 1, "a refused certificate is not retried");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_unless_that_name_is_expected() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.wrong_host, false).await;
    let ca = format!("tls_ca_file={}", pki.path("ca.pem"));
    let err = refused_connect(&tls_url(&t, "guest:guest", &ca)).await;
    let refusal = tls_refusal(&err);
    assert_eq!(refusal.problem, TlsProblem::WrongName, "{err}");
    assert_eq!(refusal.server_name, "127.0.0.1");
    assert!(err.to_string().contains("tls_server_name"), "{err}");
    assert_eq!(t.connections(), 1, "a refused certificate is not retried");
    // The certificate's own name, given as the name to check, is accepted.
    round_trip(&tls_url(
        &t,
        "guest:guest",
        &format!("{ca}&tls_server_name=wrong.example"),
    ))
    .await;
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_with_one_clear_error() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, false).await;
    let url = tls_url(
        &t,
        "guest:not-the-password",
        &format!("tls_ca_file={}", pki.path("ca.pem")),
    );
    let err = refused_connect(&url).await;
    let Error::Backend {
        transient: false,
        source,
        ..
    } = &err
    else {
        panic!("not a permanent backend error: {err:?}");
    };
    assert!(source.downcast_ref::<AuthRefused>().is_some(), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("refused the login"), "{shown}");
    assert!(!shown.contains("not-the-password"), "{shown}");
    assert_eq!(t.connections(), 1, "a refused login is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_two_members_shares_the_work_through_tls() {
    let pki = Pki::new();
    let t = terminator(&pki, &pki.server, false).await;
    let url = tls_url(
        &t,
        "guest:guest",
        &format!("tls_ca_file={}&rebalance_ms=50", pki.path("ca.pem")),
    );
    let broker = Arc::new(RabbitBroker::connect(&url).await.unwrap());
    let topic = unique_name("syr-tls-group");
    tls::two_members_share_a_topic(
        &*broker,
        &topic,
        Duration::from_secs(60),
        Duration::from_millis(100),
    )
    .await;
    broker.close().await.unwrap();
    cleanup(&topic, "g").await;
}

#[tokio::test]
async fn tls_settings_are_checked_when_the_url_is_parsed() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let cases = [
        (
            format!("amqp://h/%2f?tls_ca_file={ca}"),
            "tls_ca_file",
            "amqps://",
        ),
        (
            "amqps://h/%2f?tls_ca_file=/nonexistent/ca.pem".to_string(),
            "tls_ca_file",
            "cannot read /nonexistent/ca.pem",
        ),
        (
            format!("amqps://h/%2f?tls_ca_file={}", pki.path("client.key")),
            "tls_ca_file",
            "no usable CA certificate",
        ),
        (
            format!("amqps://h/%2f?tls_cert_file={}", pki.path("client.pem")),
            "tls_key_file",
            "needs tls_key_file",
        ),
        (
            format!(
                "amqps://h/%2f?tls_cert_file={}&tls_key_file=/nonexistent/client.key",
                pki.path("client.pem")
            ),
            "tls_key_file",
            "cannot read",
        ),
        (
            format!(
                "amqps://h/%2f?tls_cert_file={}&tls_key_file={ca}",
                pki.path("client.pem")
            ),
            "tls_key_file",
            "no unencrypted PEM private key",
        ),
        (
            "amqps://h/%2f?tls_server_name=not%20a%20name".to_string(),
            "tls_server_name",
            "neither a DNS name",
        ),
    ];
    for (url, setting, says) in cases {
        match switchyard_rabbitmq_config(&url) {
            Err(Error::Config {
                setting: s,
                message,
            }) => {
                assert_eq!(s, setting, "{url}: {message}");
                assert!(message.contains(says), "{url}: {message}");
                assert!(!message.contains("PRIVATE KEY"), "{url}: {message}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    // A complete set parses, and Debug shows the files but not the key's.
    let key = pki.path("client.key");
    let config = switchyard_rabbitmq_config(&format!(
        "amqps://ann:hunter22@h/%2f?tls_ca_file={ca}&tls_cert_file={}&tls_key_file={key}\
         &tls_server_name=broker.example",
        pki.path("client.pem")
    ))
    .unwrap();
    let shown = format!("{config:?}");
    assert!(
        shown.contains("ca.pem") && shown.contains("broker.example"),
        "{shown}"
    );
    assert!(
        !shown.contains(&key) && !shown.contains("hunter22"),
        "{shown}"
    );
}

fn switchyard_rabbitmq_config(url: &str) -> switchyard::Result<switchyard::rabbitmq::RabbitConfig> {
    switchyard::rabbitmq::RabbitConfig::from_url(url)
}
