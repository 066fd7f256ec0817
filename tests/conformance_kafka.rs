//! The conformance suite against Kafka (tansu on 127.0.0.1:9092 in CI, started by
//! `scripts/test`), one test per scenario. `SWITCHYARD_KAFKA_URL` overrides the address.
//! Fails when the broker is unreachable: it never skips.

switchyard_conformance::conformance_tests!(kafka, || async {
    let url = std::env::var("SWITCHYARD_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_string());
    switchyard::connect(&url).await
});
