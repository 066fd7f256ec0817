//! Settings, from the URL's query string.

use std::time::Duration;

use switchyard_core::backend::BrokerUrl;
use switchyard_core::{Error, Result};

use crate::tls::{self, TlsSettings};

/// Settings of the RabbitMQ backend. Given as URL parameters:
/// `amqp://user:pass@host:5672/vhost?partitions=8&max_message_size=134217728&confirm_timeout_ms=30000&rebalance_ms=250&dead_letter_exchange=name&connection_name=switchyard&management_url=http://host:15672`.
/// lapin's own parameters (`heartbeat`, `connection_timeout`, `channel_max`,
/// `frame_max`, `auth_mechanism`) pass through to it.
///
/// `amqps://` URLs take TLS settings (rustls; refused on `amqp://`):
/// - `tls_ca_file`: PEM file of the certificate authorities to trust *instead of* the
///   system's (a private CA);
/// - `tls_cert_file` and `tls_key_file`: PEM files of a client certificate (chain) and
///   its unencrypted private key, for mutual TLS (and the broker's EXTERNAL login);
/// - `tls_server_name`: the name the broker's certificate must carry, when it is not
///   the URL's host (connecting by IP address, or through a tunnel).
///
/// The files are checked when the URL is parsed and read again at every connection
/// (rotated certificates apply at the next reconnect).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "settings take effect only when passed on"]
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
    /// How long a publish may go without a confirm from the broker, reconnects included,
    /// before it fails with a transient error (default 30 s).
    pub confirm_timeout: Duration,
    /// How often a member re-checks its share of partitions (default 250 ms).
    pub rebalance_interval: Duration,
    /// Exchange that rejected messages are dead-lettered to, if any (declared as a
    /// durable topic exchange; bind your dead-letter queue to it).
    pub dead_letter_exchange: Option<String>,
    /// Prefix of the connection names the broker shows (default "switchyard"), e.g.
    /// "switchyard publisher", "switchyard orders email".
    pub connection_name: String,
    /// Where the management plugin's HTTP API listens, for listing topics (AMQP cannot
    /// list objects). Default: `http://<amqp host>:15672` (`https://<host>:15671` for
    /// `amqps://`). It authenticates with the AMQP URL's user and password unless this
    /// URL carries its own (`http://user:pass@host:15672`).
    ///
    /// The default `http://` sends that password in the clear, so listing topics refuses
    /// it for a host other than the loopback one: give `management_url=` explicitly
    /// (`https://host:15671`, or `http://…` to accept the risk), or use `amqps://`.
    pub management_url: String,
    /// Whether `management_url` was given rather than derived from the AMQP URL.
    pub(crate) management_explicit: bool,
    /// The AMQP URL's user, password and virtual host, for the management API.
    pub(crate) credentials: (String, String),
    pub(crate) vhost: String,
    /// TLS settings (`amqps://` only).
    pub(crate) tls: TlsSettings,
    /// The name the broker's certificate is checked against.
    tls_name: String,
}

/// Without the user and password: configs end up in logs.
impl std::fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url)
            .field("partitions", &self.partitions)
            .field("max_message_size", &self.max_message_size)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("rebalance_interval", &self.rebalance_interval)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("connection_name", &self.connection_name)
            .field(
                "management_url",
                &switchyard_core::backend::redact(&self.management_url),
            )
            .field("vhost", &self.vhost)
            .field("tls", &self.tls)
            .finish()
    }
}

