//! A consumer process for the process-fault tests (`tests/process_faults.rs`): they
//! SIGKILL it mid-run and start it again on the same group.
//!
//! ```text
//! cargo run --example fault_consumer --features all-backends -- \
//!     --url kafka://127.0.0.1:9092?commit=sync --topic T --group G \
//!     [--concurrency 4] [--prefetch 16] [--delay-ms 10] [--guarantee at-most-once]
//! ```
//!
//! `--guarantee` is `at-least-once` (the default: ack after the handler) or
//! `at-most-once` (ack on receipt, before it; `tests/guarantees_kafka.rs`).
//!
//! Prints `ready` once the group is subscribed, then `handled <id> <partition> <offset>`
//! for every delivery (`-` where the backend has no position), as the handler's last
//! step (so before the runtime acks it). Each line is one flushed
//! write, so a kill never leaves half a line and every printed id was really handled.
//! Stops gracefully when its stdin closes (so it never outlives the test that started
//! it), or on Ctrl-C.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use switchyard::{
    CancellationToken, Consumer, Delivery, Guarantee, HandlerError, SubscribeOptions,
};

struct Args {
    url: String,
    topic: String,
    group: String,
    concurrency: usize,
    prefetch: Option<usize>,
    delay: Duration,
    guarantee: Guarantee,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut topic = None;
    let mut group = None;
    let mut concurrency = 4;
    let mut prefetch = None;
    let mut delay = Duration::ZERO;
    let mut guarantee = Guarantee::AtLeastOnce;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--url" => url = Some(value.clone()),
            "--topic" => topic = Some(value.clone()),
            "--group" => group = Some(value.clone()),
            "--concurrency" => concurrency = number()? as usize,
            "--prefetch" => prefetch = Some(number()? as usize),
            "--delay-ms" => delay = Duration::from_millis(number()?),
            "--guarantee" => {
                guarantee = match value.as_str() {
                    "at-least-once" => Guarantee::AtLeastOnce,
                    "at-most-once" => Guarantee::AtMostOnce,
                    _ => return Err(format!("{flag} {value}: at-least-once or at-most-once")),
                }
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(Args {
        url: url.ok_or("--url is required")?,
        topic: topic.ok_or("--topic is required")?,
        group: group.ok_or("--group is required")?,
        concurrency,
        prefetch,
        delay,
        guarantee,
    })
}

/// One line, one write, flushed: a pipe write this small is atomic.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

#[tokio::main]
async fn main() -> switchyard::Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fault_consumer: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let shutdown = CancellationToken::new();
    {
        // A blocking read on its own thread: the runtime has no async stdin here.
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            shutdown.cancel();
        });
    }
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shutdown.cancel();
            }
        });
    }

    let broker = switchyard::connect(&args.url).await?;
    let mut options = SubscribeOptions::new(&args.topic, &args.group);
    if let Some(p) = args.prefetch {
        options = options.prefetch(p);
    }
    let delay = Arc::new(args.delay);
    let handler = move |d: Delivery| {
        let delay = delay.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(*delay).await;
            }
            let origin = d.origin();
            let position = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
            say(&format!(
                "handled {} {} {}",
                d.id(),
                position(origin.partition.map(i64::from)),
                position(origin.offset)
            ));
            Ok::<_, HandlerError>(())
        }
    };
    let running = Consumer::handler(options, handler)
        .concurrency(args.concurrency)
        .guarantee(args.guarantee)
        .start(broker.clone(), shutdown.clone())
        .await?;
    say("ready");
    let report = running.join().await?;
    broker.close().await?;
    eprintln!(
        "fault_consumer: {}/{} acked {}",
        report.topic, report.group, report.acked
    );
    Ok(())
}
