//! Metrics: switchyard's counters through a Prometheus recorder, served on `/metrics`
//! and scraped once.
//!
//! Run: `cargo run --example metrics_prometheus [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! switchyard counts through the `metrics` facade (`switchyard_handled_total`, …; the
//! table is in `switchyard::observe`), so any recorder works. `metrics-exporter-prometheus`
//! renders them here, served by a few lines of tokio TCP where an application would use
//! its HTTP server. The exit status is 0 only when the scrape shows every publish, every
//! success and the one failure.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use switchyard::{CancellationToken, Consumer, Delivery, HandlerError, PublisherExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MESSAGES: u64 = 10;

/// The endpoint: answers every request with the current text format.
async fn serve(listener: TcpListener, prometheus: PrometheusHandle) {
    while let Ok((mut socket, _)) = listener.accept().await {
        let _ = socket.read(&mut [0u8; 1024]).await;
        let body = prometheus.render();
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
        let _ = socket.write_all((head + &body).as_bytes()).await;
    }
}

/// One scrape, as Prometheus would do every few seconds: the whole response.
async fn scrape(address: std::net::SocketAddr) -> std::io::Result<String> {
    let mut socket = TcpStream::connect(address).await?;
    socket.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut text = String::new();
    socket.read_to_string(&mut text).await?;
    Ok(text)
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(serve(listener, prometheus));

    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run, so leftovers never mix in; ephemeral groups leave none.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("clicks-{run}");
    // One delivery fails once (a flaky downstream), so the failed counter has something.
    let failed_once = Arc::new(AtomicBool::new(false));
    let count = move |d: Delivery| {
        let flaky = d.delivery_count() == 1 && !failed_once.swap(true, Ordering::SeqCst);
        let error = || HandlerError::transient(std::io::Error::other("flaky downstream"));
        std::future::ready(if flaky { Err(error()) } else { Ok(()) })
    };
    let options = switchyard::SubscribeOptions::new(&topic, format!("counter-{run}"));
    let consumer = Consumer::handler(options.ephemeral(true), count)
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(10));
    let shutdown = CancellationToken::new();
    let running = consumer.start(broker.clone(), shutdown.clone()).await?;
    for n in 0..MESSAGES {
        broker.publish_json(&topic, None, &n).await?;
    }

    // Scrape until the handled counter is complete.
    let (on_topic, want) = (format!("topic=\"{topic}\""), MESSAGES as f64);
    let mut text = String::new();
    for _ in 0..300 {
        text = scrape(address).await?;
        if sample(&text, "switchyard_handled_total", &[&on_topic]) == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let report = running.join().await?;
    broker.close().await?;

    let value = |name, label| sample(&text, name, &[&on_topic, label]); // "": no other label
    let published = value("switchyard_published_total", "outcome=\"ok\"");
    let handled = value("switchyard_handled_total", "");
    let failed = value("switchyard_failed_total", "");
    let counted = published == want && handled == want && failed == 1.0;
    let ok = text.starts_with("HTTP/1.1 200") && counted && report.acked == MESSAGES;
    println!("summary scraped=http://{address}/metrics published={published} handled={handled} failed={failed} acked={}", report.acked);
    Ok(ExitCode::from(u8::from(!ok)))
}
