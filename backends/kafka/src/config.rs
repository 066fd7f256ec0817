//! Settings of the Kafka backend, from a `kafka://` URL or built in code.

use std::time::Duration;

use switchyard_core::backend::BrokerUrl;
use switchyard_core::{Error, Guarantee, Result};

/// When the consumer commits the offsets of processed messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitStrategy {
    /// Every `commit_interval`, commit each partition's watermark: the lowest offset
    /// not yet processed (everything below it is done). The default: at-least-once
    /// with few commit round trips; a crash redelivers at most one interval of work.
    #[default]
    Periodic,
    /// Commit the watermark synchronously after every ack, before the ack returns.
    /// At-least-once with the smallest redelivery window after a crash; slow.
    Sync,
    /// At-most-once consumers only: a consumer with [`Guarantee::AtLeastOnce`] (the
    /// default) is refused with an [`Error::Config`] naming both, and one with
    /// [`Guarantee::AtMostOnce`] commits each message before its handler runs, as
    /// [`Sync`](Self::Sync) does. **A crash loses the messages that were being
    /// handled.** Only for data you can afford to lose. (librdkafka's own auto-commit,
    /// of whatever was *received*, would also hand out again up to
    /// `auto.commit.interval.ms` of handled messages after a crash: it is neither
    /// at-most-once nor at-least-once, so it is not used.)
    Auto,
}

/// The producer's durability (`delivery=`). Independent of the consumer's
/// [`Guarantee`], which decides when received messages are committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryGuarantee {
    /// `acks=all` with the idempotent producer: `publish` resolves once every in-sync
    /// replica has the record, and retries never duplicate or reorder it. The default.
    #[default]
    AtLeastOnce,
    /// `acks=0`: fire and forget. `publish` resolves once the record was sent; the
    /// broker never confirms it and the receipt has no offset.
    AtMostOnce,
}

/// Settings of a [`KafkaBroker`](crate::KafkaBroker).
///
/// From a URL, `kafka://host:port[,host:port][?setting=value&...]`:
///
/// | setting | default | meaning |
/// |---|---|---|
/// | `partitions` | 8 | partitions of topics switchyard creates |
/// | `replication` | 1 | replication factor of topics switchyard creates |
/// | `create_topics` | true | create missing topics; `false` makes a missing topic an error |
/// | `commit` | `periodic` | `periodic`, `sync` or `auto` (see [`CommitStrategy`]; a [`Guarantee::AtMostOnce`] consumer always commits as `sync`) |
/// | `commit_interval_ms` | 1000 | period of `commit=periodic` |
/// | `delivery` | `at-least-once` | or `at-most-once` (see [`DeliveryGuarantee`]) |
/// | `publish_timeout_ms` | 30000 | how long a publish may take, retries included (librdkafka `message.timeout.ms`) |
/// | `max_message_size` | 1000000 | largest record; larger ones fail with `Error::MessageTooLarge` (librdkafka `message.max.bytes`) |
/// | `join_timeout_ms` | 60000 | how long `subscribe` waits for the group to assign partitions |
/// | `revoke_timeout_ms` | 10000 | on a rebalance, how long in-flight messages of revoked partitions may take before their partitions are released anyway |
/// | `assign_delay_ms` | 1000 | before reading a partition this member did not own just before, wait this long so its previous owner can finish and commit (see below) |
///
/// Any other setting whose name contains a dot is handed to librdkafka unchanged
/// (`security.protocol`, `sasl.mechanism`, `sasl.username`, `ssl.ca.location`,
/// `session.timeout.ms`, `linger.ms`, ...), so TLS and SASL need no code. Any other
/// name is an [`Error::Config`] naming it. `queued.max.messages.kbytes` also bounds
/// what a member buffers itself (received, not yet handed out) before it pauses fetching
/// (default 64 MiB).
///
/// `assign_delay_ms` exists for brokers whose group coordinator hands a partition to its
/// new owner before the old owner has revoked it (tansu 0.6 does: it completes a
/// rebalance without waiting for every member to rejoin). Without the delay both
/// members would handle the partition's uncommitted messages; with it, the old owner
/// notices the rebalance (within a heartbeat), commits, and lets go first. Apache Kafka
/// keeps that order itself, so `assign_delay_ms=0` is safe there.
///
/// Defaults switchyard sets for librdkafka (override them by URL): `session.timeout.ms=6000`
/// and `heartbeat.interval.ms=1000` (a dead member's partitions move on after 6 s rather
/// than 45 s, and members notice rebalances quickly),
/// `linger.ms=5`, and `partitioner=murmur2_random` (the Java client's partitioner, so a
/// key lands on the same partition whichever client published it).
///
/// Credentials go in settings (`sasl.username=…&sasl.password=…`, percent-encoded), not
/// before the host: a `kafka://user:pass@host` URL is an [`Error::Config`]. The `Debug`
/// output shows `***` for the values of secret-looking settings (see
/// [`BrokerUrl::is_secret_setting`]).
#[derive(Clone)]
#[non_exhaustive]
#[must_use = "settings take effect only when passed on"]
pub struct KafkaConfig {
    /// `host:port` list, comma separated (librdkafka `bootstrap.servers`).
    pub bootstrap_servers: String,
    /// Partitions of topics switchyard creates.
    pub partitions: i32,
    /// Replication factor of topics switchyard creates.
    pub replication: i32,
    /// Whether missing topics are created.
    pub create_topics: bool,
    /// When offsets are committed.
    pub commit: CommitStrategy,
    /// Period of [`CommitStrategy::Periodic`].
    pub commit_interval: Duration,
    /// Producer durability.
    pub delivery: DeliveryGuarantee,
    /// How long a publish may take before it fails.
    pub publish_timeout: Duration,
    /// Largest record accepted.
    pub max_message_size: usize,
    /// How long `subscribe` waits for its first partition assignment.
    pub join_timeout: Duration,
    /// Bounded wait for in-flight messages of revoked partitions.
    pub revoke_timeout: Duration,
    /// Wait before reading a partition newly assigned to this member.
    pub assign_delay: Duration,
    /// librdkafka settings passed through, applied after switchyard's own.
    pub client: Vec<(String, String)>,
}

