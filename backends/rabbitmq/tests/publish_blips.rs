//! Publishing across connection blips: the broker closes the client's connections while
//! `publish` and `publish_batch` calls are in flight, and every call still returns `Ok`;
//! with the broker gone for good, a publish fails with a transient error naming the
//! cause, within the publish bound.
//!
//! Against the local broker (127.0.0.1:5672, guest/guest; `SWITCHYARD_AMQP_URL`
//! overrides), driven with `rabbitmqctl`; fails, never skips, when either is missing.
//! Only this test's own connections are closed (picked by their connection name), so
//! tests of other binaries running on the same broker are not disturbed.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_conformance::support::unique_name;
use switchyard_core::{
    Broker, CancellationToken, Consumer, Delivery, HandlerError, Message, Publisher,
    SubscribeOptions, Subscriber, Subscription,
};
use switchyard_rabbitmq::RabbitBroker;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Closes the broker's connections whose client-given name starts with `prefix`, and
/// waits (up to 10 s) until they are gone; returns how many there were. One
/// `rabbitmqctl eval`, as `close_all_connections` cannot pick connections and
/// `close_connection` takes one at a time (each call costs about a second).
fn close_connections_named(prefix: &str) -> usize {
    let expr = format!(
        r#"Prefix = <<"{prefix}">>,
        Name = fun(Props) -> case lists:keyfind(<<"connection_name">>, 1, Props) of
            {{_, longstr, N}} -> N; _ -> <<>> end end,
        Pids = [proplists:get_value(pid, I)
                || I <- rabbit_networking:connection_info_all([pid, client_properties]),
                   string:prefix(Name(proplists:get_value(client_properties, I)), Prefix)
                       =/= nomatch],
        [rabbit_networking:close_connection(P, "switchyard publish blip test") || P <- Pids],
        Wait = fun W(0) -> still_open;
                   W(K) -> case [P || P <- Pids, is_process_alive(P)] of
                               [] -> closed;
                               _ -> timer:sleep(50), W(K - 1)
                           end end,
        {{length(Pids), Wait(200)}}."#
    );
    let out = Command::new("rabbitmqctl")
        .args(["-q", "eval", &expr])
        .output()
        .expect("rabbitmqctl must be runnable (the test closes connections with it)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "rabbitmqctl eval failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (count, state) = text
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split_once(',')
        .unwrap_or_else(|| panic!("unexpected rabbitmqctl eval output {text:?}"));
    assert_eq!(state, "closed", "connections survived closing: {text}");
    count.parse().expect("a count")
}

/// What the blip run saw; checked after the queues are deleted, so a failure leaves
/// nothing behind.
#[derive(Debug, Default)]
struct Report {
    batches: usize,
    singles: usize,
    published: usize,
    failed: Vec<String>,
    closed: Vec<usize>,
    missing: usize,
    duplicates: usize,
    slowest_call: Duration,
}

const GROUP: &str = "blips";
const BLIPS: usize = 3;
/// Messages each publisher confirms between blips, so every blip comes mid-run.
const BETWEEN_BLIPS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_in_flight_ride_out_closed_connections() {
    let started = Instant::now();
    let name = unique_name("syr-blip");
    let topic = name.clone();
    let url = common::with_param(&common::url(), &format!("connection_name={name}"));
    let broker = Arc::new(RabbitBroker::connect(&url).await.unwrap());

    let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let shutdown = CancellationToken::new();
    let handler = {
        let handled = handled.clone();
        move |d: Delivery| {
            let handled = handled.clone();
            async move {
                *handled
                    .lock()
                    .unwrap()
                    .entry(d.id().to_string())
                    .or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let consumer = Consumer::handler(SubscribeOptions::new(&topic, GROUP).prefetch(200), handler)
        .concurrency(16)
        .start(broker.clone(), shutdown.clone())
        .await
        .unwrap();

    let report = run_blips(&broker, &topic, &name, &handled).await;

    shutdown.cancel();
    let _ = timeout(Duration::from_secs(20), consumer.join()).await;
    let _ = timeout(Duration::from_secs(10), broker.close()).await;
    common::cleanup_if_reachable(&topic, GROUP).await;

    eprintln!(
        "{BLIPS} blips closing {:?} connections: {} messages published in {} batch and {} \
         single publish calls, {} failed; {} missing, {} extra deliveries; slowest call {:?}; \
         {:?} in all",
        report.closed,
        report.published,
        report.batches,
        report.singles,
        report.failed.len(),
        report.missing,
        report.duplicates,
        report.slowest_call,
        started.elapsed()
    );
    assert!(
        report.failed.is_empty(),
        "{} publish calls failed across the blips, e.g. {:?}",
        report.failed.len(),
        &report.failed[..report.failed.len().min(3)]
    );
    assert_eq!(report.missing, 0, "published messages never delivered");
    // Each blip cut the publisher's connection and the member's.
    assert!(
        report.closed.len() == BLIPS && report.closed.iter().all(|&n| n >= 2),
        "closed {:?} connections",
        report.closed
    );
}

/// Two publishers (batches of 25, and single messages) run until the last blip is
/// over; a killer closes this broker's connections [`BLIPS`] times, each after both
/// publishers made progress. Returns once every published id was handled or 30 s
/// passed.
async fn run_blips(
    broker: &Arc<RabbitBroker>,
    topic: &str,
    name: &str,
    handled: &Arc<Mutex<HashMap<String, usize>>>,
) -> Report {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut publishers = Vec::new();
    for (p, done) in progress.iter().enumerate() {
        let (broker, topic, stop, done) = (
            broker.clone(),
            topic.to_string(),
            stop.clone(),
            done.clone(),
        );
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut calls = 0;
            let mut failed = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut i = 0usize;
            // Also stops on its own after 60 s, so a stuck killer cannot hang the test.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let size = if p == 0 { 25 } else { 1 };
                let batch: Vec<Message> = (i..i + size)
                    .map(|n| Message::new(format!("p{p}-{n}")).with_key(format!("k{}", n % 16)))
                    .collect();
                i += size;
                let sent: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
                let began = Instant::now();
                let result = if size == 1 {
                    let m = batch.into_iter().next().expect("one message");
                    timeout(Duration::from_secs(45), broker.publish(&topic, m))
                        .await
                        .map(|r| r.map(|_| ()))
                } else {
                    timeout(Duration::from_secs(45), broker.publish_batch(&topic, batch))
                        .await
                        .map(|r| r.map(|_| ()))
                };
                slowest = slowest.max(began.elapsed());
                calls += 1;
                match result {
                    Ok(Ok(())) => {
                        ids.extend(sent);
                        done.fetch_add(size, Ordering::SeqCst);
                    }
                    Ok(Err(e)) => failed.push(format!("{e} (transient: {})", e.is_transient())),
                    Err(_) => failed.push("the publish call hung for 45 s".to_string()),
                }
                // Paced, so the run stays a few thousand messages long.
                tokio::time::sleep(Duration::from_millis(if size == 1 { 2 } else { 10 })).await;
            }
            (ids, calls, failed, slowest)
        }));
    }

    let mut report = Report::default();
    for _ in 0..BLIPS {
        // Both publishers get on after the previous blip before the next one.
        let marks: Vec<usize> = progress
            .iter()
            .map(|d| d.load(Ordering::SeqCst) + BETWEEN_BLIPS / 25)
            .collect();
        let wait = Instant::now() + Duration::from_secs(30);
        while progress
            .iter()
            .zip(&marks)
            .any(|(d, &m)| d.load(Ordering::SeqCst) < m)
            && Instant::now() < wait
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let name = name.to_string();
        let n = tokio::task::spawn_blocking(move || close_connections_named(&name))
            .await
            .unwrap();
        report.closed.push(n);
    }
    // Some more publishing on the rebuilt connections, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);

    let mut published = Vec::new();
    for (p, t) in publishers.into_iter().enumerate() {
        let (ids, calls, failed, slowest) = t.await.unwrap();
        published.extend(ids);
        if p == 0 {
            report.batches = calls;
        } else {
            report.singles = calls;
        }
        report.failed.extend(failed);
        report.slowest_call = report.slowest_call.max(slowest);
    }
    report.published = published.len();

    let wait = Instant::now() + Duration::from_secs(30);
    loop {
        report.missing = {
            let handled = handled.lock().unwrap();
            published
                .iter()
                .filter(|id| !handled.contains_key(*id))
                .count()
        };
        if report.missing == 0 || Instant::now() > wait {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report.duplicates = handled
        .lock()
        .unwrap()
        .values()
        .map(|n| n.saturating_sub(1))
        .sum();
    report
}

/// The AMQP URL with its host and port replaced by 127.0.0.1:`port`.
fn via_port(port: u16) -> String {
    let (base, address) = (common::url(), common::amqp_address());
    assert!(
        base.contains(&address),
        "SWITCHYARD_AMQP_URL must name its port: {base}"
    );
    base.replacen(&address, &format!("127.0.0.1:{port}"), 1)
}

/// Forwards TCP connections from a local port to the broker until aborted; aborting it
/// closes every forwarded connection, as a broker that went away would. The port stays
/// held by the socket returned, bound to it and never listening: connecting is then
/// refused, and a listener of a test running alongside cannot take the port over.
async fn start_proxy() -> (u16, tokio::task::JoinHandle<()>, tokio::net::TcpSocket) {
    let reusable = || {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseport(true).unwrap();
        socket
    };
    let proxy = reusable();
    proxy.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = proxy.local_addr().unwrap().port();
    let hold = reusable();
    hold.bind(([127, 0, 0, 1], port).into()).unwrap();
    let listener = proxy.listen(64).unwrap();
    (port, tokio::spawn(forward(Arc::new(listener))), hold)
}

/// Forwards each connection `listener` accepts to the broker. Dropped (its task
/// aborted), it drops its JoinSet, which aborts the links.
async fn forward(listener: Arc<TcpListener>) {
    let target = common::amqp_address();
    let mut links = tokio::task::JoinSet::new();
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let target = target.clone();
        links.spawn(async move {
            if let Ok(mut server) = TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// A connection of its own, with `topic`'s group subscribed through it so publishes
/// route, and the broker under test: through 127.0.0.1:`port`, publishes bounded by
/// `bound`, and one publish through it already confirmed.
async fn connect_via(
    topic: &str,
    name: &str,
    port: u16,
    bound: Duration,
) -> (RabbitBroker, Box<dyn Subscription>, RabbitBroker) {
    let direct = RabbitBroker::connect(&common::with_param(
        &common::url(),
        &format!("connection_name={name}"),
    ))
    .await
    .unwrap();
    let sub = direct
        .subscribe(SubscribeOptions::new(topic, GROUP))
        .await
        .unwrap();
    let url = common::with_param(
        &via_port(port),
        &format!(
            "confirm_timeout_ms={}&connection_name={name}",
            bound.as_millis()
        ),
    );
    let broker = RabbitBroker::connect(&url).await.unwrap();
    broker
        .publish(topic, Message::new("before"))
        .await
        .expect("the broker answers through the proxy");
    (direct, sub, broker)
}

/// Forwards like [`forward`], but stops reading from the clients while `frozen` is
/// set, as a broker blocking its publishers (a memory or disk alarm) does: their
/// writes fill the socket buffers and then wait.
async fn forward_freezable(listener: Arc<TcpListener>, frozen: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = common::amqp_address();
    let mut links = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let Ok(server) = TcpStream::connect(&target).await else {
            continue;
        };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let frozen = frozen.clone();
        links.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                while frozen.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if server_write.write_all(&buf[..n]).await.is_err() => break,
                    Ok(_) => {}
                }
            }
        });
        links.spawn(async move {
            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        });
    }
}

