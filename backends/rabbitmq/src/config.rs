//! Settings, from the URL's query string.

use std::time::Duration;

use switchyard_core::{BrokerUrl, Error, Result};

/// Settings of the RabbitMQ backend. Given as URL parameters:
/// `amqp://user:pass@host:5672/vhost?partitions=8&max_message_size=134217728&confirm_timeout_ms=30000&rebalance_ms=250&dead_letter_exchange=name&connection_name=switchyard`.
/// lapin's own parameters (`heartbeat`, `connection_timeout`, `channel_max`,
/// `frame_max`, `auth_mechanism`) pass through to it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// The URL lapin connects to (without switchyard's parameters).
    pub(crate) amqp_url: String,
    /// The URL with the password hidden, for messages.
    pub redacted_url: String,
    /// Partition queues per group (a power of two, 1 to 1024; default 8). At most this
    /// many members of a group do work at once; every member of a group must agree.
    pub partitions: u32,
    /// Largest accepted payload in bytes (default 128 MiB, RabbitMQ 3.10's own limit).
    pub max_message_size: usize,
    /// How long a publish waits for the broker's confirm (default 30 s).
    pub confirm_timeout: Duration,
    /// How often a member re-checks its share of partitions (default 250 ms).
    pub rebalance_interval: Duration,
    /// Exchange that rejected messages are dead-lettered to, if any (declared as a
    /// durable topic exchange; bind your dead-letter queue to it).
    pub dead_letter_exchange: Option<String>,
    /// Prefix of the connection names the broker shows (default "switchyard"), e.g.
    /// "switchyard publisher", "switchyard orders email".
    pub connection_name: String,
}

const OURS: &[&str] = &[
    "partitions",
    "max_message_size",
    "confirm_timeout_ms",
    "rebalance_ms",
    "dead_letter_exchange",
    "connection_name",
];
const LAPIN: &[&str] = &[
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
];

impl RabbitConfig {
    /// Parses an `amqp://` or `amqps://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?;
        if parsed.scheme != "amqp" && parsed.scheme != "amqps" {
            return Err(Error::UnknownScheme {
                scheme: parsed.scheme,
                url: switchyard_core::redact(url),
            });
        }
        let mut passthrough = Vec::new();
        for (key, value) in &parsed.params {
            if LAPIN.contains(&key.as_str()) {
                passthrough.push(format!("{key}={value}"));
            } else if !OURS.contains(&key.as_str()) {
                return Err(Error::config(
                    key.as_str(),
                    format!(
                        "unknown amqp:// setting; known: {} (switchyard) and {} (lapin)",
                        OURS.join(", "),
                        LAPIN.join(", ")
                    ),
                ));
            }
        }
        let base = url.split_once('?').map_or(url, |(b, _)| b);
        let amqp_url = if passthrough.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", passthrough.join("&"))
        };
        let partitions = parsed.param_parse::<u32>("partitions")?.unwrap_or(8);
        if partitions == 0 || partitions > 1024 || !partitions.is_power_of_two() {
            return Err(Error::config(
                "partitions",
                format!("{partitions} is not a power of two from 1 to 1024 (default 8)"),
            ));
        }
        let max_message_size = parsed
            .param_parse::<usize>("max_message_size")?
            .unwrap_or(128 << 20);
        let confirm_timeout = Duration::from_millis(
            parsed
                .param_parse::<u64>("confirm_timeout_ms")?
                .unwrap_or(30_000),
        );
        let rebalance_interval =
            Duration::from_millis(parsed.param_parse::<u64>("rebalance_ms")?.unwrap_or(250));
        if rebalance_interval.is_zero() {
            return Err(Error::config("rebalance_ms", "must be at least 1"));
        }
        let dead_letter_exchange = parsed.param("dead_letter_exchange").map(str::to_string);
        if let Some(dlx) = &dead_letter_exchange {
            switchyard_core::validate_name("topic", dlx)?;
        }
        let connection_name = parsed
            .param("connection_name")
            .unwrap_or("switchyard")
            .to_string();
        Ok(Self {
            connection_name,
            amqp_url,
            redacted_url: switchyard_core::redact(url),
            partitions,
            max_message_size,
            confirm_timeout,
            rebalance_interval,
            dead_letter_exchange,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_settings_and_rejects_bad_ones() {
        let c = RabbitConfig::from_url("amqp://g:p@h:5672/%2f?partitions=4&heartbeat=10").unwrap();
        assert_eq!(c.partitions, 4);
        assert_eq!(c.amqp_url, "amqp://g:p@h:5672/%2f?heartbeat=10");
        assert!(!c.redacted_url.contains(":p@"));
        for bad in ["partitions=3", "partitions=0", "nope=1", "rebalance_ms=0"] {
            let err = RabbitConfig::from_url(&format!("amqp://h/?{bad}")).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
        }
    }
}
