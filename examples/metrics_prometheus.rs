//! Metrics: switchyard's counters through a Prometheus recorder, served on `/metrics`
//! and scraped once.
//!
//! Run: `cargo run --example metrics_prometheus [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! switchyard counts through the `metrics` facade (`switchyard_published_total`,
//! `switchyard_handled_total`, `switchyard_failed_total`, …; the table is in
//! `switchyard::observe`), so any recorder works. Here `metrics-exporter-prometheus`
//! renders them, and a few lines of tokio TCP serve the text, where an application would
//! use its HTTP server. The last line is the summary; the exit status is 0 only when the
//! scrape shows every publish, every success and the one failure.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use switchyard::{
    CancellationToken, Consumer, Delivery, HandlerError, PublisherExt, SubscribeOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MESSAGES: u64 = 10;

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    // The endpoint: answer every request with the current text format.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let body = prometheus.render();
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = socket.write_all((head + &body).as_bytes()).await;
        }
    });

    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run (a Kafka group spans topics), so leftovers and other
    // runs never mix in; ephemeral groups, so their broker state goes when the run ends.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("clicks-{run}");
    let shutdown = CancellationToken::new();
    // One delivery fails once (a flaky downstream), so the failed counter has something.
    let failed_once = Arc::new(AtomicBool::new(false));
    let count = move |d: Delivery| {
        let flaky = d.attempt() == 1 && !failed_once.swap(true, Ordering::SeqCst);
        let error = HandlerError::transient(std::io::Error::other("flaky downstream"));
        async move {
            if flaky {
                Err(error)
            } else {
                Ok(())
            }
        }
    };
    let consumer = Consumer::handler(
        SubscribeOptions::new(&topic, format!("counter-{run}")).ephemeral(true),
        count,
    )
    .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(10));
    let running = consumer.start(broker.clone(), shutdown.clone()).await?;
    for n in 0..MESSAGES {
        broker.publish_json(&topic, None, &n).await?;
    }

    // Scrape until the handled counter is complete, as Prometheus would every few seconds.
    let (topic_label, mut text) = (format!("topic=\"{topic}\""), String::new());
    for _ in 0..300 {
        let mut scrape = tokio::net::TcpStream::connect(address).await?;
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        text.clear();
        scrape.read_to_string(&mut text).await?;
        if sample(&text, "switchyard_handled_total", &[&topic_label]) == Some(MESSAGES as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let report = running.join().await?;
    broker.close().await?;

    let published = sample(
        &text,
        "switchyard_published_total",
        &[&topic_label, "outcome=\"ok\""],
    )
    .unwrap_or(0.0);
    let handled = sample(&text, "switchyard_handled_total", &[&topic_label]).unwrap_or(0.0);
    let failed = sample(&text, "switchyard_failed_total", &[&topic_label]).unwrap_or(0.0);
    let ok = text.starts_with("HTTP/1.1 200")
        && published == MESSAGES as f64
        && handled == MESSAGES as f64
        && failed == 1.0
        && report.acked == MESSAGES;
    println!("summary scraped=http://{address}/metrics published={published} handled={handled} failed={failed} acked={}", report.acked);
    Ok(ExitCode::from(u8::from(!ok)))
}
