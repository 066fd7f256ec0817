//! The PostgreSQL idempotency store through a server restart: the test runs its own
//! PostgreSQL cluster (`initdb` + `pg_ctl` from /usr/lib/postgresql/*/bin, on port
//! 55439 in a temporary directory, never the machine's main cluster) and stops it with
//! `pg_ctl stop -m immediate` mid-run, then starts it again. A consumer with
//! DeadLetterLayer → IdempotencyLayer(PostgresStore) → handler must lose nothing,
//! dead-letter nothing and run no id twice. Fails, never skips, when the PostgreSQL
//! binaries are missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_core::{
    CancellationToken, Consumer, Delivery, HandlerError, Message, Publisher, SubscribeOptions,
};
use switchyard_memory::MemoryBroker;
use switchyard_middleware::{DeadLetterLayer, IdempotencyLayer, PostgresStore};
use tower::ServiceBuilder;

const PORT: u16 = 55439;

/// A private PostgreSQL cluster, run as the `postgres` user (initdb refuses root).
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    fn bin() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
            .collect();
        found.sort();
        found.pop().expect(
            "PostgreSQL server binaries must be installed (/usr/lib/postgresql/*/bin/initdb): \
             apt-get install postgresql",
        )
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("runuser {tool}: {e}"));
        assert!(status.success(), "{tool} {args:?} failed: {status}");
    }

    fn new() -> Self {
        let bin = Self::bin();
        let dir = std::env::temp_dir().join(format!("switchyard-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let owned = Command::new("chown")
            .args(["postgres:postgres", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(owned.success(), "chown postgres {dir:?}");
        let cluster = Self { bin, dir };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        cluster.start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_string()
    }

    fn start(&self) {
        let options = format!(
            "-p {PORT} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.dir.display()
        );
        let log = self.dir.join("log").to_str().unwrap().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// A crash: no checkpoint, every connection cut.
    fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn config() -> String {
        format!("host=127.0.0.1 port={PORT} user=postgres dbname=postgres connect_timeout=2")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(Path::new(&self.dir));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_nothing_dead_letters_nothing_and_runs_nothing_twice() {
    let cluster = Cluster::new();
    let store = PostgresStore::connect(&Cluster::config(), None)
        .await
        .expect("the private cluster answers");
    let broker = Arc::new(MemoryBroker::new());
    let layer = IdempotencyLayer::new(Arc::new(store)).lease(Duration::from_secs(10));
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let runs = runs.clone();
        move |d: Delivery| {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                *runs.lock().unwrap().entry(d.id().to_string()).or_default() += 1;
                Ok::<_, HandlerError>(())
            }
        }
    };
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(broker.clone()).max_deliveries(3))
        .layer(layer.clone())
        .service(switchyard_core::handler_fn(handler));
    let dead: Arc<AtomicU64> = Arc::default();
    let dlq = {
        let dead = dead.clone();
        switchyard_core::handler_fn(move |_: Delivery| {
            let dead = dead.clone();
            async move {
                dead.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
    };
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("orders", "billing"), service)
        .members(4)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();
    let dead_letters = Consumer::new(SubscribeOptions::new("orders.dlq", "audit"), dlq)
        .start(broker.clone(), token.clone())
        .await
        .unwrap();

    // 270 distinct messages and 30 duplicates, published over about 3 s, with the
    // cluster down from about 1 s to 2.5 s.
    let unique: Vec<Message> = (0..270)
        .map(|i| Message::new(format!("order {i}")))
        .collect();
    let mut all: Vec<Message> = unique.clone();
    for i in 0..30 {
        all.insert(i * 9 + 5, unique[i * 7].clone());
    }
    let total = all.len() as u64;
    let publishing = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for m in all {
                broker.publish("orders", m).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let crashed = tokio::task::spawn_blocking(move || {
        cluster.stop();
        std::thread::sleep(Duration::from_millis(1500));
        cluster.start();
        cluster
    });
    let cluster = crashed.await.unwrap();
    publishing.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ran = runs.lock().unwrap().len();
        let settled = ran as u64 + layer.skipped();
        if ran == unique.len() && settled >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lost: {} of {} ids never ran ({} skipped, {} dead-lettered)",
            unique.len() - ran,
            unique.len(),
            layer.skipped(),
            dead.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment for anything late (a dead letter, a second run) to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    token.cancel();
    let report = running.join().await.unwrap();
    dead_letters.join().await.unwrap();
    drop(cluster);

    let runs = runs.lock().unwrap();
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ids whose handler ran twice: {twice:?}");
    assert_eq!(dead.load(Ordering::SeqCst), 0, "dead-lettered");
    assert_eq!(layer.skipped(), total - unique.len() as u64);
    assert_eq!(report.acked, total, "{report:?}");
}
