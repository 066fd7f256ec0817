//! The librdkafka client settings the Kafka backend's settings become, and
//! librdkafka's verdict on them with secret values hidden.

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use switchyard_core::backend::BrokerUrl;
use switchyard_core::{Error, Result};

use crate::config::{CommitStrategy, DeliveryGuarantee, KafkaConfig};

impl KafkaConfig {
    /// librdkafka's own rejection of a setting quotes its value, secret or not: try the
    /// settings here first, so the error names the setting and hides a secret value.
    pub(crate) fn check_client_settings(&self) -> Result<()> {
        for c in [self.producer(), self.consumer("switchyard-check", false)] {
            match c.create_native_config() {
                Ok(_) => {}
                Err(KafkaError::ClientConfig(_, desc, key, value)) => {
                    let desc = if value.is_empty() {
                        desc
                    } else {
                        desc.replace(&value, &BrokerUrl::redact_setting(&key, &value))
                    };
                    return Err(Error::config(
                        key.as_str(),
                        format!(
                            "librdkafka rejects {:?}: {desc}",
                            BrokerUrl::redact_setting(&key, &value)
                        ),
                    ));
                }
                Err(_) => {
                    return Err(Error::config(
                        "url",
                        "librdkafka rejects a setting (one holds a NUL character)",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Settings shared by the producer, the consumers and the admin client.
    pub(crate) fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        c.set("message.max.bytes", self.max_message_size.to_string());
        c
    }

    /// Applies the pass-through settings last, so they win over switchyard's defaults.
    pub(crate) fn apply_client(&self, c: &mut ClientConfig) {
        for (k, v) in &self.client {
            c.set(k, v);
        }
    }

    /// The producer's librdkafka settings.
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("linger.ms", "5");
        c.set("partitioner", "murmur2_random");
        c.set(
            "message.timeout.ms",
            self.publish_timeout.as_millis().to_string(),
        );
        match self.delivery {
            DeliveryGuarantee::AtLeastOnce => {
                c.set("acks", "all");
                c.set("enable.idempotence", "true");
            }
            DeliveryGuarantee::AtMostOnce => {
                c.set("acks", "0");
                c.set("enable.idempotence", "false");
            }
        }
        self.apply_client(&mut c);
        c
    }

    /// The consumer's librdkafka settings for one group member.
    pub(crate) fn consumer(&self, group: &str, earliest: bool) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group);
        c.set("session.timeout.ms", "6000");
        c.set("heartbeat.interval.ms", "1000");
        c.set(
            "auto.offset.reset",
            if earliest { "earliest" } else { "latest" },
        );
        c.set("enable.partition.eof", "false");
        match self.commit {
            CommitStrategy::Auto => {
                c.set("enable.auto.commit", "true");
                c.set("enable.auto.offset.store", "true");
            }
            _ => {
                c.set("enable.auto.commit", "false");
                c.set("enable.auto.offset.store", "false");
            }
        }
        self.apply_client(&mut c);
        c
    }
}

/// A librdkafka error as text, with the value of a rejected secret setting hidden
/// (librdkafka's own message quotes it).
pub(crate) fn describe_client_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) if !value.is_empty() => {
            let hidden = BrokerUrl::redact_setting(key, value);
            format!("{}: {}", key, desc.replace(value.as_str(), &hidden))
        }
        other => switchyard_core::backend::redact(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_secret_setting_is_described_without_its_value() {
        let e = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"Hunter2Secret\" for configuration property \"ssl.key.password\""
                .into(),
            "ssl.key.password".into(),
            "Hunter2Secret".into(),
        );
        let text = describe_client_error(&e);
        assert!(!text.contains("Hunter2Secret"), "{text}");
        assert!(text.contains("ssl.key.password"), "{text}");
    }
}
