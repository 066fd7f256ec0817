//! Broker URLs: `memory://name?setting=value`, `kafka://host:port,host:port?setting=value`,
//! `amqp://user:pass@host:port/vhost`.

use crate::error::{Error, Result};

/// A parsed broker URL: scheme, the part before `?`, and the query settings in order.
///
/// ```
/// let url = switchyard_core::BrokerUrl::parse("kafka://a:9092,b:9092?acks=all&linger.ms=5").unwrap();
/// assert_eq!(url.scheme, "kafka");
/// assert_eq!(url.authority, "a:9092,b:9092");
/// assert_eq!(url.param("linger.ms"), Some("5"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerUrl {
    /// Lower-case scheme.
    pub scheme: String,
    /// Everything between `://` and `?` (hosts, credentials, path).
    pub authority: String,
    /// `key=value` pairs from the query string, percent-decoded, in order.
    pub params: Vec<(String, String)>,
}

impl BrokerUrl {
    /// Parses a URL of the form `scheme://rest?k=v&k2=v2`.
    pub fn parse(url: &str) -> Result<Self> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::config(
                "url",
                format!(
                    "{:?} has no scheme; write memory://, kafka://host:9092 or amqp://user:pass@host:5672/%2f",
                    redact(url)
                ),
            ));
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((percent_decode(k)?, percent_decode(v)?));
        }
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_string(),
            params,
        })
    }

    /// The last value given for a setting.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A setting parsed as a number, or a [`Error::Config`] naming it.
    pub fn param_parse<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.param(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Error::config(
                    key,
                    format!("{v:?} is not a valid {}", std::any::type_name::<T>()),
                )
            }),
        }
    }
}

/// The URL with any password replaced by `***`, for error messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((creds, host)) => {
            let user = creds.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => out.push(b),
                    None => {
                        return Err(Error::config("url", format!("bad percent escape in {s:?}")))
                    }
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::config("url", format!("{s:?} is not UTF-8 after decoding")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let u = BrokerUrl::parse("AMQP://guest:secret@127.0.0.1:5672/%2f?prefetch=10").unwrap();
        assert_eq!(u.scheme, "amqp");
        assert_eq!(u.authority, "guest:secret@127.0.0.1:5672/%2f");
        assert_eq!(u.param_parse::<u32>("prefetch").unwrap(), Some(10));
        assert!(u.param_parse::<u32>("missing").unwrap().is_none());
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert!(BrokerUrl::parse("localhost:9092").is_err());
        let bad = BrokerUrl::parse("memory://?capacity=lots").unwrap();
        let err = bad
            .param_parse::<usize>("capacity")
            .unwrap_err()
            .to_string();
        assert!(err.contains("capacity"), "{err}");
        assert_eq!(
            BrokerUrl::parse("kafka://h?a=%41%2C").unwrap().param("a"),
            Some("A,")
        );
        assert!(BrokerUrl::parse("kafka://h?a=%4").is_err());
    }
}
