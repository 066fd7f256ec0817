//! One libtest test per scenario: the [`conformance_tests!`](crate::conformance_tests)
//! macro and the runner its tests call.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::time::Duration;

use parking_lot::{const_mutex, Mutex};
use switchyard_core::{AnyBroker, Result};

use crate::kit::{run_one, Outcome, Report};
use crate::scenarios::SCENARIOS;

/// Makes one `#[test]` per conformance scenario for a backend, in a module named after
/// the backend with one submodule per area: `memory::ordering::per_key_order_at_concurrency_16`.
///
/// `connect` is an expression callable with no arguments that yields a future of
/// `switchyard_core::Result<AnyBroker>`; each scenario gets a broker of its own and closes
/// it. Names in scope where the macro is called are in scope for `connect`.
///
/// The [crate docs](crate) show a call.
///
/// `cargo test <filter>` runs the matching scenarios; a failing test names its scenario.
/// Scenarios run one at a time, also under libtest's parallel threads (brokers such as
/// tansu do not take parallel scenarios). Each prints its line
/// (`scenario backend=<b> <name>: passed | FAILED: … | not applicable: …`); a scenario
/// whose ability the backend's `Capabilities` lack passes as "not applicable", never
/// silently. After the last selected scenario, the summary line
/// `conformance backend=<b> passed=<n> failed=<n> not_applicable=<n>` follows.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:ident, $connect:expr $(,)?) => {
        $crate::__scenario_list!(__conformance_tests($backend, $connect));
    };
}

/// Makes the tests of [`conformance_tests!`] from the scenario list.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    (($backend:ident, $connect:expr) $($area:ident { $($name:ident = $f:ident;)* })*) => {
        mod $backend {
            // So `connect` sees what the calling module imports.
            #[allow(unused_imports)]
            use super::*;

            fn connect() -> $crate::__private::Connecting {
                ::std::boxed::Box::pin(($connect)())
            }

            $(mod $area {
                $(#[test]
                fn $name() {
                    $crate::__private::run_test(
                        stringify!($backend),
                        module_path!(),
                        stringify!($name),
                        super::connect,
                    );
                })*
            })*
        }
    };
}

/// A broker being connected, as the generated tests hand it over.
pub type Connecting = Pin<Box<dyn Future<Output = Result<AnyBroker>>>>;

/// One scenario at a time across the test binary.
static SERIAL: Mutex<()> = const_mutex(());

/// Each backend's results so far, and how many of its tests this run selected.
static TALLIES: Mutex<Vec<(Report, usize)>> = const_mutex(Vec::new());

/// Runs the scenario `name` as one test: `module` is the test's `module_path!()`.
/// Panics (fails the test) when the scenario fails.
pub fn run_test(backend: &str, module: &str, name: &str, connect: fn() -> Connecting) {
    let Some(scenario) = SCENARIOS.iter().find(|s| s.name == name) else {
        panic!("no conformance scenario named {name}");
    };
    let result = {
        let _one_at_a_time = SERIAL.lock();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the scenario");
        let result = runtime.block_on(run_one(backend, scenario, connect()));
        // A backend's blocking threads must not hold the next scenario back for long.
        runtime.shutdown_timeout(Duration::from_secs(10));
        result
    };
    let failure = match &result.outcome {
        Outcome::Failed(why) => Some(why.clone()),
        _ => None,
    };
    record(backend, module, result);
    if let Some(why) = failure {
        panic!("scenario {name} failed on {backend}: {why}");
    }
}

/// Adds a result to its backend's tally and prints the summary line once every test
/// this run selected has reported.
fn record(backend: &str, module: &str, result: crate::ScenarioResult) {
    let mut tallies = TALLIES.lock();
    let at = match tallies.iter().position(|(r, _)| r.backend == backend) {
        Some(at) => at,
        None => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let selection = Selection::parse(&args);
            let prefix = backend_prefix(module);
            let expected = SCENARIOS
                .iter()
                .filter(|s| selection.runs(&format!("{prefix}{}::{}", s.area, s.name)))
                .count();
            let report = Report {
                backend: backend.to_string(),
                results: Vec::new(),
            };
            tallies.push((report, expected));
            tallies.len() - 1
        }
    };
    let (report, expected) = &mut tallies[at];
    report.results.push(result);
    if report.results.len() == *expected {
        let _ = writeln!(std::io::stdout(), "{}", report.summary());
    }
}

