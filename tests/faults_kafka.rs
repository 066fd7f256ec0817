//! Kafka broker faults: the broker (tansu with `sqlite://` storage, so data survives) is
//! killed with SIGKILL mid-run and restarted 10 s later. Nothing whose publish was acknowledged may
//! be lost. The test runs its own tansu on 127.0.0.1:19092 so it can kill it without
//! disturbing other tests; `tansu` must be on PATH (`scripts/test` installs it). At the
//! end the broker stays down, and a publish must fail with a transient error in time.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{CancellationToken, Consumer, Message, SubscribeOptions};
use switchyard_conformance::support::Tally;

// Not 9092 (the shared test broker) nor the Kafka crate's own test ports.
const ADDR: &str = "127.0.0.1:19392";

struct Tansu {
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Tansu {
    fn start(dir: &std::path::Path) -> Child {
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{ADDR}"),
                "--advertised-listener-url",
                &format!("tcp://{ADDR}"),
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu must be installed (scripts/test installs it): cargo install tansu --locked --version 0.6.0 --features dynostore,libsql");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(ADDR).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {ADDR}");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-tansu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Some(Self::start(&dir));
        Self { dir, child }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.child = Some(Self::start(&self.dir));
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_loses_nothing_acknowledged() {
    let mut tansu = Tansu::new();
    let url = format!("kafka://{ADDR}?session.timeout.ms=6000&message.timeout.ms=60000");
    let broker = switchyard::connect(&url)
        .await
        .expect("connect to our tansu");
    let topic = format!("restart-{}", std::process::id());
    let handled = Tally::default();
    let handler = handled.handler();
    let token = CancellationToken::new();
    let running = Consumer::handler(SubscribeOptions::new(&topic, "restart-group"), handler)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();

    // Batches of 10 are published one after another while the broker dies and comes
    // back, so some are in flight when it goes: each must end confirmed or failed.
    let confirmed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let publisher = {
        let (broker, topic, confirmed) = (broker.clone(), topic.clone(), confirmed.clone());
        tokio::spawn(async move {
            let mut failed = 0;
            for batch in 0..90 {
                let messages: Vec<Message> = (0..10)
                    .map(|i| Message::new(format!("b{batch}-{i}")).with_key(format!("k{}", i % 7)))
                    .collect();
                let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
                match broker.publish_batch(&topic, messages).await {
                    Ok(_) => confirmed.lock().unwrap().extend(ids),
                    Err(_) => failed += 10,
                }
            }
            failed
        })
    };
    let until = Instant::now() + Duration::from_secs(60);
    while confirmed.lock().unwrap().len() < 300 {
        assert!(Instant::now() < until, "publishing did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-stream: the broker dies without warning, is gone for 10 s, and comes back on
    // the same data.
    let at_kill = confirmed.lock().unwrap().len();
    tansu.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    tansu.restart();
    let failed = tokio::time::timeout(Duration::from_secs(180), publisher)
        .await
        .expect("publishing ends after the broker is back")
        .unwrap();
    let acknowledged = confirmed.lock().unwrap().clone();
    assert!(
        at_kill < 900,
        "the broker was killed after publishing ended"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = handled.missing(&acknowledged);
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged messages never handled after the broker restart ({failed} publishes failed)",
            acknowledged.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    token.cancel();
    running.join().await.unwrap();
    broker.close().await.unwrap();
    let lost = handled.missing(&acknowledged);
    let duplicated = handled.extra_runs();
    // The fault table's line (printed even when the test passes).
    println!(
        "fault=broker-kill-publishing backend=kafka published={} confirmed={} failed={failed} delivered={} lost={lost} duplicated={duplicated}",
        900,
        acknowledged.len(),
        acknowledged.len() - lost
    );

    // A broker that stays down: publishing fails within publish_timeout_ms with a
    // transient error that names the broker, never a hang.
    let short = switchyard::connect(&format!("kafka://{ADDR}?publish_timeout_ms=3000"))
        .await
        .expect("connect to our tansu");
    short
        .publish(&topic, Message::new("before"))
        .await
        .expect("publish while the broker is up");
    tansu.kill();
    let down = tokio::time::timeout(
        Duration::from_secs(30),
        short.publish(&topic, Message::new("down")),
    )
    .await
    .expect("a publish to a dead broker must end within its timeout");
    let e = down.expect_err("a publish to a dead broker must fail");
    assert!(e.is_transient(), "retryable: {e}");
    assert!(e.to_string().contains(ADDR), "names the broker: {e}");
    let _ = short.close().await;

    assert!(
        acknowledged.len() >= 600,
        "most publishes should succeed: {} acknowledged, {failed} failed",
        acknowledged.len()
    );
}
