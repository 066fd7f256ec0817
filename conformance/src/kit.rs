//! The harness: contexts, outcomes, the report and the runner.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::{AnyBroker, Capabilities, Result};

use crate::scenarios::SCENARIOS;

/// Why a scenario did not pass.
#[derive(Debug)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// An expectation failed; the text says which.
    Failed(String),
    /// The backend lacks an ability the scenario needs; the text says which.
    NotApplicable(String),
}

/// A scenario's early exit: failure or not-applicable.
pub(crate) type Check = std::result::Result<(), Outcome>;

/// Fails the scenario with a message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::kit::Outcome::Failed(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

/// Turns a switchyard error into a scenario failure with context.
pub(crate) trait OrFail<T> {
    fn or_fail(self, what: &str) -> std::result::Result<T, Outcome>;
}

impl<T, E: std::fmt::Display> OrFail<T> for std::result::Result<T, E> {
    fn or_fail(self, what: &str) -> std::result::Result<T, Outcome> {
        self.map_err(|e| Outcome::Failed(format!("{what}: {e}")))
    }
}

/// What a scenario gets: a connected broker and helpers.
pub struct Ctx {
    /// The broker under test.
    pub broker: AnyBroker,
    /// Its declared abilities.
    pub caps: Capabilities,
    run_id: String,
}

impl Ctx {
    /// A topic (or group) name unique to this run: `sy-<label>-<random>`.
    pub fn name(&self, label: &str) -> String {
        format!("sy-{label}-{}", self.run_id)
    }

