//! Broker-connection errors, kept so a wait that times out can say why.
//!
//! librdkafka retries a refused TLS handshake or SASL login forever and only reports
//! it through the client context's `error` callback; the call the application is
//! waiting on just times out. Each client records the last such error here, and a
//! timed-out wait turns a TLS or login refusal into a permanent [`KafkaRefused`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};
use switchyard_core::backend::redact;
use switchyard_core::Error;

use crate::broker::BACKEND;

/// Distinct reasons logged at `error` level per client; repeats (librdkafka retries
/// every second or so) go to `debug`. Bounded so a flapping broker cannot grow it.
const LOGGED_REASONS: usize = 64;

/// What the broker refused, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KafkaProblem {
    /// The broker's certificate is not signed by a trusted authority (wrong
    /// `ssl.ca.location`, or a self-signed certificate).
    UnknownIssuer,
    /// The broker's certificate has expired, or is not valid yet (check clocks too).
    Expired,
    /// The broker's certificate does not name the host connected to.
    WrongName,
    /// The SASL login was refused: wrong user name, password or mechanism.
    AuthFailed,
    /// Any other TLS failure: no common protocol or cipher, a client certificate
    /// required or refused, a broken peer.
    Other,
}

/// A connection the broker kept refusing until the wait for it timed out, in a way
/// retrying cannot fix. Carried as the source of a permanent
/// [`Error::Backend`](switchyard_core::Error::Backend), so callers can downcast to it.
#[derive(Debug)]
pub struct KafkaRefused {
    /// What went wrong.
    pub problem: KafkaProblem,
    /// librdkafka's last description of it (secrets redacted).
    pub detail: String,
}

impl fmt::Display for KafkaRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.problem {
            KafkaProblem::UnknownIssuer => {
                "TLS: the broker's certificate is not signed by a trusted CA; set \
                 ssl.ca.location to the PEM file of the CA that signed it"
            }
            KafkaProblem::Expired => {
                "TLS: the broker's certificate has expired or is not valid yet (check the \
                 broker's certificate and both clocks)"
            }
            KafkaProblem::WrongName => {
                "TLS: the broker's certificate is not valid for the host name connected to; \
                 connect with a name in the certificate"
            }
            KafkaProblem::AuthFailed => {
                "SASL: the broker refused the login; check sasl.username, sasl.password \
                 and sasl.mechanisms"
            }
            KafkaProblem::Other => "TLS: the handshake with the broker failed",
        };
        write!(f, "{what} ({})", self.detail)
    }
}

impl std::error::Error for KafkaRefused {}

/// OpenSSL's words for a certificate it did not accept, without saying why.
const VERIFY_FAILED: &str = "certificate verify failed";

/// The refusal `reason` describes, if `code` (or the reason) is a TLS or SASL failure.
fn classify(code: Option<RDKafkaErrorCode>, reason: &str) -> Option<KafkaProblem> {
    let lower = reason.to_ascii_lowercase();
    let tls = code == Some(RDKafkaErrorCode::SSL)
        || lower.contains(VERIFY_FAILED)
        || lower.contains("ssl handshake failed");
    match code {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Some(KafkaProblem::AuthFailed)
        }
        _ if tls => Some(if lower.contains("expired") {
            KafkaProblem::Expired
        } else if lower.contains("mismatch") {
            // OpenSSL's "hostname mismatch" / "IP address mismatch".
            KafkaProblem::WrongName
        } else if lower.contains("issuer")
            || lower.contains("self-signed")
            || lower.contains("self signed")
        {
            KafkaProblem::UnknownIssuer
        } else {
            KafkaProblem::Other
        }),
        _ => None,
    }
}

/// librdkafka's reason without its varying "(after 5ms in state ...)" tail, so a
/// retry of the same failure reads the same.
fn stable(reason: &str) -> &str {
    reason
        .rfind(" (after ")
        .map_or(reason, |i| reason[..i].trim_end())
}

/// A refusal, with what our own handshake found about it, if it had to look.
type Refusal = (KafkaProblem, Option<String>);

/// One error librdkafka reported, and the refusal it is, if one.
#[derive(Clone)]
struct Recorded {
    reason: String,
    refusal: Option<Refusal>,
}

#[derive(Default)]
struct Seen {
    last: Option<Recorded>,
    /// The distinct reasons logged so far, with the refusal each is.
    logged: HashMap<String, Option<Refusal>>,
}

/// The last broker-connection error of one client, shared with its context.
#[derive(Clone)]
pub(crate) struct BrokerErrors {
    seen: Arc<Mutex<Seen>>,
    /// What the client trusts, to name why a certificate failed verification.
    #[cfg(feature = "tls")]
    trust: crate::probe::Trust,
}

impl BrokerErrors {
    /// The errors of a client with these librdkafka settings.
    pub(crate) fn new(config: &ClientConfig) -> Self {
        #[cfg(not(feature = "tls"))]
        let _ = config;
        Self {
            seen: Arc::default(),
            #[cfg(feature = "tls")]
            trust: crate::probe::Trust::of(config),
        }
    }

