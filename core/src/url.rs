//! Broker URLs: `memory://name?setting=value`, `kafka://host:port,host:port?setting=value`,
//! `amqp://user:pass@host:port/vhost`.

use std::fmt;

use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// A parsed broker URL: scheme, the part before `?`, and the query settings in order.
///
/// ```
/// let url = switchyard_core::backend::BrokerUrl::parse("kafka://a:9092,b:9092?acks=all&linger.ms=5").unwrap();
/// assert_eq!(url.scheme, "kafka");
/// assert_eq!(url.authority, "a:9092,b:9092");
/// assert_eq!(url.param("linger.ms"), Some("5"));
/// ```
///
/// Its `Debug` output hides the user, the password and secret settings (see
/// [`BrokerUrl::is_secret_setting`]).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerUrl {
    /// Lower-case scheme.
    pub scheme: String,
    /// Everything between `://` and `?` (hosts, credentials, path).
    pub authority: String,
    /// `key=value` pairs from the query string, percent-decoded, in order.
    pub params: Vec<(String, String)>,
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<(&str, String)> = self
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), Self::redact_setting(k, v)))
            .collect();
        f.debug_struct("BrokerUrl")
            .field("scheme", &self.scheme)
            .field("authority", &redact_rest(&self.authority, 0))
            .field("params", &params)
            .finish()
    }
}

impl BrokerUrl {
    /// Parses a URL of the form `scheme://rest?k=v&k2=v2`.
    ///
    /// Errors never quote a setting's value or the URL's password.
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
            // No setting has an '@' in its name: this is the tail of a user or password
            // with a raw '?' in it, so naming the "setting" would print part of it.
            if k.contains('@') {
                return Err(Error::config(
                    "url",
                    "the query string holds an '@': a user or password containing '?', '/', \
                     '#' or '@' must be percent-encoded (%3F, %2F, %23, %40)",
                ));
            }
            let key = percent_decode(k).map_err(|()| {
                Error::config(
                    "url",
                    "bad percent escape in a setting name; write a literal % as %25",
                )
            })?;
            let value = percent_decode(v).map_err(|()| {
                Error::config(
                    key.as_str(),
                    "bad percent escape (or not UTF-8) in its value; write a literal % as %25",
                )
            })?;
            params.push((key, value));
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
                    format!(
                        "{:?} is not a valid {}",
                        Self::redact_setting(key, v),
                        std::any::type_name::<T>()
                    ),
                )
            }),
        }
    }

    /// The name of setting `index` as an error may show it, or `None` when it is a
    /// word without a value right after a secret setting: most likely the rest of that
    /// secret, cut at a raw `&` (as [`redact`] hides it too).
    pub fn shown_name(&self, index: usize) -> Option<&str> {
        let (key, value) = self.params.get(index)?;
        let after_secret = index
            .checked_sub(1)
            .and_then(|i| self.params.get(i))
            .is_some_and(|(k, v)| Self::is_secret_setting(k) && !v.is_empty());
        (!(after_secret && value.is_empty())).then_some(key.as_str())
    }

    /// The error for setting `index`, which this backend does not know: named, unless
    /// it may be part of a secret (see [`BrokerUrl::shown_name`]).
    pub fn unknown_setting(&self, index: usize, known: &str) -> Error {
        match self.shown_name(index) {
            Some(name) => Error::config(name, known.to_string()),
            None => Error::config(
                "url",
                "a word without a value follows a secret setting, likely the rest of its \
                 value cut at a raw '&' (not shown): percent-encode '&' in values as %26",
            ),
        }
    }

    /// Whether a setting's value is to be treated as a secret: its name (case and
    /// punctuation aside) mentions a password, secret, token, key, credential, user or
    /// the like, e.g. `sasl.password`, `sasl.username`, `ssl.key.password`,
    /// `sasl.oauthbearer.client.secret`, `api_key`. Errs on the side of hiding.
    pub fn is_secret_setting(name: &str) -> bool {
        let name: String = decode_lossy(name)
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        SECRET_WORDS.iter().any(|w| name.contains(w))
    }

    /// A setting's value as it may be shown in errors, logs and `Debug` output: `***`
    /// for a secret setting, any user and password hidden in a URL-like value, the
    /// value itself otherwise.
    pub fn redact_setting(name: &str, value: &str) -> String {
        redact_value(name, value, 0)
    }
}

