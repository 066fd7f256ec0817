//! The conformance suite against RabbitMQ (127.0.0.1:5672, guest/guest; `scripts/test`
//! starts it if it is not answering). `SWITCHYARD_AMQP_URL` overrides the address.
//! Fails when the broker is unreachable: it never skips.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_backend_passes_the_conformance_suite() {
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let report = switchyard_conformance::run("rabbitmq", move || {
        let url = url.clone();
        async move { switchyard::connect(&url).await }
    })
    .await;
    report.assert_all_passed();
}
