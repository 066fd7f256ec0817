//! The broker's settings.

use std::time::Duration;

use switchyard_core::backend::BrokerUrl;
use switchyard_core::{Error, Result};

/// Settings of a memory broker; also accepted as URL parameters
/// (`memory://name?capacity=1000000&publish_timeout_ms=30000&max_message_size=1048576`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "settings take effect only when passed on"]
pub struct MemoryConfig {
    /// Most messages one topic holds (default 1,048,576).
    pub capacity: usize,
    /// How long a publish waits for room in a full topic (default 30 s).
    pub publish_timeout: Duration,
    /// Largest accepted payload, if limited (default: none).
    pub max_message_size: Option<usize>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 20,
            publish_timeout: Duration::from_secs(30),
            max_message_size: None,
        }
    }
}

impl MemoryConfig {
    /// Sets the per-topic capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets how long a publish waits for room.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the largest accepted payload.
    pub fn max_message_size(mut self, limit: Option<usize>) -> Self {
        self.max_message_size = limit;
        self
    }

    /// The settings a `memory://` URL's parameters give, validated.
    pub(crate) fn from_url(url: &BrokerUrl) -> Result<Self> {
        let mut config = Self::default();
        for (key, _) in &url.params {
            match key.as_str() {
                "capacity" | "publish_timeout_ms" | "max_message_size" => {}
                other => {
                    return Err(Error::config(
                        other,
                        "unknown memory:// setting; known: capacity, publish_timeout_ms, max_message_size",
                    ))
                }
            }
        }
        if let Some(c) = url.param_parse("capacity")? {
            config.capacity = c;
        }
        if let Some(ms) = url.param_parse::<u64>("publish_timeout_ms")? {
            config.publish_timeout = Duration::from_millis(ms);
        }
        if let Some(limit) = url.param_parse("max_message_size")? {
            config.max_message_size = Some(limit);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::config(
                "capacity",
                "must be at least 1 message per topic; the default is 1048576",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(url: &str) -> Result<MemoryConfig> {
        MemoryConfig::from_url(&BrokerUrl::parse(url)?)
    }

    #[test]
    fn url_settings_are_read() {
        let c = from("memory://a?capacity=10&publish_timeout_ms=5&max_message_size=7").ok();
        let want = MemoryConfig::default()
            .capacity(10)
            .publish_timeout(Duration::from_millis(5))
            .max_message_size(Some(7));
        assert_eq!(c, Some(want));
    }

    #[test]
    fn unknown_settings_and_zero_capacity_are_refused() {
        assert!(from("memory://a?capacity=0").is_err());
        assert!(from("memory://a?capacty=10").is_err());
        assert_eq!(from("memory://a").ok(), Some(MemoryConfig::default()));
    }
}