/// A broker that stops reading what a publisher writes: the publish fails within its
/// bound (`confirm_timeout`) instead of waiting on the socket for as long as that lasts,
/// and closing the client does not wait for ever on an answer that cannot come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_fails_a_publish_within_its_bound() {
    let topic = unique_name("syr-blocked");
    let name = unique_name("syr-blocked");
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let forwarding = tokio::spawn(forward_freezable(listener, frozen.clone()));
    let bound = Duration::from_secs(2);
    let (direct, sub, broker) = connect_via(&topic, &name, port, bound).await;

    frozen.store(true, Ordering::SeqCst);
    // Far more than the socket buffers and lapin's own hold.
    let big = Message::new(vec![0u8; 64 << 20]);
    let result = timeout(bound + Duration::from_secs(20), broker.publish(&topic, big)).await;
    // Closing waits a bounded time for confirms and for the broker's close-ok.
    let closed = timeout(Duration::from_secs(20), broker.close()).await;
    forwarding.abort();
    let _ = forwarding.await;
    drop(sub);
    let _ = timeout(Duration::from_secs(10), direct.close()).await;
    common::cleanup_if_reachable(&topic, GROUP).await;

    let err = result
        .expect("publish hung on a broker that stopped reading")
        .expect_err("nothing is confirmed while the broker does not read");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("writing a publish"), "{err}");
    assert!(
        closed.is_ok(),
        "close hung on a broker that stopped reading"
    );
}

