//! Listing topics and groups through the management plugin's HTTP API: AMQP 0-9-1 can
//! declare and inspect objects by name but never list them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use switchyard_core::backend::{redact, validate_name};
use switchyard_core::{Error, Result};

use crate::config::RabbitConfig;
use crate::BACKEND;

/// The management API did not answer: the plugin is off, or listens elsewhere. Carried
/// as the source of a permanent [`Error::Backend`], so callers can downcast to it.
#[derive(Debug)]
pub struct ManagementUnavailable {
    /// The management URL tried (without a password).
    pub url: String,
    /// What went wrong.
    pub detail: String,
}

impl fmt::Display for ManagementUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the RabbitMQ management API at {} did not answer ({}); listing topics needs the \
             management plugin: enable it with `rabbitmq-plugins enable rabbitmq_management`, \
             or set management_url= in the amqp:// URL to where it listens",
            self.url, self.detail
        )
    }
}

impl std::error::Error for ManagementUnavailable {}

/// Exchange and queue names of the configured virtual host.
pub(crate) struct Listing {
    pub(crate) exchanges: Vec<(String, String)>,
    pub(crate) queues: Vec<String>,
}

/// Lists the virtual host's exchanges (name, type) and queues (names only: depths are
/// read over AMQP, which is exact where the API's figures are samples up to 5 s old).
pub(crate) async fn list(config: &RabbitConfig) -> Result<Listing> {
    refuse_plain_http(config)?;
    let (base, auth) = endpoint(config);
    let vhost = encode_path(&config.vhost);
    let shown = redact(&base);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(15)))
            .http_status_as_error(false)
            .build()
            .into();
        let get = |what: &str| -> Result<Vec<serde_json::Value>> {
            let url = format!("{base}/api/{what}/{vhost}?columns=name,type");
            let mut response = agent
                .get(&url)
                .header("Authorization", &auth)
                .call()
                .map_err(|e| {
                    Error::permanent(
                        BACKEND,
                        ManagementUnavailable {
                            url: shown.clone(),
                            detail: e.to_string(),
                        },
                    )
                })?;
            let status = response.status().as_u16();
            let body = response
                .body_mut()
                .with_config()
                .limit(256 << 20)
                .read_to_string()
                .map_err(|e| {
                    Error::transient(BACKEND, format!("reading {shown}/api/{what}: {e}"))
                })?;
            match status {
                200 => {}
                401 | 403 => {
                    return Err(Error::permanent(
                        BACKEND,
                        format!(
                            "the management API at {shown} refused the credentials (HTTP \
                             {status}); the user needs the \"management\" or \"monitoring\" \
                             tag and access to the virtual host"
                        ),
                    ))
                }
                404 => {
                    return Err(Error::permanent(
                        BACKEND,
                        format!(
                            "the management API at {shown} does not know /api/{what}/{vhost} \
                             (HTTP 404): no such virtual host, or not a RabbitMQ management API"
                        ),
                    ))
                }
                _ => {
                    return Err(Error::transient(
                        BACKEND,
                        format!(
                            "the management API at {shown} answered HTTP {status}: {}",
                            body.chars().take(200).collect::<String>()
                        ),
                    ))
                }
            }
            match serde_json::from_str(&body) {
                Ok(serde_json::Value::Array(items)) => Ok(items),
                _ => Err(Error::permanent(
                    BACKEND,
                    format!("{shown}/api/{what} did not answer with a JSON list"),
                )),
            }
        };
        let field = |v: &serde_json::Value, name: &str| {
            v.get(name)
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let exchanges = get("exchanges")?
            .iter()
            .map(|e| (field(e, "name"), field(e, "type")))
            .collect();
        let queues = get("queues")?.iter().map(|q| field(q, "name")).collect();
        Ok(Listing { exchanges, queues })
    })
    .await
    .map_err(|e| Error::transient(BACKEND, format!("the management API call failed: {e}")))?
}

/// The derived `http://host:15672` would send the AMQP password in the clear: allowed
/// only to the loopback host. An explicit `management_url=` is the user's choice.
fn refuse_plain_http(config: &RabbitConfig) -> Result<()> {
    let url = &config.management_url;
    if config.management_explicit || !url.starts_with("http://") {
        return Ok(());
    }
    let (base, _) = endpoint(config);
    let host = base
        .strip_prefix("http://")
        .unwrap_or(&base)
        .split('/')
        .next()
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.split(':').next().unwrap_or(host),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    Err(Error::config(
        "management_url",
        format!(
            "listing topics uses the management API, and the default {base} would send the \
             AMQP user and password unencrypted to a host other than this one; set \
             management_url=https://{host_only}:15671 (management over TLS) in the amqp:// \
             URL, or management_url=http://{host_only}:15672 to accept plain HTTP",
            host_only = host.rsplit_once(':').map_or(host, |(h, _)| h),
        ),
    ))
}