/// How many URLs deep a value is searched for secrets: past this a URL-like value is
/// hidden whole, so a hostile URL of URLs costs neither stack nor quadratic memory.
const MAX_NESTED_URLS: usize = 4;

/// [`BrokerUrl::redact_setting`] for a value `depth` URLs deep.
fn redact_value(name: &str, value: &str, depth: usize) -> String {
    if BrokerUrl::is_secret_setting(name) && !value.is_empty() {
        "***".to_string()
    } else if value.contains("://") || value.contains('@') {
        if depth >= MAX_NESTED_URLS {
            "***".to_string()
        } else {
            redact_nested(value, depth + 1)
        }
    } else {
        value.to_string()
    }
}

/// Parts of setting names that mark their values as secrets (matched against the name
/// in lower case, punctuation removed).
const SECRET_WORDS: &[&str] = &[
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "credential",
    "auth",
    "user",
    "login",
    "jaas",
    "private",
    "signature",
    "cookie",
];

/// The URL with the user, the password and secret settings replaced by `***`, for
/// error messages and logs. Whatever the input's shape:
///
/// - after `scheme://`, everything before the *last* `@` is hidden, so a password
///   holding a raw `/`, `?`, `#` or `@` is hidden whole (a URL with an `@` in its query
///   string loses more than its password: better than showing one);
/// - the values of secret-looking settings (see [`BrokerUrl::is_secret_setting`]) are
///   hidden, and URLs in other settings' values are redacted in turn;
/// - a `host:word` whose port is no port number (`user:pass` with the host forgotten)
///   loses the word;
/// - URLs nested in settings more than four deep are hidden whole;
/// - a string without `://` is still searched for `user:pass@`.
///
/// ```
/// use switchyard_core::backend::redact;
/// assert_eq!(redact("amqp://ann:pa/ss@h:5672/%2f"), "amqp://***@h:5672/%2f");
/// assert_eq!(
///     redact("kafka://h:9092?sasl.username=ann&sasl.password=pw&linger.ms=5"),
///     "kafka://h:9092?sasl.username=***&sasl.password=***&linger.ms=5"
/// );
/// ```
pub fn redact(url: &str) -> String {
    redact_nested(url, 0)
}

/// [`redact`] for a URL found `depth` URLs deep in another's settings.
fn redact_nested(url: &str, depth: usize) -> String {
    match url.find("://").filter(|&i| is_scheme(&url[..i])) {
        Some(i) => format!("{}{}", &url[..i + 3], redact_rest(&url[i + 3..], depth)),
        None => {
            // A mistyped `scheme:/user:pass@host` keeps its scheme; anything else before
            // the last '@' may be a password.
            let scheme_len = url
                .find(':')
                .filter(|&i| is_scheme(&url[..i]) && url[i + 1..].starts_with('/'))
                .map_or(0, |i| {
                    url.len() - url[i + 1..].trim_start_matches('/').len()
                });
            format!(
                "{}{}",
                &url[..scheme_len],
                redact_rest(&url[scheme_len..], depth)
            )
        }
    }
}

