//! The conformance suite against RabbitMQ (127.0.0.1:5672, guest/guest; `scripts/test`
//! starts it if it is not answering), one test per scenario. `SWITCHYARD_AMQP_URL`
//! overrides the address. Fails when the broker is unreachable: it never skips.

switchyard_conformance::conformance_tests!(rabbitmq, || async {
    let url = std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    switchyard::connect(&url).await
});
