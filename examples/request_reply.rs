//! Request/reply: a requester asks a rates service over a topic and waits for each answer.
//!
//! Run: `cargo run --example request_reply [-- --url memory:// --topic NAME]` (any `--url`:
//! `kafka://127.0.0.1:9092` with `--features kafka`, `amqp://guest:guest@127.0.0.1:5672/%2f`
//! with `--features rabbitmq`).
//!
//! The responder is a consumer whose handler returns the reply (`reply_fn`); every tenth
//! request asks for a currency it does not know, and its `Err` comes back to the requester
//! as a typed error reply. The last line is the summary; the exit status is 0 only when
//! every request got its own answer (no reply matched to the wrong request, no timeout)
//! and exactly the unknown-currency requests got error replies.

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use switchyard::{
    reply_fn, App, CancellationToken, Consumer, Error, HandlerError, Json, RequestExt,
    SubscribeOptions,
};

const REQUESTS: u64 = 200;

#[derive(serde::Serialize, serde::Deserialize)]
struct Quote {
    n: u64,
    currency: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Rate {
    n: u64,
    cents_per_euro: u64,
}

/// The rates service: the reply is the handler's `Ok` value.
async fn rate(Json(q): Json<Quote>) -> Result<Json<Rate>, HandlerError> {
    if q.currency != "USD" {
        let why = format!("no rate for currency {:?}", q.currency);
        return Err(HandlerError::permanent(std::io::Error::other(why)));
    }
    Ok(Json(Rate {
        n: q.n,
        cents_per_euro: 108,
    }))
}

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

#[tokio::main]
async fn main() -> switchyard::Result<ExitCode> {
    let broker = switchyard::connect(&arg("--url").unwrap_or("memory://".into())).await?;
    // A name of its own per run, so a durable broker's leftovers never mix in.
    let topic = arg("--topic").unwrap_or(format!("rates-{}", &switchyard::new_id()[24..]));

    // Start the responder first: on brokers without replay the queue must exist first.
    let shutdown = CancellationToken::new();
    let responder = Consumer::new(
        SubscribeOptions::queue(&topic),
        reply_fn(broker.clone(), rate),
    );
    let running = App::new(broker.clone())
        .consumer(responder.concurrency(32))
        .start(shutdown.clone())
        .await?;

    let (mut replies, mut mismatched, mut timeouts, mut errors_seen, mut other) = (0, 0, 0, 0, 0);
    let asks = futures::stream::iter(0..REQUESTS).map(|n| {
        let (broker, topic) = (broker.clone(), topic.clone());
        let currency = if n % 10 == 9 { "XXX" } else { "USD" }.to_string();
        async move {
            let quote = Quote { n, currency };
            let timeout = Duration::from_secs(30);
            (
                n,
                broker
                    .request_json::<_, Rate>(&topic, &quote, timeout)
                    .await,
            )
        }
    });
    let mut answers = asks.buffer_unordered(50);
    while let Some((n, answer)) = answers.next().await {
        match answer {
            Ok(rate) if rate.n == n && rate.cents_per_euro == 108 => replies += 1,
            Ok(_) => mismatched += 1,
            Err(Error::ErrorReply { .. }) if n % 10 == 9 => errors_seen += 1,
            Err(Error::Timeout { .. }) => timeouts += 1,
            Err(e) => {
                eprintln!("request {n}: {e}");
                other += 1;
            }
        }
    }
    shutdown.cancel();
    running.join().await?;
    broker.close().await?;

    let expected_errors = REQUESTS / 10;
    let ok = replies == REQUESTS - expected_errors
        && errors_seen == expected_errors
        && mismatched + timeouts + other == 0;
    println!(
        "summary requests={REQUESTS} replies={replies} mismatched={mismatched} timeouts={timeouts} errors_seen={errors_seen}"
    );
    Ok(ExitCode::from(u8::from(!ok)))
}
