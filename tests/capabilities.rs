//! The documented capability table matches what each compiled-in backend declares.
//! The table sits between `<!-- capabilities:start -->` and `<!-- capabilities:end -->`
//! in exactly one of README.md and the Markdown files under docs/, wherever it moves.
//! Broker backends are connected (their brokers run under `scripts/test`).
#![cfg(any(feature = "memory", feature = "kafka", feature = "rabbitmq"))]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use switchyard::Capabilities;

const START: &str = "<!-- capabilities:start -->";
const END: &str = "<!-- capabilities:end -->";

/// `capability -> backend -> yes/no`.
type Table = HashMap<String, HashMap<String, bool>>;

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("list docs/").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                found.push(path);
            }
        }
    }
    found
}

/// The one document holding the table, and the text between its markers.
fn table_text() -> (PathBuf, String) {
    let mut holders = Vec::new();
    for path in documents() {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if let Some(start) = text.find(START) {
            let end = text[start..]
                .find(END)
                .unwrap_or_else(|| panic!("{} has {START} but no {END}", path.display()));
            holders.push((path, text[start + START.len()..start + end].to_string()));
        }
    }
    assert_eq!(
        holders.len(),
        1,
        "exactly one of README.md and docs/**/*.md must hold the capability table; found {:?}",
        holders.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    holders.remove(0)
}

/// Parses a Markdown table of `capability | backend… ` rows with yes/no cells.
fn parse(text: &str) -> Table {
    let rows: Vec<Vec<String>> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let (header, body) = rows
        .split_first()
        .expect("the capability table has no rows");
    let mut table = HashMap::new();
    for row in body {
        assert_eq!(
            row.len(),
            header.len(),
            "capability row {row:?} does not match the header {header:?}"
        );
        let mut per_backend = HashMap::new();
        for (backend, cell) in header[1..].iter().zip(&row[1..]) {
            let value = match cell.as_str() {
                "yes" => true,
                "no" => false,
                other => panic!("capability cell {other:?} is not yes/no"),
            };
            per_backend.insert(backend.clone(), value);
        }
        table.insert(row[0].clone(), per_backend);
    }
    table
}

fn check(backend: &str, caps: &Capabilities) {
    let (path, text) = table_text();
    compare(&path, &parse(&text), backend, caps);
}

/// Panics, naming `path`, where `table` and `caps` disagree for `backend`.
fn compare(path: &Path, table: &Table, backend: &str, caps: &Capabilities) {
    let declared = [
        ("replay", caps.replay),
        ("persistent", caps.persistent),
        ("per_key_order", caps.per_key_order),
        ("durable_delivery_counts", caps.durable_delivery_counts),
        ("native_dead_letter", caps.native_dead_letter),
        ("delayed_delivery", caps.delayed_delivery),
        ("request_reply", caps.request_reply),
        ("at_most_once", caps.at_most_once),
        ("scheduled_publish", caps.scheduled_publish),
    ];
    assert_eq!(
        table.len(),
        declared.len(),
        "{} has capability rows the test does not know",
        path.display()
    );
    for (name, value) in declared {
        let documented = table
            .get(name)
            .unwrap_or_else(|| panic!("{} has no {name} row", path.display()))
            .get(backend)
            .unwrap_or_else(|| panic!("{} has no {backend} column", path.display()));
        assert_eq!(
            *documented,
            value,
            "{} says {backend} {name} = {documented}, the code says {value}",
            path.display()
        );
    }
}

/// The comparison itself: the documented table with one memory cell flipped must fail.
#[cfg(feature = "memory")]
#[test]
#[should_panic(expected = "the code says")]
fn a_table_that_disagrees_with_the_code_fails() {
    use switchyard::Broker;
    let caps = switchyard::memory::MemoryBroker::new().capabilities();
    let (path, text) = table_text();
    let mut table = parse(&text);
    let cell = table
        .get_mut("replay")
        .and_then(|row| row.get_mut("memory"))
        .expect("the table has a replay row with a memory column");
    *cell = !*cell;
    compare(&path, &table, "memory", &caps);
}

#[cfg(feature = "memory")]
#[tokio::test]
async fn memory_matches_the_docs() {
    let broker = switchyard::connect("memory://capabilities").await.unwrap();
    check("memory", &broker.capabilities());
}

#[cfg(all(feature = "kafka", feature = "broker-tests"))]
#[tokio::test]
async fn kafka_matches_the_docs() {
    let url =
        std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let broker = switchyard::connect(&url)
        .await
        .expect("Kafka must be reachable (scripts/test starts tansu)");
    check("kafka", &broker.capabilities());
}

#[cfg(all(feature = "rabbitmq", feature = "broker-tests"))]
#[tokio::test]
async fn rabbitmq_matches_the_docs() {
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let broker = switchyard::connect(&url)
        .await
        .expect("RabbitMQ must be reachable");
    check("rabbitmq", &broker.capabilities());
}
