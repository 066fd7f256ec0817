//! Passwords and secret settings never reach an error, a `Debug` output or the
//! `switchyard` binary's output, whatever the URL's shape. Every target here is
//! unreachable or mistyped: no broker is needed.

mod common;

use std::process::Output;

use proptest::prelude::*;
use switchyard::kafka::KafkaConfig;
use switchyard::rabbitmq::RabbitConfig;

/// Runs the binary with `args`, stdin closed and tracing at `trace` (so log lines are
/// checked too); returns stdout and stderr together.
fn run(args: &[&str]) -> (Output, String) {
    let out = common::switchyard()
        .args(args)
        .env("RUST_LOG", "trace")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the switchyard binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn assert_hidden(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "{secret:?} shows in:\n{text}");
    }
}

#[test]
fn cli_hides_kafka_credentials() {
    let url = "kafka://user:S3cr3t%2Fx@127.0.0.1:1?sasl.password=T0ps3cret";
    for args in [
        &["topics", "--url", url][..],
        &["publish", "--url", url, "--topic", "t"],
    ] {
        let (out, text) = run(args);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert_hidden(&text, &["S3cr3t", "T0ps3cret"]);
        assert!(text.contains("sasl.password="), "{text}");
    }
}

#[test]
fn cli_hides_kafka_secret_settings_of_an_unreachable_broker() {
    // Reaches librdkafka (with logging on) and times out on the metadata request.
    let url = "kafka://127.0.0.1:1?security.protocol=SASL_PLAINTEXT&sasl.mechanism=PLAIN\
               &sasl.username=Us3rname9&sasl.password=T0ps3cret%2F%40x&publish_timeout_ms=1500";
    let (out, text) = run(&["topics", "--url", url]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_hidden(&text, &["Us3rname9", "T0ps3cret", "T0ps3cret/@x"]);
}

#[test]
fn cli_hides_passwords_of_mistyped_and_malformed_urls() {
    for url in [
        "amqq://user:S3cr3t/x@127.0.0.1:1/%2f",
        "kafak://user:S3cr3t?x@127.0.0.1:1",
        "redis://user:S3cr3t#x@127.0.0.1:6379",
        "amqp://user:S3cr3t/x@127.0.0.1:1/%2f",
        "amqp://user:S3cr3t?x@127.0.0.1:1/%2f",
        "amqp://user:S3cr3t#x@127.0.0.1:1/%2f",
        "user:S3cr3t@127.0.0.1:5672",
        "amqq:/user:S3cr3t@127.0.0.1",
        "memory://x?capacity=%zz&api_key=S3cr3t&sasl.password=S3cr3t%zz",
    ] {
        let (out, text) = run(&["topics", "--url", url]);
        assert_eq!(out.status.code(), Some(1), "{url}: {text}");
        assert_hidden(&text, &["S3cr3t"]);
    }
}

#[test]
fn cli_hides_the_password_of_an_unreachable_rabbitmq() {
    // Retries for about 3 s, then fails naming the (redacted) URL.
    let url = "amqp://user:S3cr3t%2Fx%40y@127.0.0.1:1/%2f?heartbeat=10";
    let (out, text) = run(&["topics", "--url", url]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_hidden(&text, &["S3cr3t"]);
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

#[tokio::test]
async fn connect_errors_hide_every_shape() {
    for url in [
        "kafka://user:S3cr3t@127.0.0.1:1",
        "kafka://S3cr3tT0ken@127.0.0.1:1",
        "kafka://user:S3cr3t%2Fx@127.0.0.1:1?sasl.password=T0ps3cret",
        "kafka://127.0.0.1:1?sasl.password=T0ps3cret&compression.codec=nope",
        // Rejected by librdkafka where it was built without OpenSSL, whose message
        // quotes the value.
        "kafka://127.0.0.1:1?ssl.key.password=T0ps3cret&compression.codec=nope",
        "kafka://127.0.0.1:1?sasl.oauthbearer.client.secret=T0ps3cret&partitions=0",
        "amqq://user:S3cr3t@127.0.0.1",
        "kafak://user:S3cr3t/x@127.0.0.1",
        "redis://user:S3cr3t@127.0.0.1",
        "amqp://user:S3cr3t/x@127.0.0.1:1/%2f",
        "amqp://user:S3cr3t@127.0.0.1:1/%2f?nope=1&api_key=T0ps3cret",
        "user:S3cr3t@127.0.0.1",
        "memory://x?ssl.keystore.password=T0ps3cret%",
    ] {
        let err = switchyard::connect(url).await.err().expect(url);
        assert_hidden(&format!("{err}\n{err:?}"), &["S3cr3t", "T0ps3cret"]);
    }
}

#[test]
fn config_debug_hides_secrets() {
    let mut c =
        KafkaConfig::from_url("kafka://h:9092?sasl.username=Us3rname9&sasl.password=T0ps3cret")
            .unwrap();
    // Settings given in code, whatever librdkafka would make of them.
    c.client
        .push(("SSL.KEYSTORE.PASSWORD".into(), "K3yPassw0rd".into()));
    c.client.push(("my.api_key".into(), "Ap1K3yValue".into()));
    assert_hidden(
        &format!("{c:?}"),
        &["Us3rname9", "T0ps3cret", "K3yPassw0rd", "Ap1K3yValue"],
    );
    let c = RabbitConfig::from_url(
        "amqp://us3rname9:S3cr3t%2F%3F@h/%2f?management_url=https://adm:T0ps3cret@m:15671",
    )
    .unwrap();
    assert_hidden(&format!("{c:?}"), &["us3rname9", "S3cr3t", "T0ps3cret"]);
}

/// clap prints `[env: SWITCHYARD_URL=<value>]` in `--help` unless the argument hides
/// env values; `cli/src/lib.rs` is to set `hide_env_values = true` on `--url`.
#[test]
fn help_hides_the_url_from_the_environment() {
    let out = common::switchyard()
        .args(["topics", "--help"])
        .env("SWITCHYARD_URL", "amqp://user:S3cr3t@h/%2f")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_hidden(&text, &["S3cr3t"]);
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

/// The secret as written, and as `Debug` escapes it.
fn forms(secret: &str) -> [String; 2] {
    let escaped = format!("{secret:?}");
    [
        secret.to_string(),
        escaped[1..escaped.len() - 1].to_string(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Passwords of printable characters (raw or percent-encoded), and secret settings,
    /// in URLs that fail before any network I/O: neither the connect error nor the
    /// configs' `Debug` shows them. Secrets start with a letter no template contains.
    #[test]
    fn connect_errors_and_config_debug_never_show_secrets(
        pw in "[QZJX][ -~]{5,23}",
        value in "[QZJX][ -~]{5,23}",
        name in prop::sample::select(vec![
            "sasl.password", "SASL.USERNAME", "ssl.key.password", "ssl.keystore.password",
            "sasl.oauthbearer.client.secret", "my.api_key", "app.Token",
        ]),
        scheme in prop::sample::select(vec!["kafka", "amqq", "kafak", "redis", "amqp", "memory"]),
        encoded in any::<bool>(),
    ) {
        let (pw_w, value_w) = if encoded {
            (encode(&pw), encode(&value))
        } else {
            (pw.clone(), value.clone())
        };
        let secrets: Vec<String> = [&pw, &value, &pw_w, &value_w]
            .iter()
            .flat_map(|s| forms(s))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Each fails before any I/O: kafka:// with a user refuses, a bad librdkafka value
        // or an unknown setting fails validation, typos have no backend.
        for url in [
            format!("{scheme}://user:{pw_w}@127.0.0.1:1/vh?nope=1&{name}={value_w}"),
            format!("kafka://127.0.0.1:1?compression.codec=nope&{name}={value_w}"),
            format!("{scheme}x://user:{pw_w}@127.0.0.1:1?{name}={value_w}"),
        ] {
            if let Err(err) = rt.block_on(switchyard::connect(&url)) {
                let shown = format!("{err}\n{err:?}");
                for s in &secrets {
                    prop_assert!(!shown.contains(s.as_str()), "{url:?} shows {s:?}: {shown}");
                }
            } else if scheme != "memory" {
                prop_assert!(false, "{url:?} connected");
            }
        }
        for url in [
            format!("kafka://127.0.0.1:1?{name}={value_w}&linger.ms=5"),
            format!("amqp://user:{pw_w}@127.0.0.1:1/vh?management_url=http://a:{value_w}@m"),
        ] {
            let shown = match KafkaConfig::from_url(&url) {
                Ok(c) => format!("{c:?}"),
                Err(e) => format!("{e}\n{e:?}"),
            };
            let shown2 = match RabbitConfig::from_url(&url) {
                Ok(c) => format!("{c:?} {}", c.redacted_url),
                Err(e) => format!("{e}\n{e:?}"),
            };
            for s in &secrets {
                prop_assert!(!shown.contains(s.as_str()), "{url:?} shows {s:?}: {shown}");
                prop_assert!(!shown2.contains(s.as_str()), "{url:?} shows {s:?}: {shown2}");
            }
        }
    }
}

#[tokio::test]
async fn a_memory_broker_name_with_a_password_is_not_shown() {
    let first = switchyard::connect("memory://user:Pw0rdS3cret@named?capacity=10")
        .await
        .expect("connect");
    let e = switchyard::connect("memory://user:Pw0rdS3cret@named?capacity=20")
        .await
        .err()
        .expect("conflicting settings are refused");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("Pw0rdS3cret"), "{text}");
    drop(first);
}