/// The base URL without credentials, and the basic-auth header: the management URL's
/// own user and password when it has them, else the AMQP URL's.
fn endpoint(config: &RabbitConfig) -> (String, String) {
    let url = &config.management_url;
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (server, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (creds, host) = match server.rsplit_once('@') {
        Some((c, h)) => {
            let (u, p) = c.split_once(':').unwrap_or((c, ""));
            ((decode(u), decode(p)), h)
        }
        None => (config.credentials.clone(), server),
    };
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", creds.0, creds.1));
    (format!("{scheme}://{host}{path}"), format!("Basic {token}"))
}

/// Percent-decodes a user or password of the management URL, leniently: it was
/// accepted as a URL already, and a stray '%' stays as it is.
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What a path segment keeps unencoded: RFC 3986's unreserved characters.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a path segment (the virtual host "/" is `%2F`).
fn encode_path(s: &str) -> String {
    utf8_percent_encode(s, PATH_SEGMENT).to_string()
}

/// Switchyard's topics and groups in a listing: direct exchanges with a valid topic name
/// (not `amq.*`, nor the `T:G.return` and hold exchanges, whose names hold a ':'), and
/// groups from partition queues `T:G.p<i>`, with their partition queue names. Groups
/// whose queue names were shortened (very long names) cannot be named and are left out.
pub(crate) fn topics(listing: &Listing) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for (name, kind) in &listing.exchanges {
        if kind == "direct" && !name.starts_with("amq.") && validate_name("topic", name).is_ok() {
            out.entry(name.clone()).or_default();
        }
    }
    for queue in &listing.queues {
        let Some((base, p)) = queue.rsplit_once(".p") else {
            continue;
        };
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some((topic, group)) = base.split_once(':') else {
            continue;
        };
        if validate_name("topic", topic).is_err() || validate_name("group", group).is_err() {
            continue;
        }
        out.entry(topic.to_string())
            .or_default()
            .entry(group.to_string())
            .or_default()
            .push(queue.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_topics_and_groups_in_a_listing() {
        let listing = Listing {
            exchanges: [
                ("", "direct"),
                ("amq.topic", "topic"),
                ("amq.direct", "direct"),
                ("orders", "direct"),
                ("orders:email.return", "direct"),
                ("other-kind", "topic"),
                ("orders:email.delay.500", "fanout"),
                ("empty", "direct"),
                ("other", "fanout"),
            ]
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect(),
            queues: [
                "orders:email.p0",
                "orders:email.p1",
                "orders:email.members",
                "orders:email.delay.500",
                "orders:a.p1.p0",
                "plain-queue",
                &format!("{}~0123456789abcdef.p0", "x".repeat(200)),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        let t = topics(&listing);
        assert_eq!(t.keys().collect::<Vec<_>>(), ["empty", "orders"]);
        assert!(t["empty"].is_empty());
        assert_eq!(t["orders"].keys().collect::<Vec<_>>(), ["a.p1", "email"]);
        assert_eq!(t["orders"]["email"], ["orders:email.p0", "orders:email.p1"]);
    }

    #[test]
    fn builds_the_endpoint_and_encodes_the_vhost() {
        let c = RabbitConfig::from_url("amqp://ann:s%3Acret@h:5672/%2f").unwrap();
        let (base, auth) = endpoint(&c);
        assert_eq!(base, "http://h:15672");
        let token = base64::engine::general_purpose::STANDARD.encode("ann:s:cret");
        assert_eq!(auth, format!("Basic {token}"));
        let c = RabbitConfig::from_url(
            "amqp://ann:x@h/%2f?management_url=http%3A%2F%2Fadm%3Apw%40m%3A80",
        )
        .unwrap();
        let (base, auth) = endpoint(&c);
        assert_eq!(base, "http://m:80");
        let token = base64::engine::general_purpose::STANDARD.encode("adm:pw");
        assert_eq!(auth, format!("Basic {token}"));
        assert_eq!(encode_path("/"), "%2F");
        assert_eq!(encode_path("my vh"), "my%20vh");
        assert_eq!(decode("a%2Fb%zz%"), "a/b%zz%");
    }

    #[test]
    fn plain_http_to_a_remote_host_is_refused_unless_asked_for() {
        for url in [
            "amqp://ann:hunter22@rabbit.example:5672/%2f",
            "amqp://ann:hunter22@10.0.0.7/%2f",
            "amqp://ann:hunter22@[2001:db8::1]:5672/%2f",
        ] {
            let c = RabbitConfig::from_url(url).unwrap();
            let err = refuse_plain_http(&c).unwrap_err();
            let shown = err.to_string();
            assert!(
                matches!(&err, Error::Config { setting, .. } if setting == "management_url"),
                "{url}: {shown}"
            );
            assert!(shown.contains("management_url=https://"), "{shown}");
            assert!(!shown.contains("hunter22"), "{shown}");
        }
        for url in [
            "amqp://ann:hunter22@127.0.0.1:5672/%2f",
            "amqp://ann:hunter22@localhost/%2f",
            "amqp://ann:hunter22@[::1]:5672/%2f",
            "amqp://ann:hunter22@/%2f",
            "amqps://ann:hunter22@rabbit.example/%2f",
            "amqp://ann:hunter22@rabbit.example/%2f?management_url=http://rabbit.example:15672",
        ] {
            let c = RabbitConfig::from_url(url).unwrap();
            assert!(refuse_plain_http(&c).is_ok(), "{url}");
        }
    }
}