/// Without secrets: configs end up in logs.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let client: Vec<(&str, String)> = self
            .client
            .iter()
            .map(|(k, v)| (k.as_str(), BrokerUrl::redact_setting(k, v)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field(
                "bootstrap_servers",
                &switchyard_core::backend::redact(&self.bootstrap_servers),
            )
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("create_topics", &self.create_topics)
            .field("commit", &self.commit)
            .field("commit_interval", &self.commit_interval)
            .field("delivery", &self.delivery)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("join_timeout", &self.join_timeout)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("assign_delay", &self.assign_delay)
            .field("client", &client)
            .finish()
    }
}

impl KafkaConfig {
    /// Defaults for these bootstrap servers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            partitions: 8,
            replication: 1,
            create_topics: true,
            commit: CommitStrategy::Periodic,
            commit_interval: Duration::from_millis(1000),
            delivery: DeliveryGuarantee::AtLeastOnce,
            publish_timeout: Duration::from_secs(30),
            max_message_size: 1_000_000,
            join_timeout: Duration::from_secs(60),
            revoke_timeout: Duration::from_secs(10),
            assign_delay: Duration::from_millis(1000),
            client: Vec::new(),
        }
    }

    /// Parses a `kafka://` URL (see the type's documentation for the settings).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?;
        if parsed.scheme != "kafka" {
            return Err(Error::UnknownScheme {
                scheme: parsed.scheme,
                url: switchyard_core::backend::redact(url),
            });
        }
        // The servers end up in every error message, so credentials must not be among
        // them (nor quoted here: this error names no part of the URL).
        if parsed.authority.contains('@') {
            return Err(Error::config(
                "url",
                "a kafka:// URL takes no user or password before the host: give them as \
                 settings, percent-encoded, e.g. kafka://host:9093?security.protocol=SASL_SSL\
                 &sasl.mechanism=SCRAM-SHA-512&sasl.username=USER&sasl.password=PASSWORD",
            ));
        }
        let servers = parsed.authority.trim_end_matches('/').to_string();
        if servers.is_empty() {
            return Err(Error::config(
                "url",
                "no broker address: write kafka://host:9092 (or kafka://h1:9092,h2:9092)",
            ));
        }
        let mut config = Self::new(servers);
        for (index, (key, value)) in parsed.params.iter().enumerate() {
            if parsed.shown_name(index).is_none() {
                // librdkafka would name it in its refusal.
                return Err(parsed.unknown_setting(index, ""));
            }
            let bad = |what: &str| Error::config(key.as_str(), format!("{value:?} is not {what}"));
            match key.as_str() {
                "partitions" => {
                    config.partitions = value.parse().map_err(|_| bad("a partition count"))?
                }
                "replication" => {
                    config.replication = value.parse().map_err(|_| bad("a replication factor"))?
                }
                "create_topics" => {
                    config.create_topics = value.parse().map_err(|_| bad("true or false"))?
                }
                "commit" => {
                    config.commit = match value.as_str() {
                        "periodic" => CommitStrategy::Periodic,
                        "sync" => CommitStrategy::Sync,
                        "auto" => CommitStrategy::Auto,
                        _ => return Err(bad("one of periodic, sync, auto")),
                    }
                }
                "commit_interval_ms" => {
                    config.commit_interval = millis(value).ok_or_else(|| bad("milliseconds"))?
                }
                "delivery" => {
                    config.delivery = match value.as_str() {
                        "at-least-once" => DeliveryGuarantee::AtLeastOnce,
                        "at-most-once" => DeliveryGuarantee::AtMostOnce,
                        _ => return Err(bad("at-least-once or at-most-once")),
                    }
                }
                "publish_timeout_ms" => {
                    config.publish_timeout = millis(value).ok_or_else(|| bad("milliseconds"))?
                }
                "max_message_size" => {
                    config.max_message_size = value.parse().map_err(|_| bad("a byte count"))?
                }
                "join_timeout_ms" => {
                    config.join_timeout = millis(value).ok_or_else(|| bad("milliseconds"))?
                }
                "revoke_timeout_ms" => {
                    config.revoke_timeout = millis(value).ok_or_else(|| bad("milliseconds"))?
                }
                "assign_delay_ms" => {
                    config.assign_delay = millis(value).ok_or_else(|| bad("milliseconds"))?
                }
                other if other.contains('.') => {
                    config.client.push((other.to_string(), value.clone()))
                }
                _ => {
                    return Err(parsed.unknown_setting(
                        index,
                        "unknown kafka:// setting; switchyard's are partitions, replication, \
                         create_topics, commit, commit_interval_ms, delivery, publish_timeout_ms, \
                         max_message_size, join_timeout_ms, revoke_timeout_ms, assign_delay_ms; librdkafka settings \
                         (names with a dot, such as security.protocol) are passed through",
                    ))
                }
            }
        }
        // librdkafka's verdict on its settings waits for `KafkaBroker::new` (which calls
        // `validate`): which values it accepts depends on how it was built.
        config.check_numbers()?;
        Ok(config)
    }

    /// Without the `tls` feature librdkafka has no OpenSSL: TLS, SCRAM and OAUTHBEARER
    /// would fail with "OpenSSL not available at build time", which does not say what to
    /// change here.
    #[cfg(not(feature = "tls"))]
    fn check_tls_built_in(&self) -> Result<()> {
        for (key, value) in &self.client {
            let value = value.to_ascii_uppercase();
            let needs_tls = match key.as_str() {
                "security.protocol" => value == "SSL" || value == "SASL_SSL",
                "sasl.mechanism" | "sasl.mechanisms" => {
                    value.starts_with("SCRAM-") || value == "OAUTHBEARER"
                }
                other => other.starts_with("ssl."),
            };
            if needs_tls {
                return Err(Error::config(
                    key.as_str(),
                    "needs librdkafka built with OpenSSL: enable switchyard's `kafka-tls` \
                     feature (switchyard-kafka's `tls`; Debian: apt-get install libssl-dev \
                     pkg-config)",
                ));
            }
        }
        Ok(())
    }

    /// Checks numbers that cannot work, and that librdkafka accepts every setting.
    pub fn validate(&self) -> Result<()> {
        self.check_numbers()?;
        #[cfg(not(feature = "tls"))]
        self.check_tls_built_in()?;
        self.check_client_settings()
    }

    /// The settings a subscription with this delivery guarantee runs with:
    /// [`Guarantee::AtMostOnce`] implies `commit=sync` (the runtime acks on receipt, and
    /// each ack commits before the handler runs, so a crash never hands a message out
    /// again); `commit=auto` with [`Guarantee::AtLeastOnce`] is refused.
    pub(crate) fn for_guarantee(&self, guarantee: Guarantee) -> Result<Self> {
        let mut config = self.clone();
        match (guarantee, self.commit) {
            (Guarantee::AtMostOnce, _) => config.commit = CommitStrategy::Sync,
            (_, CommitStrategy::Auto) => {
                return Err(Error::config(
                    "commit",
                    format!(
                        "commit=auto is at-most-once, but this consumer's guarantee is \
                         {guarantee} (Guarantee::AtLeastOnce, the default): use \
                         Consumer::guarantee(Guarantee::AtMostOnce), or commit=periodic or \
                         commit=sync to keep at-least-once"
                    ),
                ))
            }
            _ => {}
        }
        Ok(config)
    }

    fn check_numbers(&self) -> Result<()> {
        if self.partitions < 1 {
            return Err(Error::config("partitions", "must be at least 1"));
        }
        if self.replication < 1 {
            return Err(Error::config("replication", "must be at least 1"));
        }
        if self.max_message_size < 1000 {
            return Err(Error::config(
                "max_message_size",
                "must be at least 1000 bytes (librdkafka's lower bound)",
            ));
        }
        if self.commit_interval.is_zero() {
            return Err(Error::config(
                "commit_interval_ms",
                "must be at least 1; use commit=sync to commit after every message",
            ));
        }
        Ok(())
    }
}