/// A broker that takes connections and then says nothing (overloaded, or a load
/// balancer with nothing behind it): a publish that has to reconnect fails within its
/// bound, with an error that names the handshake that never finished rather than only
/// the wait for a channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_fails_publish_naming_the_handshake() {
    let topic = unique_name("syr-mute");
    let name = unique_name("syr-mute");
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let port = listener.local_addr().unwrap().port();
    let forwarding = tokio::spawn(forward(listener.clone()));
    let bound = Duration::from_secs(2);
    let (direct, sub, broker) = connect_via(&topic, &name, port, bound).await;

    // The connection drops; the port now takes connections and never answers.
    forwarding.abort();
    let _ = forwarding.await;
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        }
    });
    let began = Instant::now();
    let result = timeout(
        bound + Duration::from_secs(12),
        broker.publish(&topic, Message::new("after")),
    )
    .await;
    let took = began.elapsed();
    mute.abort();
    let _ = timeout(Duration::from_secs(10), broker.close()).await;
    drop(sub);
    let _ = timeout(Duration::from_secs(10), direct.close()).await;
    common::cleanup_if_reachable(&topic, GROUP).await;

    let err = result
        .expect("publish hung with the broker silent")
        .expect_err("nothing can be published with the broker silent");
    eprintln!("publish gave up after {took:?}: {err}");
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "the AMQP handshake with amqp://***@127.0.0.1:{port}"
        )),
        "the error names the handshake that did not finish: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_publish_transiently_within_the_bound() {
    let topic = unique_name("syr-gone");
    let name = unique_name("syr-gone");
    let (port, proxy, _hold) = start_proxy().await;
    let bound = Duration::from_secs(3);
    let (direct, sub, broker) = connect_via(&topic, &name, port, bound).await;

    proxy.abort();
    let _ = proxy.await;
    let mut outcomes = Vec::new();
    for batch in [false, true] {
        let began = Instant::now();
        let call = async {
            if batch {
                let messages = (0..10).map(|i| Message::new(format!("m{i}"))).collect();
                broker.publish_batch(&topic, messages).await.map(|_| ())
            } else {
                broker
                    .publish(&topic, Message::new("after"))
                    .await
                    .map(|_| ())
            }
        };
        // The bound plus a connection attempt's worth of slack; a hang fails here.
        let result = timeout(bound + Duration::from_secs(12), call).await;
        outcomes.push((batch, result, began.elapsed()));
    }
    let _ = timeout(Duration::from_secs(10), broker.close()).await;
    drop(sub);
    let _ = timeout(Duration::from_secs(10), direct.close()).await;
    common::cleanup_if_reachable(&topic, GROUP).await;

    for (batch, result, took) in outcomes {
        let what = if batch { "publish_batch" } else { "publish" };
        let err = result
            .unwrap_or_else(|_| panic!("{what} hung with the broker unreachable"))
            .expect_err("nothing can be published with the broker unreachable");
        eprintln!("{what} gave up after {took:?}: {err}");
        assert!(err.is_transient(), "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}")) && text.contains("refused"),
            "{what}: the error names the cause: {text}"
        );
    }
}