/// `[a-zA-Z][a-zA-Z0-9+.-]*`, as RFC 3986 spells a scheme.
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// Redacts what follows `scheme://`: userinfo, non-numeric ports, secret settings.
fn redact_rest(rest: &str, depth: usize) -> String {
    let mut out = String::with_capacity(rest.len());
    let mut rest = rest;
    let mut in_query = false;
    if let Some(at) = rest.rfind('@') {
        out.push_str("***");
        // The '@' may be inside a setting's value: hide the rest of that value too.
        in_query = rest[..at].contains('?');
        rest = &rest[at..];
    }
    let (before, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    if in_query {
        // `before` is "@" plus the tail of a setting's value (and perhaps more
        // settings, when the URL's own '?' came earlier).
        out.push_str("@***");
        if let Some(i) = rest.find('&') {
            out.push('&');
            out.push_str(&redact_query(&rest[i + 1..], depth));
        }
        return out;
    }
    let (hosts, path) = match before.find(['/', '#']) {
        Some(i) => before.split_at(i),
        None => (before, ""),
    };
    out.push_str(&redact_hosts(hosts));
    match path.find('#') {
        // A fragment means nothing to switchyard and may hold anything.
        Some(i) => {
            out.push_str(&path[..i]);
            out.push_str("#***");
        }
        None => out.push_str(path),
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(&redact_query(q, depth));
    }
    out
}

/// Hosts of an authority: `host:port` whose port is no port number (letters, or past
/// 65535) loses the port (it is likely a password whose `@host` is missing).
fn redact_hosts(hosts: &str) -> String {
    let (at, hosts) = match hosts.strip_prefix('@') {
        Some(h) => ("@", h),
        None => ("", hosts),
    };
    let shown: Vec<String> = hosts
        .split(',')
        .map(|h| {
            let port_start = if h.starts_with('[') {
                h.find(']').map(|end| end + 1)
            } else {
                Some(0)
            };
            match port_start.and_then(|s| h[s..].find(':').map(|c| s + c)) {
                Some(c) if !is_port(&h[c + 1..]) => {
                    format!("{}:***", &h[..c])
                }
                _ => h.to_string(),
            }
        })
        .collect();
    format!("{at}{}", shown.join(","))
}

/// Empty (no port given) or a number a port can be.
fn is_port(s: &str) -> bool {
    s.is_empty() || (s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok())
}

/// A query string with secret values hidden and URL values redacted.
fn redact_query(query: &str, depth: usize) -> String {
    let mut secret_before = false;
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => {
                secret_before = BrokerUrl::is_secret_setting(k);
                if secret_before && !v.is_empty() {
                    format!("{k}=***")
                } else {
                    let decoded = decode_lossy(v);
                    let redacted = redact_value(k, &decoded, depth);
                    if redacted == decoded {
                        pair.to_string()
                    } else {
                        format!("{k}={redacted}")
                    }
                }
            }
            // A lone word after a secret is likely the rest of it, cut at a raw '&'.
            None if secret_before => "***".to_string(),
            None => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-decodes for display: bad escapes stay as they are, `+` is a space.
fn decode_lossy(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Strict percent-decoding of a query part (`+` is a space): a `%` not followed by two
/// hex digits, or bytes that are not UTF-8, are an error, which the caller words
/// without quoting the input (it may be a password).
fn percent_decode(s: &str) -> std::result::Result<String, ()> {
    // The crate keeps bad escapes verbatim; a setting must not silently mean
    // something other than what was written, so they are refused here first.
    let bad_escape = s.split('%').skip(1).any(|after| {
        !after
            .get(..2)
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if bad_escape {
        return Err(());
    }
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ())
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
            "amqp://***@host:5672/%2f"
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
        for bad in ["%zz", "%%41", "%4\u{e9}", "%ff", "a%"] {
            let url = format!("kafka://h?a={bad}");
            assert!(BrokerUrl::parse(&url).is_err(), "{url}");
        }
        assert_eq!(
            BrokerUrl::parse("kafka://h?a=b+c%2B%C3%A9")
                .unwrap()
                .param("a"),
            Some("b c+\u{e9}")
        );
        assert_eq!(decode_lossy("a+%41%zz%"), "a A%zz%");
    }

    #[test]
    fn redact_hides_userinfo_whatever_its_characters() {
        for (url, want) in [
            ("amqp://u:pa/ss@h:5672/%2f", "amqp://***@h:5672/%2f"),
            ("amqp://u:pa?ss@h:5672/%2f?x=1", "amqp://***@***"),
            ("amqp://u:pa#ss@h:5672/%2f", "amqp://***@h:5672/%2f"),
            ("amqp://u:p@ss@h:5672/%2f", "amqp://***@h:5672/%2f"),
            ("amqp://u:p%40%2Fss@h/%2f", "amqp://***@h/%2f"),
            ("kafka://user:pass@host:9092", "kafka://***@host:9092"),
            ("kafka://tok3n@host:9092", "kafka://***@host:9092"),
            ("amqq://user:pw@host", "amqq://***@host"),
            ("redis://user:pw@host:6379", "redis://***@host:6379"),
            ("amqq:/user:pw@host", "amqq:/***@host"),
            ("redis:user:pw@host", "***@host"),
            ("user:pw@host:5672", "***@host:5672"),
            (" amqp://user:pw@host", "***@host"),
            ("amqp://user:pw", "amqp://user:***"),
            ("amqp://h/vh#frag", "amqp://h/vh#***"),
            ("kafka://[::1]:9092,h:9093", "kafka://[::1]:9092,h:9093"),
            (
                "amqp://u:p@h/?management_url=http://a:b@m:15672&partitions=4",
                "amqp://***@***&partitions=4",
            ),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    #[test]
    fn redact_hides_secret_settings() {
        assert_eq!(
            redact("kafka://h:9092?sasl.username=ann&sasl.password=p%2Fw&linger.ms=5"),
            "kafka://h:9092?sasl.username=***&sasl.password=***&linger.ms=5"
        );
        for name in [
            "sasl.password",
            "SASL.PASSWORD",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "api_key",
            "apiKey",
            "access-token",
            "sasl%2Epassword",
        ] {
            assert!(BrokerUrl::is_secret_setting(name), "{name}");
            let shown = redact(&format!("kafka://h?{name}=hunter22&acks=all"));
            assert!(!shown.contains("hunter22"), "{shown}");
        }
        for name in ["partitions", "linger.ms", "security.protocol", "heartbeat"] {
            assert!(!BrokerUrl::is_secret_setting(name), "{name}");
        }
        // The rest of a secret cut at a raw '&' is hidden too.
        assert_eq!(
            redact("kafka://h?sasl.password=ab&cd&acks=all"),
            "kafka://h?sasl.password=***&***&acks=all"
        );
        // URLs in other settings lose their passwords.
        assert_eq!(
            redact("amqp://h/%2f?management_url=http%3A%2F%2Fadm%3Apw%40m%3A80"),
            "amqp://h/%2f?management_url=http://***@m:80"
        );
    }

    #[test]
    fn debug_and_errors_do_not_quote_secrets() {
        let u = BrokerUrl::parse("amqp://ann:hunter22@h/%2f?sasl.password=t0ps3cret&x=1").unwrap();
        let shown = format!("{u:?}");
        assert!(
            !shown.contains("hunter22") && !shown.contains("t0ps3cret"),
            "{shown}"
        );
        assert!(
            shown.contains("***@h/%2f") && shown.contains("\"x\", \"1\""),
            "{shown}"
        );
        let err = BrokerUrl::parse("kafka://h?sasl.password=hunter22%zz").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter22"), "{err}");
        assert!(err.to_string().contains("sasl.password"), "{err}");
        let err = BrokerUrl::parse("amqp://ann:hun?ter22@h/%2f").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("ter22"), "{err}");
        let err = BrokerUrl::parse("user:hunter22@h").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter22"), "{err}");
        let u = BrokerUrl::parse("kafka://h?api_key=hunter22").unwrap();
        let err = u.param_parse::<u32>("api_key").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter22"), "{err}");
    }

    #[test]
    fn a_password_of_digits_past_any_port_is_hidden_with_the_host_forgotten() {
        assert_eq!(redact("amqp://guest:123456"), "amqp://guest:***");
        assert_eq!(redact("amqp://guest:65536/%2f"), "amqp://guest:***/%2f");
        assert_eq!(redact("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(redact("amqp://h:/%2f"), "amqp://h:/%2f");
    }

    #[test]
    fn urls_nested_without_end_cost_neither_stack_nor_quadratic_memory() {
        let url = format!("amqp://h/?connection_name={}", "://?x=".repeat(40_000));
        // A small stack: one frame per nested URL would overflow it.
        let shown = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || redact(&url))
            .unwrap()
            .join()
            .expect("redacted without overflowing the stack");
        assert!(shown.len() < 1_000, "{}", shown.len());
        let nested = "kafka://h?sasl.password=pw";
        let mut url = nested.to_string();
        for _ in 0..MAX_NESTED_URLS {
            url = format!(
                "kafka://h?x={}",
                url.replace('&', "%26").replace('=', "%3D")
            );
        }
        assert!(!redact(&url).contains("pw"), "{}", redact(&url));
    }

    #[test]
    fn a_word_cut_from_a_secret_at_a_raw_ampersand_is_not_named() {
        let u = BrokerUrl::parse("kafka://h:9092?sasl.password=Tr0ub&dor&acks=all&x").unwrap();
        assert_eq!(u.shown_name(1), None);
        assert_eq!(u.shown_name(2), Some("acks"));
        assert_eq!(u.shown_name(3), Some("x"), "not after a secret");
        let shown = u.unknown_setting(1, "unknown").to_string();
        assert!(!shown.contains("dor") && shown.contains("%26"), "{shown}");
        assert!(u.unknown_setting(3, "unknown").to_string().contains("`x`"));
    }
}