/// The test path up to the area module: `memory::` for
/// `conformance_memory::memory::ordering` (libtest names leave out the crate).
fn backend_prefix(module: &str) -> String {
    let segments: Vec<&str> = module.split("::").collect();
    match segments.as_slice() {
        [_crate, inner @ .., _area] if !inner.is_empty() => format!("{}::", inner.join("::")),
        _ => String::new(),
    }
}

/// Which tests libtest runs, from its command line.
#[derive(Debug, Default, PartialEq)]
struct Selection {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    /// `--list` or `--ignored`: none of the generated tests run.
    none: bool,
}

/// libtest options that take a value as the next argument.
const VALUED: &[&str] = &[
    "--logfile",
    "--test-threads",
    "--color",
    "--format",
    "-Z",
    "--shuffle-seed",
];

impl Selection {
    fn parse(args: &[String]) -> Self {
        let mut s = Selection::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--exact" => s.exact = true,
                "--list" | "--ignored" => s.none = true,
                "--skip" => s.skips.extend(it.next().cloned()),
                a if a.starts_with("--skip=") => s.skips.push(a["--skip=".len()..].to_string()),
                a if VALUED.contains(&a) => {
                    it.next();
                }
                a if a.starts_with('-') => {}
                a => s.filters.push(a.to_string()),
            }
        }
        s
    }

    fn matches(&self, name: &str, filter: &str) -> bool {
        if self.exact {
            name == filter
        } else {
            name.contains(filter)
        }
    }

    /// Whether libtest runs the test named `name` (a non-ignored test).
    fn runs(&self, name: &str) -> bool {
        !self.none
            && (self.filters.is_empty() || self.filters.iter().any(|f| self.matches(name, f)))
            && !self.skips.iter().any(|f| self.matches(name, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Selection {
        Selection::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn no_arguments_run_everything() {
        assert!(parse(&[]).runs("memory::delivery::topics_isolated"));
    }

    #[test]
    fn filters_are_substrings_and_any_one_suffices() {
        let s = parse(&["ordering", "large"]);
        assert!(s.runs("memory::ordering::per_key_order_at_concurrency_16"));
        assert!(s.runs("memory::delivery::large_message_1_mib"));
        assert!(!s.runs("memory::delivery::topics_isolated"));
    }

    #[test]
    fn option_values_are_not_filters() {
        let s = parse(&["--test-threads", "1", "--format", "terse", "--nocapture"]);
        assert_eq!(s, Selection::default());
        assert!(s.runs("memory::delivery::topics_isolated"));
    }

    #[test]
    fn skip_and_exact_follow_libtest() {
        let s = parse(&["--skip", "load", "--skip=tracing", "memory"]);
        assert!(s.runs("memory::delivery::topics_isolated"));
        assert!(!s.runs("memory::load::load_100k_4_members_20_percent_nacks"));
        assert!(!s.runs("memory::tracing::trace_context_travels_with_messages"));
        let s = parse(&["--exact", "memory::delivery::topics_isolated"]);
        assert!(s.runs("memory::delivery::topics_isolated"));
        assert!(!s.runs("memory::delivery::topics_isolated_more"));
    }

    #[test]
    fn listing_and_ignored_runs_run_none_of_them() {
        assert!(!parse(&["--list"]).runs("memory::delivery::topics_isolated"));
        assert!(!parse(&["--ignored"]).runs("memory::delivery::topics_isolated"));
    }

    #[test]
    fn the_prefix_is_the_path_between_crate_and_area() {
        assert_eq!(
            backend_prefix("conformance_memory::memory::ordering"),
            "memory::"
        );
        assert_eq!(backend_prefix("t::suites::kafka::load"), "suites::kafka::");
        assert_eq!(backend_prefix("t::load"), "");
    }

    #[test]
    fn every_scenario_has_a_distinct_name() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all);
        // A guard against a scenario dropped from the list by mistake: raise it with
        // each scenario added.
        assert_eq!(all, 36);
    }
}
