//! The consumer process the process-fault tests start and kill
//! (`examples/fault_consumer.rs`): building it, reading what it prints, stopping it.
//! Shared by `tests/process_faults.rs` and `tests/guarantees_kafka.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Builds the consumer example once per test binary and returns its path.
pub(crate) fn consumer_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut features = Vec::new();
        for (on, name) in [
            (cfg!(feature = "default"), "default"),
            (cfg!(feature = "all-backends"), "all-backends"),
            (cfg!(feature = "memory"), "memory"),
            (cfg!(feature = "kafka"), "kafka"),
            (cfg!(feature = "rabbitmq"), "rabbitmq"),
            (cfg!(feature = "postgres"), "postgres"),
            (cfg!(feature = "broker-tests"), "broker-tests"),
            (cfg!(feature = "kafka-tls"), "kafka-tls"),
        ] {
            if on {
                features.push(name);
            }
        }
        // This binary is <target>/<profile dir>/deps/process_faults-<hash>; the example
        // lands in <target>/<profile dir>/examples.
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <target>/<profile>/deps");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let started = Instant::now();
        // `--workspace`: features resolved as `cargo test --workspace` resolved them for
        // this test, so after `scripts/test`'s build this is a no-op; with `-p` cargo
        // would resolve them for the facade alone and rebuild tokio and the crates above.
        let status = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--quiet",
                "--workspace",
                "--example",
                "fault_consumer",
            ])
            .args(["--profile", &profile, "--no-default-features", "--features"])
            .arg(features.join(","))
            .status()
            .expect("cargo must be runnable to build the consumer example");
        assert!(status.success(), "building examples/fault_consumer failed");
        let bin = profile_dir.join("examples").join("fault_consumer");
        assert!(bin.exists(), "cargo built no {}", bin.display());
        eprintln!("fault_consumer built in {:?}", started.elapsed());
        bin
    })
}

/// A handled message's (partition, offset), where the backend has positions.
pub(crate) type Position = Option<(i32, i64)>;

/// What the consumer processes printed, across runs.
#[derive(Default)]
pub(crate) struct Seen {
    /// The position of every `handled` line, in order, across runs.
    pub(crate) handled: Vec<Position>,
    /// How many times each id was handled.
    pub(crate) counts: HashMap<String, usize>,
    /// `ready` lines, one per process that subscribed.
    pub(crate) ready: usize,
}

/// A running consumer process; its stdout is read by a thread into [`Seen`].
pub(crate) struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub(crate) fn spawn(seen: &Arc<Mutex<Seen>>, args: &[String]) -> Self {
        let mut child = Command::new(consumer_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the consumer example");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let seen = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut seen = seen.lock().unwrap();
                if line == "ready" {
                    seen.ready += 1;
                } else if let Some(rest) = line.strip_prefix("handled ") {
                    let mut parts = rest.split(' ');
                    let id = parts.next().unwrap_or_default().to_string();
                    let partition = parts.next().and_then(|p| p.parse().ok());
                    let offset = parts.next().and_then(|o| o.parse().ok());
                    *seen.counts.entry(id).or_default() += 1;
                    seen.handled.push(partition.zip(offset));
                }
            }
        });
        Self {
            child,
            stdin,
            reader: Some(reader),
        }
    }

    /// SIGKILL, then waits for the process and for the last of its output.
    pub(crate) fn sigkill(mut self) {
        self.child.kill().expect("SIGKILL the consumer");
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
        self.reader.take().unwrap().join().unwrap();
    }

    /// Closes stdin (the example's cue to shut down gracefully); kills it if it is still
    /// running after `within`.
    pub(crate) fn stop(mut self, within: Duration) {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                eprintln!("the consumer did not stop within {within:?}; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.reader.take().unwrap().join().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed assertion must not leave the process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `done` holds for what the processes printed.
pub(crate) async fn wait_for(
    seen: &Arc<Mutex<Seen>>,
    limit: Duration,
    what: &str,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        {
            let seen = seen.lock().unwrap();
            if done(&seen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} for {what}: {} handled lines, {} distinct ids, {} ready",
                seen.handled.len(),
                seen.counts.len(),
                seen.ready
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