    /// Records (and logs, once per distinct reason) an error librdkafka reported.
    /// Runs on a librdkafka thread, which a first certificate failure holds for one
    /// handshake of our own (bounded) to find out why.
    pub(crate) fn record(&self, error: &KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let reason = redact(stable(reason));
        let known = self.seen.lock().logged.get(&reason).cloned();
        let refusal = match known {
            Some(refusal) => {
                tracing::debug!(error = %error, reason = %reason, "Kafka broker connection error (again)");
                refusal
            }
            None => {
                tracing::error!(error = %error, reason = %reason, "Kafka broker connection error");
                let refusal = self.diagnose(classify(code, &reason), &reason);
                let mut seen = self.seen.lock();
                if seen.logged.len() < LOGGED_REASONS {
                    seen.logged.insert(reason.clone(), refusal.clone());
                }
                refusal
            }
        };
        let mut seen = self.seen.lock();
        // "N/N brokers are down" follows the cause; keep the cause.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) || seen.last.is_none() {
            seen.last = Some(Recorded { reason, refusal });
        }
    }

    /// A certificate OpenSSL refused without saying why: ask our own handshake.
    fn diagnose(&self, problem: Option<KafkaProblem>, reason: &str) -> Option<Refusal> {
        if problem != Some(KafkaProblem::Other)
            || !reason.to_ascii_lowercase().contains(VERIFY_FAILED)
        {
            return problem.map(|p| (p, None));
        }
        #[cfg(feature = "tls")]
        if let Some((found, why)) = self.trust.diagnose(reason) {
            return Some((found, Some(why)));
        }
        problem.map(|p| (p, None))
    }

    /// The error for a wait that timed out: a permanent [`KafkaRefused`] if the last
    /// broker error was a TLS or SASL refusal, else a timeout that names that error.
    /// `what` says what was awaited and from which broker(s).
    pub(crate) fn timed_out(&self, after: Duration, what: String) -> Error {
        let last = self.seen.lock().last.clone();
        match last {
            Some(Recorded { reason, refusal }) => match refusal {
                Some((problem, found)) => Error::permanent(
                    BACKEND,
                    KafkaRefused {
                        problem,
                        detail: match found {
                            Some(found) => format!("{reason}; checked with rustls: {found}"),
                            None => reason,
                        },
                    },
                ),
                None => Error::Timeout {
                    after,
                    what: format!("{what} (is it reachable?); last broker error: {reason}"),
                },
            },
            None => Error::Timeout {
                after,
                what: format!("{what} (is it reachable?)"),
            },
        }
    }
}

/// The librdkafka context of the producer and admin client: records broker-connection
/// errors (see the module docs) and logs each distinct one once.
pub struct KafkaContext {
    pub(crate) errors: BrokerErrors,
}

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.record(&error, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: RDKafkaErrorCode, reason: &str) -> Option<KafkaProblem> {
        let errors = BrokerErrors::new(&ClientConfig::new());
        errors.record(&KafkaError::Global(code), reason);
        errors.record(
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        let e = errors.timed_out(Duration::from_secs(1), "x".into());
        let Error::Backend { source, .. } = e else {
            return None;
        };
        source.downcast_ref::<KafkaRefused>().map(|r| r.problem)
    }

    #[test]
    fn tls_and_login_refusals_are_classified() {
        let verify = "ssl://h:9093/bootstrap: SSL handshake failed: error:0A000086:SSL \
                      routines::certificate verify failed";
        assert_eq!(
            refused(
                RDKafkaErrorCode::SSL,
                &format!("{verify}: certificate has expired")
            ),
            Some(KafkaProblem::Expired)
        );
        assert_eq!(
            refused(
                RDKafkaErrorCode::SSL,
                &format!("{verify}: IP address mismatch")
            ),
            Some(KafkaProblem::WrongName)
        );
        assert_eq!(
            refused(
                RDKafkaErrorCode::SSL,
                &format!("{verify}: unable to get local issuer certificate")
            ),
            Some(KafkaProblem::UnknownIssuer)
        );
        assert_eq!(
            refused(
                RDKafkaErrorCode::Authentication,
                "SASL authentication error"
            ),
            Some(KafkaProblem::AuthFailed)
        );
        assert_eq!(
            refused(
                RDKafkaErrorCode::BrokerTransportFailure,
                "Connection refused"
            ),
            None
        );
    }

    #[test]
    fn other_errors_keep_the_timeout_and_name_the_reason() {
        let errors = BrokerErrors::new(&ClientConfig::new());
        errors.record(
            &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "h:9092/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)",
        );
        let e = errors.timed_out(Duration::from_secs(1), "x".into());
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("last broker error: h:9092/bootstrap: Connect"),
            "{e}"
        );
        assert!(!e.to_string().contains("after 0ms"), "{e}");
    }
}
