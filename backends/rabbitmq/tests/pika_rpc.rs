//! Request/reply with a foreign client: RabbitMQ's RPC pattern in Python pika
//! (`tests/pika_rpc.py`, tutorial 6) answers switchyard's requests, and asks a switchyard
//! responder, with no switchyard code on its side: `reply_to` and `correlation_id`
//! properties, replies through the default exchange.
//!
//! Against the local broker (`SWITCHYARD_AMQP_URL`, default
//! amqp://guest:guest@127.0.0.1:5672/%2f); needs `python3` with pika (`scripts/test`
//! installs it). Fails, never skips, when the broker or the client is missing.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    reply_fn, Broker, CancellationToken, Consumer, Delivery, Error, HandlerError, Message,
    SubscribeOptions,
};
use switchyard_rabbitmq::RabbitBroker;

use common::{cleanup, cleanup_groups, raw, unique, url};

const LONG: Duration = Duration::from_secs(60);

fn pika(args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pika_rpc.py"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` to exit and returns its standard output; panics with its
/// standard error when it failed.
fn finish(child: Child) -> String {
    let out = child.wait_with_output().expect("wait for python3");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "pika_rpc.py failed (python3 with pika must be installed: pip install pika): {stderr}{stdout}"
    );
    stdout.into_owned()
}

async fn broker() -> Arc<RabbitBroker> {
    Arc::new(
        RabbitBroker::connect(&url())
            .await
            .expect("RabbitMQ must be reachable at SWITCHYARD_AMQP_URL"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_rpc_server_answers_switchyard_requests() {
    let topic = unique("rpc-pika-server");
    let queue = format!("{topic}-pika");
    let mut server = pika(&["server", &url(), &topic, &queue, "2"])
        .spawn()
        .expect("run python3");
    let stdout = server.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.trim(), "ready", "the pika server did not start");

    let broker = broker().await;
    let reply = broker
        .request(&topic, Message::new("30"), LONG)
        .await
        .expect("pika's answer");
    assert_eq!(reply.payload.as_ref(), b"832040");
    match broker.request(&topic, Message::new("thirty"), LONG).await {
        Err(Error::ErrorReply { message, .. }) => {
            assert!(message.contains("not a number"), "{message}")
        }
        other => panic!("expected pika's error reply, got {other:?}"),
    }
    tokio::task::spawn_blocking(move || finish(server))
        .await
        .unwrap();
    broker.close().await.unwrap();
    // The pika queue was auto-deleted with its consumer; the exchange is ours to remove.
    cleanup_groups(&topic, &[], 0).await;
}

async fn answer(d: Delivery) -> Result<String, HandlerError> {
    match d.payload() {
        b"fail" => Err(HandlerError::permanent(std::io::Error::other(
            "no such currency",
        ))),
        other => Ok(format!("re:{}", String::from_utf8_lossy(other))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_rpc_client_gets_a_switchyard_responders_answers() {
    let topic = unique("rpc-pika-client");
    let broker = broker().await;
    let stop = CancellationToken::new();
    let running = Consumer::new(
        SubscribeOptions::queue(&topic),
        reply_fn(broker.clone(), answer),
    )
    .start(broker.clone(), stop.clone())
    .await
    .expect("start the responder");
    let ask = |n: &'static str| {
        let child = pika(&["client", &url(), &topic, n])
            .spawn()
            .expect("run python3");
        tokio::task::spawn_blocking(move || finish(child))
    };
    let ok: serde_json::Value = serde_json::from_str(&ask("7").await.unwrap()).unwrap();
    assert_eq!(ok["body"], "re:7", "{ok}");
    let failed: serde_json::Value = serde_json::from_str(&ask("fail").await.unwrap()).unwrap();
    assert_eq!(failed["body"], "", "{failed}");
    assert_eq!(
        failed["headers"]["x-reply-error"], "no such currency",
        "{failed}"
    );
    assert_eq!(
        failed["headers"]["x-reply-error-kind"], "permanent",
        "{failed}"
    );
    stop.cancel();
    let report = running.join().await.unwrap();
    assert_eq!(report.acked, 2, "{report:?}");
    broker.close().await.unwrap();
    cleanup(&raw().await, &topic, &topic).await;
}
