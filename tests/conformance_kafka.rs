//! The conformance suite against Kafka (tansu on 127.0.0.1:9092 in CI, started by
//! `scripts/test`). `SWITCHYARD_KAFKA_URL` overrides the address. Fails when the broker
//! is unreachable: it never skips.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_backend_passes_the_conformance_suite() {
    let url = std::env::var("SWITCHYARD_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_string());
    let report = switchyard_conformance::run("kafka", move || {
        let url = url.clone();
        async move { switchyard::connect(&url).await }
    })
    .await;
    report.assert_all_passed();
}