fn millis(value: &str) -> Option<Duration> {
    value.parse::<u64>().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_settings_and_passes_librdkafka_ones_through() {
        let c = KafkaConfig::from_url(
            "kafka://a:9092,b:9092?partitions=3&commit=sync&security.protocol=SASL_SSL&session.timeout.ms=7000",
        )
        .unwrap();
        assert_eq!(c.bootstrap_servers, "a:9092,b:9092");
        assert_eq!(c.partitions, 3);
        assert_eq!(c.commit, CommitStrategy::Sync);
        assert_eq!(
            c.consumer("g", true).get("session.timeout.ms"),
            Some("7000")
        );
        assert_eq!(c.producer().get("security.protocol"), Some("SASL_SSL"));
    }

    #[test]
    fn at_most_once_implies_sync_commits_and_auto_needs_it() {
        for commit in ["periodic", "sync", "auto"] {
            let c = KafkaConfig::from_url(&format!("kafka://h:9092?commit={commit}")).unwrap();
            let amo = c.for_guarantee(Guarantee::AtMostOnce).unwrap();
            assert_eq!(amo.commit, CommitStrategy::Sync, "commit={commit}");
            assert_eq!(
                amo.consumer("g", true).get("enable.auto.commit"),
                Some("false")
            );
        }
        let c = KafkaConfig::from_url("kafka://h:9092?commit=periodic").unwrap();
        let alo = c.for_guarantee(Guarantee::AtLeastOnce).unwrap();
        assert_eq!(alo.commit, CommitStrategy::Periodic);
        let c = KafkaConfig::from_url("kafka://h:9092?commit=auto").unwrap();
        let err = c.for_guarantee(Guarantee::AtLeastOnce).unwrap_err();
        match &err {
            Error::Config { setting, message } => {
                assert_eq!(setting, "commit");
                assert!(message.contains("commit=auto"), "{err}");
                assert!(message.contains("Guarantee::AtMostOnce"), "{err}");
                assert!(message.contains("at-least-once"), "{err}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn unknown_and_bad_settings_name_themselves() {
        let err = KafkaConfig::from_url("kafka://h:9092?partitons=3").unwrap_err();
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "partitons"),
            "{err}"
        );
        let err = KafkaConfig::from_url("kafka://h:9092?commit=never").unwrap_err();
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "commit"),
            "{err}"
        );
        let err = KafkaConfig::from_url("kafka://h:9092?partitions=0").unwrap_err();
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "partitions"),
            "{err}"
        );
        assert!(KafkaConfig::from_url("kafka://").is_err());
    }

    #[test]
    fn a_password_cut_at_a_raw_ampersand_is_not_shown() {
        for url in [
            "kafka://h:9092?sasl.password=Tr0ub&dor",
            "kafka://h:9092?sasl.password=Tr0ub&d.or",
        ] {
            let err = KafkaConfig::from_url(url).unwrap_err().to_string();
            assert!(!err.contains("dor") && !err.contains("d.or"), "{err}");
            assert!(err.contains("%26"), "{err}");
        }
    }

    #[test]
    fn credentials_never_show_in_errors_or_debug() {
        for url in [
            "kafka://user:hunter22@h:9092",
            "kafka://user:hun/ter22@h:9092",
            "kafka://user:hun%2Fter22@h:9092",
            "kafka://user:hun#ter22@h:9092",
            "kafka://user:hun?ter22@h:9092",
            "kafka://hunter22@h:9092",
        ] {
            let err = KafkaConfig::from_url(url).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("ter22"), "{url}: {shown}");
            assert!(
                matches!(&err, Error::Config { setting, .. } if setting == "url"),
                "{url}: {err}"
            );
            assert!(
                shown.contains("sasl.password=") || shown.contains("percent-encoded"),
                "{shown}"
            );
        }
        let c = KafkaConfig::from_url(
            "kafka://h:9092?security.protocol=SASL_SSL&sasl.username=ann&sasl.password=hunter22\
             &ssl.key.password=k3ypass&sasl.oauthbearer.client.secret=s3cret&linger.ms=7",
        )
        .unwrap();
        assert_eq!(c.producer().get("sasl.password"), Some("hunter22"));
        let shown = format!("{c:?}");
        for secret in ["ann", "hunter22", "k3ypass", "s3cret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("\"linger.ms\", \"7\""), "{shown}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
        // librdkafka's own message for a rejected value would quote it.
        for url in [
            "kafka://h:9092?ssl.key.password=hunter22&compression.codec=nope",
            "kafka://h:9092?compression.codec=hunter22",
            "kafka://h:9092?sasl.oauthbearer.client.secret=hunter22&no.such.setting=1",
        ] {
            let err = KafkaConfig::from_url(url).unwrap().validate().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{url}: {err}");
            if !url.contains("codec=hunter22") {
                assert!(!format!("{err} {err:?}").contains("hunter22"), "{err}");
            }
        }
        let err = KafkaConfig::from_url("kafka://h:9092?compression.codec=nope")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "compression.codec"),
            "{err}"
        );
        let c = KafkaConfig::new("user:hunter22@h:9092");
        assert!(!format!("{c:?}").contains("hunter22"), "{c:?}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_settings_name_the_feature_they_need() {
        for (url, setting) in [
            (
                "kafka://h:9093?security.protocol=SASL_SSL",
                "security.protocol",
            ),
            ("kafka://h:9093?security.protocol=ssl", "security.protocol"),
            (
                "kafka://h:9092?sasl.mechanism=SCRAM-SHA-512",
                "sasl.mechanism",
            ),
            (
                "kafka://h:9093?ssl.ca.location=/etc/ca.pem",
                "ssl.ca.location",
            ),
        ] {
            let err = KafkaConfig::from_url(url).unwrap().validate().unwrap_err();
            match &err {
                Error::Config {
                    setting: s,
                    message,
                } => {
                    assert_eq!(s, setting, "{url}: {err}");
                    assert!(message.contains("kafka-tls"), "{url}: {err}");
                }
                other => panic!("{url}: {other}"),
            }
        }
        let plain = "kafka://h:9092?security.protocol=SASL_PLAINTEXT&sasl.mechanism=PLAIN";
        KafkaConfig::from_url(plain).unwrap().validate().unwrap();
    }
}