const OURS: &[&str] = &[
    "partitions",
    "max_message_size",
    "confirm_timeout_ms",
    "rebalance_ms",
    "dead_letter_exchange",
    "connection_name",
    "management_url",
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
                url: switchyard_core::backend::redact(url),
            });
        }
        let mut passthrough = Vec::new();
        for (index, (key, value)) in parsed.params.iter().enumerate() {
            if LAPIN.contains(&key.as_str()) {
                passthrough.push(format!("{key}={value}"));
            } else if !OURS.contains(&key.as_str()) && !tls::SETTINGS.contains(&key.as_str()) {
                if value.contains('@') && !parsed.authority.contains('@') {
                    // `amqp://user:pa?ss@host`: the "setting" is the password's tail.
                    return Err(Error::config(
                        "url",
                        "the query string holds an '@' and the host part none: a user or \
                         password containing '?' must be percent-encoded (%3F)",
                    ));
                }
                return Err(parsed.unknown_setting(
                    index,
                    &format!(
                        "unknown amqp:// setting; known: {}, {} (switchyard) and {} (lapin)",
                        OURS.join(", "),
                        tls::SETTINGS.join(", "),
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
        if let Some(frame_max) = parsed.param_parse::<u32>("frame_max")? {
            check_frame_max(frame_max, "frame_max")?;
        }
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
            switchyard_core::backend::validate_name("topic", dlx)?;
        }
        let connection_name = parsed
            .param("connection_name")
            .unwrap_or("switchyard")
            .to_string();
        let target = AmqpTarget::parse(&parsed.authority)?;
        let tls = TlsSettings::from_url(&parsed)?;
        let tls_name = tls
            .server_name(target.host.trim_start_matches('[').trim_end_matches(']'))
            .to_string();
        let management_explicit = parsed.param("management_url").is_some();
        let management_url = match parsed.param("management_url") {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                u.trim_end_matches('/').to_string()
            }
            Some(u) => {
                return Err(Error::config(
                    "management_url",
                    format!(
                        "{:?} is not an http:// or https:// URL",
                        switchyard_core::backend::redact(u)
                    ),
                ))
            }
            None if parsed.scheme == "amqps" => format!("https://{}:15671", target.host),
            None => format!("http://{}:15672", target.host),
        };
        Ok(Self {
            management_url,
            management_explicit,
            credentials: (target.user, target.password),
            vhost: target.vhost,
            tls,
            tls_name,
            connection_name,
            amqp_url,
            redacted_url: switchyard_core::backend::redact(url),
            partitions,
            max_message_size,
            confirm_timeout,
            rebalance_interval,
            dead_letter_exchange,
        })
    }
}

impl RabbitConfig {
    /// Whether connections go through TLS (`amqps://`).
    pub(crate) fn is_tls(&self) -> bool {
        self.amqp_url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
    }

    /// The name the broker's certificate is checked against: `tls_server_name`, or
    /// the URL's host.
    pub(crate) fn tls_server_name(&self) -> &str {
        &self.tls_name
    }
}

/// What the management API needs from the AMQP URL, read the way lapin reads it:
/// user and password (default guest/guest), host, and virtual host (no path: "/").
struct AmqpTarget {
    user: String,
    password: String,
    host: String,
    vhost: String,
}

impl AmqpTarget {
    fn parse(authority: &str) -> Result<Self> {
        // An '@' after the first '/', or a '#' before the last '@', is a user or password
        // with a raw '/', '?' or '#': lapin would read a different host, and the pieces
        // of the password would show up as a host or virtual host in messages.
        let ambiguous = match authority.rfind('@') {
            Some(at) => {
                authority.find('/').is_some_and(|slash| slash < at) || authority[..at].contains('#')
            }
            None => false,
        };
        if ambiguous {
            return Err(Error::config(
                "url",
                "the amqp:// URL's user or password holds a raw '/', '?', '#' or '@' (or its \
                 virtual host an '@'): percent-encode them (%2F, %3F, %23, %40)",
            ));
        }
        let (server, path) = match authority.split_once('/') {
            Some((s, p)) => (s, Some(p)),
            None => (authority, None),
        };
        let (userinfo, hostport) = match server.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, server),
        };
        let (user, password) = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, "guest"));
                (percent_decode(user)?, percent_decode(pass)?)
            }
            None => ("guest".to_string(), "guest".to_string()),
        };
        let host = if hostport.starts_with('[') {
            // An IPv6 literal keeps its brackets, as URLs need them.
            hostport.find(']').map_or(hostport, |end| &hostport[..=end])
        } else {
            hostport.split(':').next().unwrap_or(hostport)
        };
        let host = if host.is_empty() { "localhost" } else { host };
        let vhost = match path {
            None => "/".to_string(),
            Some(p) => percent_decode(p)?,
        };
        Ok(Self {
            user,
            password,
            host: host.to_string(),
            vhost,
        })
    }
}