    /// Waits until `cond` holds, polling; fails with `what` after `limit`.
    pub(crate) async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut() -> bool,
    ) -> Check {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > limit {
                return Err(Outcome::Failed(format!(
                    "timed out after {limit:?} waiting for {what}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits until `count()` reaches `target`, polling; fails when the count has not grown
    /// for `stall`. A slow machine only makes it take longer, while a stalled consumer
    /// fails with how far it got.
    pub(crate) async fn wait_for_count(
        &self,
        stall: Duration,
        what: &str,
        target: usize,
        mut count: impl FnMut() -> usize,
    ) -> Check {
        // Tokio's clock, so a test can run the wait on paused time.
        let (mut seen, mut grew) = (count(), tokio::time::Instant::now());
        while seen < target {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = count();
            if now > seen {
                (seen, grew) = (now, tokio::time::Instant::now());
            } else if grew.elapsed() > stall {
                return Err(Outcome::Failed(format!(
                    "no progress for {stall:?} at {seen} of {target} {what}"
                )));
            }
        }
        Ok(())
    }

    /// Whether the capability holds for a part of a scenario; where it does not, says in
    /// the output that the part is not checked, so it does not pass silently.
    pub(crate) fn part_needs(&self, has: bool, what: &str) -> bool {
        if !has {
            let _ = writeln!(
                std::io::stdout(),
                "  part not checked: backend lacks {what}"
            );
        }
        has
    }

    /// Skips the scenario unless the capability holds.
    pub(crate) fn require(&self, has: bool, what: &str) -> Check {
        if has {
            Ok(())
        } else {
            Err(Outcome::NotApplicable(format!("backend lacks {what}")))
        }
    }
}

/// A scenario's body.
pub(crate) type ScenarioFn = fn(Arc<Ctx>) -> Pin<Box<dyn Future<Output = Check> + Send>>;

/// One scenario of the suite.
pub(crate) struct Scenario {
    /// Its area: the file it lives in, and the module its generated test sits in.
    pub(crate) area: &'static str,
    /// Its name, also its test's name.
    pub(crate) name: &'static str,
    /// Its body.
    pub(crate) run: ScenarioFn,
}

/// One scenario's result.
#[derive(Debug)]
pub struct ScenarioResult {
    /// The scenario's name.
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
    /// How long it took.
    pub elapsed: Duration,
}

/// The suite's results for one backend.
#[derive(Debug)]
pub struct Report {
    /// The backend's name as given to [`run`].
    pub backend: String,
    /// Every scenario's result, in order.
    pub results: Vec<ScenarioResult>,
}

impl Report {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    /// Scenarios passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }

    /// Scenarios failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    /// Scenarios not applicable to this backend.
    pub fn not_applicable(&self) -> usize {
        self.count(|o| matches!(o, Outcome::NotApplicable(_)))
    }

    /// The summary line.
    pub fn summary(&self) -> String {
        format!(
            "conformance backend={} passed={} failed={} not_applicable={}",
            self.backend,
            self.passed(),
            self.failed(),
            self.not_applicable()
        )
    }

    /// Panics, listing the failures, unless every applicable scenario passed.
    pub fn assert_all_passed(&self) {
        let failures: Vec<String> = self
            .results
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Failed(why) => Some(format!("{}: {why}", r.name)),
                _ => None,
            })
            .collect();
        assert!(
            failures.is_empty() && self.passed() > 0,
            "{}\n{}",
            self.summary(),
            failures.join("\n")
        );
    }
}

/// How long one scenario may take before it counts as failed. The load scenarios'
/// waits fail sooner when progress stops (see [`Ctx::wait_for_count`]); this limit
/// catches a hang anywhere else, and leaves room for a slow, busy machine, where the
/// 100,000-message scenario on RabbitMQ can take over three minutes.
const SCENARIO_LIMIT: Duration = Duration::from_secs(480);

/// Runs every scenario against brokers from `connect` (called once per scenario) and
/// prints a line per scenario plus the summary line to stdout (past the test harness's
/// capture, so `cargo test` shows it). The `SWITCHYARD_SCENARIO` environment variable,
/// a substring, narrows it to the scenarios whose name contains it.
///
/// [`conformance_tests!`](crate::conformance_tests) makes one test per scenario instead,
/// which `cargo test` filters by name.
pub async fn run<F, Fut>(backend: &str, connect: F) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<AnyBroker>>,
{
    let only = std::env::var("SWITCHYARD_SCENARIO").ok();
    let mut results = Vec::new();
    for scenario in SCENARIOS {
        if only.as_deref().is_some_and(|o| !scenario.name.contains(o)) {
            continue;
        }
        results.push(run_one(backend, scenario, connect()).await);
    }
    let report = Report {
        backend: backend.to_string(),
        results,
    };
    let _ = writeln!(std::io::stdout(), "{}", report.summary());
    report
}

/// Runs one scenario against the broker `connect` yields, closes that broker and prints
/// the scenario's line.
pub(crate) async fn run_one(
    backend: &str,
    scenario: &Scenario,
    connect: impl Future<Output = Result<AnyBroker>>,
) -> ScenarioResult {
    let mut out = std::io::stdout();
    let start = Instant::now();
    let outcome = match connect.await {
        Err(e) => Outcome::Failed(format!("could not connect the backend: {e}")),
        Ok(broker) => {
            let caps = broker.capabilities();
            // The tail of a UUIDv7 is random; its head is the clock, shared by close calls.
            let run_id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
            let ctx = Arc::new(Ctx {
                broker: broker.clone(),
                caps,
                run_id,
            });
            // Its own task, so a panic in a scenario is a failure, not the end of the suite.
            let task = tokio::spawn((scenario.run)(ctx));
            let outcome = match tokio::time::timeout(SCENARIO_LIMIT, task).await {
                Err(_) => Outcome::Failed(format!("did not finish within {SCENARIO_LIMIT:?}")),
                Ok(Err(join)) => Outcome::Failed(format!("scenario panicked: {join}")),
                Ok(Ok(Ok(()))) => Outcome::Passed,
                Ok(Ok(Err(o))) => o,
            };
            if let Err(e) = broker.close().await {
                let _ = writeln!(out, "  (closing the broker failed: {e})");
            }
            outcome
        }
    };
    let elapsed = start.elapsed();
    let line = match &outcome {
        Outcome::Passed => "passed".to_string(),
        Outcome::Failed(why) => format!("FAILED: {why}"),
        Outcome::NotApplicable(why) => format!("not applicable: {why}"),
    };
    let name = scenario.name;
    let _ = writeln!(
        out,
        "scenario backend={backend} {name}: {line} ({elapsed:.1?})"
    );
    ScenarioResult {
        name,
        outcome,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use switchyard_memory::MemoryBroker;

    use super::*;

    fn ctx() -> Ctx {
        let broker: AnyBroker = Arc::new(MemoryBroker::new());
        Ctx {
            caps: broker.capabilities(),
            broker,
            run_id: "test".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_count_that_stops_growing_fails_naming_how_far_it_got() {
        let count = AtomicUsize::new(0);
        let outcome = ctx()
            .wait_for_count(Duration::from_secs(30), "handled", 10, || {
                // Grows to 4, then stalls.
                let n = count.load(Ordering::Relaxed);
                if n < 4 {
                    count.store(n + 1, Ordering::Relaxed);
                }
                n
            })
            .await;
        let Err(Outcome::Failed(why)) = outcome else {
            panic!("a stalled count fails, got {outcome:?}");
        };
        assert_eq!(why, "no progress for 30s at 4 of 10 handled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_count_that_keeps_growing_passes_whatever_it_takes() {
        // One more every 20 s: 200 s in all, each step within the 30 s allowed.
        let start = tokio::time::Instant::now();
        let outcome = ctx()
            .wait_for_count(Duration::from_secs(30), "handled", 10, || {
                (start.elapsed().as_secs() / 20) as usize
            })
            .await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(start.elapsed() >= Duration::from_secs(200));
    }
}
