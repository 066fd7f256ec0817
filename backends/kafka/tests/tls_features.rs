//! With the `tls` feature, librdkafka must be built with OpenSSL and the SASL
//! mechanisms managed Kafka services ask for: its `builtin.features` lists them. A
//! librdkafka without them fails only when a TLS URL is used, far from the build.

use rdkafka::config::ClientConfig;

#[test]
fn librdkafka_is_built_with_ssl_and_sasl() {
    let features = ClientConfig::new()
        .create_native_config()
        .expect("a default librdkafka configuration")
        .get("builtin.features")
        .expect("librdkafka names its builtin.features");
    let features: Vec<&str> = features.split(',').collect();
    for needed in ["ssl", "sasl_plain", "sasl_scram", "sasl_oauthbearer"] {
        assert!(
            features.contains(&needed),
            "librdkafka lacks {needed}: builtin.features = {features:?}"
        );
    }
}

#[test]
fn a_tls_url_is_accepted() {
    let config = switchyard_kafka::KafkaConfig::from_url(
        "kafka://127.0.0.1:9093?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512\
         &sasl.username=ann&sasl.password=hunter22",
    )
    .unwrap();
    config
        .validate()
        .expect("librdkafka accepts SASL_SSL and SCRAM");
}
