//! Graceful shutdown: on SIGTERM the consumer stops taking messages, lets the running
//! handlers finish and acks them; what it had not started is handled after a restart.
//!
//! Run: `cargo run --example graceful_shutdown [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! `shutdown_on_signal()` is the token a service passes to its app; the example sends
//! itself SIGTERM once a few slow jobs run, as an orchestrator would. The exit status is 0
//! only when every job started before the signal finished and was acked, none was
//! abandoned, and after a restart every job was done exactly once.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{App, Consumer, HandlerError, Json, PublisherExt, SubscribeOptions};

const JOBS: u64 = 12;

/// Jobs started and finished, with how many times each finished.
#[derive(Default)]
struct Jobs {
    started: u64,
    finished: HashMap<u64, u32>,
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // Names of their own per run, so leftovers and other runs never mix in.
    let run = switchyard::new_id()[24..].to_string();
    let topic = format!("exports-{run}");
    let jobs: Arc<Mutex<Jobs>> = Arc::default();
    let book = jobs.clone();
    let export = move |Json(job): Json<u64>| {
        let jobs = book.clone();
        async move {
            jobs.lock().unwrap().started += 1;
            tokio::time::sleep(Duration::from_millis(300)).await; // a slow job
            *jobs.lock().unwrap().finished.entry(job).or_default() += 1;
            Ok::<_, HandlerError>(())
        }
    };
    let consumer = || {
        Consumer::handler(
            SubscribeOptions::new(&topic, format!("exporter-{run}")),
            export.clone(),
        )
        .concurrency(4)
        // Long enough for a running job to finish; one running past it stays unacked.
        .shutdown_timeout(Duration::from_secs(5))
    };

    let shutdown = switchyard::shutdown_on_signal();
    let app = App::new(broker.clone()).consumer(consumer());
    let running = app.start(shutdown).await?;
    for job in 0..JOBS {
        broker.publish_json(&topic, None, &job).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while jobs.lock().unwrap().started < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signal = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status();
    if !signal.is_ok_and(|s| s.success()) {
        eprintln!("graceful_shutdown: could not send SIGTERM to this process");
        return Ok(ExitCode::FAILURE);
    }
    let first = running.join().await?.remove(0);
    let (started, finished) = {
        let j = jobs.lock().unwrap();
        (j.started, j.finished.values().sum::<u32>() as u64)
    };
    let drained = started > 0 && started < JOBS && finished == started && first.acked == started;

    // The restart: the same group picks up what the first run never started.
    let shutdown = switchyard::CancellationToken::new();
    let app = App::new(broker.clone()).consumer(consumer());
    let running = app.start(shutdown.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (jobs.lock().unwrap().finished.len() as u64) < JOBS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let j = jobs.lock().unwrap();
    let once = j.finished.len() as u64 == JOBS && j.finished.values().all(|&n| n == 1);
    let ok = drained && first.abandoned == 0 && once;
    println!(
        "summary jobs={JOBS} started_before_signal={started} finished_before_exit={finished} acked={} abandoned={} all_done_once_after_restart={once}",
        first.acked, first.abandoned
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
