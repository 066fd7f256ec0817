//! Point-to-point: a producer sends tasks to one queue and one consumer handles each
//! task once.
//!
//! Run: `cargo run --example point_to_point [-- --url memory://]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! `SubscribeOptions::queue(name)` is the topic `name` consumed by the group `name`. The
//! last line is the summary; the exit status is 0 only when every task was handled
//! exactly once and, where the broker reports it, the queue is empty afterwards.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{
    App, CancellationToken, Consumer, HandlerError, Json, PublisherExt, SubscribeOptions,
};

const TASKS: u64 = 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct ResizeImage {
    task: u64,
    width: u32,
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let url = std::env::args().skip_while(|a| a != "--url").nth(1);
    let broker = switchyard::connect(url.as_deref().unwrap_or("memory://")).await?;
    // A name of its own per run, so a durable broker's leftovers never mix in.
    let queue = format!("resize-{}", &switchyard::new_id()[24..]);

    let done: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let seen = done.clone();
    let resize = move |Json(task): Json<ResizeImage>| {
        let seen = seen.clone();
        async move {
            // The real work would go here; `?` on its errors nacks the task for redelivery.
            *seen.lock().unwrap().entry(task.task).or_default() += 1;
            Ok::<_, HandlerError>(())
        }
    };

    // Subscribe before sending: on brokers without replay the queue must exist first.
    let shutdown = CancellationToken::new();
    let running = App::new(broker.clone())
        .consumer(Consumer::handler(SubscribeOptions::queue(&queue), resize))
        .start(shutdown.clone())
        .await?;
    for task in 0..TASKS {
        broker
            .publish_json(&queue, None, &ResizeImage { task, width: 640 })
            .await?;
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while done.lock().unwrap().len() < TASKS as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a duplicate, if the broker sent one, the time to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    let reports = running.join().await?;

    let lag = match broker.lag(&queue, &queue).await {
        Ok(n) => Some(n),
        Err(switchyard::Error::Unsupported { .. }) => None,
        Err(e) => return Err(e),
    };
    broker.close().await?;
    let done = done.lock().unwrap();
    let handled = done.len() as u64;
    let twice = done.values().filter(|&&n| n > 1).count();
    let ok = handled == TASKS && twice == 0 && lag.unwrap_or(0) == 0;
    println!(
        "summary sent={TASKS} handled={handled} handled_twice={twice} acked={} lag={}",
        reports[0].acked,
        lag.map_or("n/a".into(), |n| n.to_string())
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