/// Decodes a part of the URL strictly: a '%' without two hex digits after it, or bytes
/// that are not UTF-8, are errors rather than guesses at what the user meant.
fn percent_decode(s: &str) -> Result<String> {
    let bad_escape = s.split('%').skip(1).any(|rest| {
        !rest
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return Err(Error::config(
            "url",
            "bad percent escape in the amqp:// URL",
        ));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| Error::config("url", "the amqp:// URL is not UTF-8"))
}

/// Refuses a frame size below RabbitMQ's default: the codec lets a message's headers
/// fill one default frame ([`crate::codec::MAX_PROPERTY_BYTES`]), and a header frame
/// larger than the connection's `frame_max` makes the broker (or lapin, receiving)
/// close the connection, again on every redelivery. `0` leaves the choice to the
/// broker, which [`crate::connection`] checks once connected.
pub(crate) fn check_frame_max(frame_max: u32, setting: &str) -> Result<()> {
    const DEFAULT: u32 = 131_072;
    if frame_max != 0 && frame_max < DEFAULT {
        return Err(Error::config(
            setting,
            format!(
                "{frame_max} is below {DEFAULT}: a message's headers may take up to one \
                 {DEFAULT}-byte frame, and a larger header frame closes the connection; \
                 leave frame_max out, or set it to {DEFAULT} or more"
            ),
        ));
    }
    Ok(())
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
        assert!(!format!("{c:?}").contains(":p@"), "{c:?}");
        for bad in [
            "partitions=3",
            "partitions=0",
            "nope=1",
            "rebalance_ms=0",
            "management_url=ftp://h",
        ] {
            let err = RabbitConfig::from_url(&format!("amqp://h/?{bad}")).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn a_frame_max_below_the_default_is_refused() {
        let err = RabbitConfig::from_url("amqp://h/%2f?frame_max=8192").unwrap_err();
        assert!(
            matches!(&err, Error::Config { setting, .. } if setting == "frame_max"),
            "{err}"
        );
        for ok in ["frame_max=131072", "frame_max=0", "frame_max=1048576"] {
            assert!(
                RabbitConfig::from_url(&format!("amqp://h/%2f?{ok}")).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn a_password_cut_at_a_raw_question_mark_or_ampersand_is_not_shown() {
        for url in [
            "amqp://ann:ab?cd=ef@h/%2f",
            "amqps://h/%2f?tls_key_file=ab&cd",
        ] {
            let err = RabbitConfig::from_url(url).unwrap_err().to_string();
            assert!(!err.contains("cd") && !err.contains("ef"), "{url}: {err}");
        }
    }

    #[test]
    fn tls_settings_are_checked_and_need_amqps() {
        for (url, setting, says) in [
            (
                "amqp://h/%2f?tls_server_name=h",
                "tls_server_name",
                "amqps://",
            ),
            (
                "amqps://h/%2f?tls_ca_file=/nonexistent/ca.pem",
                "tls_ca_file",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                "amqps://h/%2f?tls_key_file=/k.pem",
                "tls_cert_file",
                "needs tls_cert_file",
            ),
            (
                "amqps://h/%2f?tls_server_name=a%20b",
                "tls_server_name",
                "DNS name",
            ),
        ] {
            match RabbitConfig::from_url(url) {
                Err(Error::Config {
                    setting: s,
                    message,
                }) => {
                    assert_eq!(s, setting, "{url}: {message}");
                    assert!(message.contains(says), "{url}: {message}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        let c = RabbitConfig::from_url("amqps://h/%2f?tls_server_name=rabbit.example").unwrap();
        assert!(c.is_tls());
        assert_eq!(c.tls_server_name(), "rabbit.example");
        let c = RabbitConfig::from_url("AMQPS://[::1]/%2f").unwrap();
        assert!(c.is_tls());
        assert_eq!(c.tls_server_name(), "::1");
        assert!(!RabbitConfig::from_url("amqp://h/%2f").unwrap().is_tls());
    }

    #[test]
    fn management_defaults_follow_the_amqp_url() {
        let c = RabbitConfig::from_url("amqp://u%40x:p%2Fw@rabbit.example:5673/my%2Fvh").unwrap();
        assert_eq!(c.management_url, "http://rabbit.example:15672");
        assert_eq!(c.credentials, ("u@x".into(), "p/w".into()));
        assert_eq!(c.vhost, "my/vh");
        let c = RabbitConfig::from_url("amqps://h").unwrap();
        assert_eq!(c.management_url, "https://h:15671");
        assert_eq!(c.credentials, ("guest".into(), "guest".into()));
        assert_eq!(c.vhost, "/");
        let c = RabbitConfig::from_url("amqp://[::1]:5672/%2f").unwrap();
        assert_eq!(c.management_url, "http://[::1]:15672");
        assert_eq!(c.vhost, "/");
        let c = RabbitConfig::from_url(
            "amqp://g:g@h/%2f?management_url=https%3A%2F%2Fadmin.example%3A8443%2F",
        )
        .unwrap();
        assert_eq!(c.management_url, "https://admin.example:8443");
        assert!(c.management_explicit);
    }

    #[test]
    fn credentials_never_show_in_errors_or_debug() {
        for url in [
            "amqp://ann:hun/ter22@h:5672/%2f",
            "amqp://ann:hun?ter22@h:5672/%2f",
            "amqp://ann:hun#ter22@h:5672/%2f",
            "amqp://ann:hun/ter22@h:5672/%2f?management_url=http://m",
        ] {
            let err = RabbitConfig::from_url(url).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("ter22"), "{url}: {shown}");
            assert!(shown.contains("percent-encode"), "{url}: {shown}");
        }
        for url in [
            "amqp://ann:hunter22@h:5672/%2f",
            "amqp://ann:hun%2F%3F%23%40ter22@h:5672/%2f",
            "amqp://ann:hun@ter22@h:5672/%2f",
            "amqps://ann:hunter22@h/%2f?management_url=https%3A%2F%2Fadm%3Ahunter22%40m",
            "amqp://ann:hunter22@h/%2f?management_url=http://adm:hunter22@m:15672&partitions=4",
        ] {
            let c = RabbitConfig::from_url(url).unwrap();
            let shown = format!("{c:?} {}", c.redacted_url);
            assert!(!shown.contains("ter22"), "{url}: {shown}");
            assert!(!shown.contains("ann"), "{url}: {shown}");
        }
        for url in ["amqp://ann:hun%2ter22@h/%2f", "amqp://ann:hun%ff@h/%2f"] {
            let err = RabbitConfig::from_url(url).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{url}: {err}");
            assert!(!format!("{err} {err:?}").contains("ter22"), "{url}: {err}");
        }
        for url in ["amqq://ann:hunter22@h/%2f", "kafak://ann:hun/ter22@h"] {
            let err = RabbitConfig::from_url(url).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("ter22"), "{url}: {err}");
        }
    }
}
