//! Secrets never survive `redact`, `BrokerUrl`'s `Debug` or its parse errors, whatever
//! characters the password holds and wherever the secret sits in the URL.

use proptest::prelude::*;
use switchyard_core::backend::{redact, BrokerUrl};

/// Generated secrets: printable ASCII, so '/', '?', '#', '@', ':', '%', '&' and '='
/// all occur. They start with a letter no URL template below contains, so a secret can
/// only show up in an output by leaking.
fn secret() -> impl Strategy<Value = String> {
    "[QZJX][ -~]{5,23}"
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            Some(byte) if b[i] == b'%' => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every output `url` yields: its redaction, and the parsed URL's `Debug` or the parse
/// error's `Display` and `Debug`.
fn outputs(url: &str) -> Vec<String> {
    let mut out = vec![redact(url)];
    match BrokerUrl::parse(url) {
        Ok(u) => out.push(format!("{u:?}")),
        Err(e) => {
            out.push(e.to_string());
            out.push(format!("{e:?}"));
        }
    }
    out
}

/// Fails if any output holds the secret as written, percent-decoded, or escaped the
/// way `Debug` escapes strings.
fn assert_hidden(url: &str, secret: &str) -> Result<(), TestCaseError> {
    let escaped = format!("{secret:?}");
    let forms = [
        secret.to_string(),
        decode(secret),
        escaped[1..escaped.len() - 1].to_string(),
    ];
    for shown in outputs(url) {
        for form in &forms {
            prop_assert!(
                !shown.contains(form.as_str()),
                "{url:?} shows {form:?} in {shown:?}"
            );
        }
    }
    Ok(())
}

fn scheme() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "amqp", "amqps", "kafka", "memory", "amqq", "kafak", "redis", "http", "AMQP",
    ])
}

fn secret_setting() -> impl Strategy<Value = String> {
    let prefix = prop::sample::select(vec![
        "",
        "sasl.",
        "ssl.",
        "ssl.key.",
        "ssl.keystore.",
        "sasl.oauthbearer.client.",
        "my_app.",
    ]);
    let word = prop::sample::select(vec![
        "password", "passwd", "secret", "token", "key", "api_key", "apikey", "username",
    ]);
    (prefix, word, any::<bool>()).prop_map(|(p, w, upper)| {
        let name = format!("{p}{w}");
        if upper {
            name.to_uppercase()
        } else {
            name
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn passwords_never_show(scheme in scheme(), pw in secret(), encoded in any::<bool>()) {
        let written = if encoded { encode(&pw) } else { pw.clone() };
        for url in [
            format!("{scheme}://user:{written}@host.example:5672/vh?partitions=4"),
            format!("{scheme}://{written}@host.example:9092"),
            format!("{scheme}://user:{written}@h1:9092,h2:9092"),
            format!("{scheme}:/user:{written}@host.example"),
            format!("user:{written}@host.example:5672"),
        ] {
            assert_hidden(&url, &pw)?;
            if encoded {
                assert_hidden(&url, &written)?;
            }
        }
    }

    #[test]
    fn secret_settings_never_show(
        scheme in scheme(),
        name in secret_setting(),
        value in secret(),
        encoded in any::<bool>(),
    ) {
        let written = if encoded { encode(&value) } else { value.clone() };
        for url in [
            format!("{scheme}://host.example:9092?linger.ms=5&{name}={written}&acks=all"),
            format!("{scheme}://host.example:9092?{name}={written}"),
            format!("{scheme}://user:pw@host.example/vh?{name}={written}&partitions=4"),
        ] {
            assert_hidden(&url, &value)?;
            if encoded {
                assert_hidden(&url, &written)?;
            }
        }
    }
}
