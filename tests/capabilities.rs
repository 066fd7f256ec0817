//! The README's capability table matches what each compiled-in backend declares.
//! Broker backends are connected (their brokers run under `scripts/test`).

use std::collections::HashMap;

use switchyard::Capabilities;

/// `capability -> backend -> yes/no`, from the table between the README's markers.
fn readme_table() -> HashMap<String, HashMap<String, bool>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- capabilities:start -->")
        .expect("start marker");
    let end = readme
        .find("<!-- capabilities:end -->")
        .expect("end marker");
    let rows: Vec<Vec<String>> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let header = &rows[0];
    let mut table = HashMap::new();
    for row in &rows[1..] {
        let mut per_backend = HashMap::new();
        for (backend, cell) in header[1..].iter().zip(&row[1..]) {
            let value = match cell.as_str() {
                "yes" => true,
                "no" => false,
                other => panic!("README capability cell {other:?} is not yes/no"),
            };
            per_backend.insert(backend.clone(), value);
        }
        table.insert(row[0].clone(), per_backend);
    }
    table
}

fn check(backend: &str, caps: &Capabilities) {
    let table = readme_table();
    let declared = [
        ("replay", caps.replay),
        ("persistent", caps.persistent),
        ("per_key_order", caps.per_key_order),
        ("durable_attempts", caps.durable_attempts),
        ("native_dead_letter", caps.native_dead_letter),
        ("delayed_delivery", caps.delayed_delivery),
    ];
    assert_eq!(
        table.len(),
        declared.len(),
        "the README table has rows the test does not know"
    );
    for (name, value) in declared {
        let documented = table[name][backend];
        assert_eq!(
            documented, value,
            "README says {backend} {name} = {documented}, the code says {value}"
        );
    }
}

#[tokio::test]
async fn memory_matches_the_readme() {
    let broker = switchyard::connect("memory://capabilities").await.unwrap();
    check("memory", &broker.capabilities());
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn kafka_matches_the_readme() {
    let url =
        std::env::var("SWITCHYARD_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let broker = switchyard::connect(&url)
        .await
        .expect("Kafka must be reachable (scripts/test starts tansu)");
    check("kafka", &broker.capabilities());
}

#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn rabbitmq_matches_the_readme() {
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let broker = switchyard::connect(&url)
        .await
        .expect("RabbitMQ must be reachable");
    check("rabbitmq", &broker.capabilities());
}
