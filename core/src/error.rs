//! The one error type every backend returns, and the error a handler returns.

use std::fmt;
use std::time::Duration;

/// A boxed error that can cross threads: the source of backend and codec errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with switchyard's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in switchyard, whatever the backend.
///
/// Backends map their client's errors onto these variants (mostly [`Error::Backend`]),
/// so applications and middleware never see a per-backend error enum.
/// [`Error::is_transient`] tells a broker hiccup (retry it) from a mistake (do not).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic, group or queue name that no backend accepts.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// What was being named: "topic", "group" or "queue".
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected and what would be accepted.
        reason: String,
    },
    /// A setting with a value that cannot work.
    #[error("invalid setting `{setting}`: {message}")]
    Config {
        /// The setting's name, as the user spells it (builder method or URL parameter).
        setting: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A URL whose scheme no backend handles.
    #[error("unknown broker URL scheme `{scheme}` in {url:?}: use memory://, kafka://host:port or amqp://user:pass@host:port/vhost")]
    UnknownScheme {
        /// The scheme found in the URL.
        scheme: String,
        /// The whole URL, with any password removed.
        url: String,
    },
    /// A URL for a backend that this build of switchyard does not contain.
    #[error("the `{scheme}://` backend is not compiled in: enable the `{feature}` feature of the `switchyard` crate, e.g. switchyard = {{ version = \"0.1\", features = [\"{feature}\"] }}")]
    BackendNotCompiled {
        /// The URL scheme that asked for it.
        scheme: String,
        /// The Cargo feature that brings it in.
        feature: &'static str,
    },
    /// The backend cannot do what was asked (see its capabilities).
    #[error("the {backend} backend does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The missing ability.
        what: String,
    },
    /// A delivery was acked or nacked a second time.
    #[error("delivery {id} was already {state}; a delivery is settled exactly once")]
    AlreadySettled {
        /// The message id.
        id: String,
        /// "acked" or "nacked".
        state: &'static str,
    },
    /// A delivery was settled after its subscription closed; the broker redelivers it.
    #[error(
        "the subscription of delivery {id} is closed; the message was returned for redelivery"
    )]
    SubscriptionClosed {
        /// The message id.
        id: String,
    },
    /// The broker client was closed.
    #[error("the {backend} broker client is closed")]
    Closed {
        /// The backend's name.
        backend: &'static str,
    },
    /// A value could not be encoded into a payload.
    #[error("failed to encode {target} as {content_type}: {source}")]
    Encode {
        /// The codec's content type.
        content_type: String,
        /// The Rust type being encoded.
        target: &'static str,
        /// The codec's error.
        source: BoxError,
    },
    /// A payload could not be decoded into the handler's type. Never transient.
    #[error("failed to decode a {content_type} payload into {target}: {source}")]
    Decode {
        /// The content type the payload was decoded as.
        content_type: String,
        /// The Rust type the handler asked for.
        target: &'static str,
        /// The codec's error.
        source: BoxError,
    },
    /// A message larger than the backend accepts.
    #[error("message {id} of {size} bytes exceeds the {backend} limit of {limit} bytes")]
    MessageTooLarge {
        /// The message id.
        id: String,
        /// The message's payload size.
        size: usize,
        /// The limit.
        limit: usize,
        /// The backend's name.
        backend: &'static str,
    },
    /// An operation did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// How long we waited.
        after: Duration,
        /// What we waited for.
        what: String,
    },
    /// A request's responder failed and answered with an error reply instead of a
    /// result. Transient when the responder's failure was (a retry of the request may
    /// pass).
    #[error("the responder on topic {topic:?} answered request {request_id} with a {kind} error: {message}")]
    ErrorReply {
        /// The topic the request was sent to.
        topic: String,
        /// The request message's id.
        request_id: String,
        /// The responder's failure kind.
        kind: FailureKind,
        /// The responder's error text.
        message: String,
    },
    /// An error from the broker or its client library.
    #[error("{backend}: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// Whether trying again may succeed.
        transient: bool,
        /// The client's error.
        source: BoxError,
    },
}

impl Error {
    /// Whether the same operation may succeed if tried again (a broker hiccup, a
    /// timeout, back-pressure) rather than failing the same way (bad input, bad config).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Backend { transient, .. } => *transient,
            Error::Timeout { .. } | Error::Closed { .. } => true,
            Error::ErrorReply { kind, .. } => kind.is_retryable(),
            _ => false,
        }
    }

    /// A backend error that may go away on retry.
    pub fn transient(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            transient: true,
            source: source.into(),
        }
    }

    /// A backend error that will not go away on retry.
    pub fn permanent(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            transient: false,
            source: source.into(),
        }
    }

    /// A configuration error naming the setting and the fix.
    pub fn config(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

/// What kind of failure a handler reported; travels to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned an error that may pass on retry.
    Transient,
    /// The handler returned an error that retrying will not fix.
    Permanent,
    /// The payload did not decode into the handler's type.
    Decode,
    /// The handler panicked.
    Panic,
    /// Something the handling depends on (an idempotency store, say) was unreachable:
    /// the message itself is not at fault. Retryable, and never a reason to dead-letter
    /// it or to count the delivery against its limit.
    Unavailable,
}

impl FailureKind {
    /// A stable lower-case name, used in headers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
            FailureKind::Decode => "decode",
            FailureKind::Panic => "panic",
            FailureKind::Unavailable => "unavailable",
        }
    }

    /// Every kind, in declaration order: what [`from_name`](Self::from_name) searches.
    const ALL: [FailureKind; 5] = [
        FailureKind::Transient,
        FailureKind::Permanent,
        FailureKind::Decode,
        FailureKind::Panic,
        FailureKind::Unavailable,
    ];

    /// The kind whose [`as_str`](Self::as_str) name is `name`; `None` for any other
    /// text, such as a kind a newer version wrote into a header.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether a retry may help.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureKind::Transient | FailureKind::Panic | FailureKind::Unavailable
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error a handler returns.
///
/// Any `std::error::Error` converts into it with `?` (as a transient failure), so handlers
/// can use their own error types. Mark failures that retrying cannot fix with
/// [`HandlerError::permanent`]: the retry middleware sends those straight on.
///
/// It deliberately does not implement `std::error::Error` itself, which is what lets the
/// blanket `From` impl exist (the same trick as `anyhow::Error`).
pub struct HandlerError {
    kind: FailureKind,
    source: BoxError,
    retries: u32,
    first_failure: std::time::SystemTime,
}

impl HandlerError {
    /// A failure that may pass if the message is tried again.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::new(FailureKind::Transient, source)
    }

    /// A failure that retrying will not fix; it goes straight to the dead-letter queue.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::new(FailureKind::Permanent, source)
    }

    /// A dependency of the handling was unreachable; see [`FailureKind::Unavailable`].
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(FailureKind::Unavailable, source)
    }

    /// A failure of the given kind.
    pub fn new(kind: FailureKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
            retries: 0,
            first_failure: std::time::SystemTime::now(),
        }
    }

    /// How many in-process retries ran before this final failure (set by the retry layer).
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// When the first of those attempts failed (this error's creation if none).
    pub fn first_failure(&self) -> std::time::SystemTime {
        self.first_failure
    }

    /// Records the retries that came before this failure; used by retry middleware.
    #[must_use]
    pub fn with_retries(mut self, retries: u32, first_failure: std::time::SystemTime) -> Self {
        self.retries = retries;
        self.first_failure = first_failure.min(self.first_failure);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, without the failure kind.
    pub fn into_source(self) -> BoxError {
        self.source
    }

    /// Recovers a handler error that went through a `tower` layer as a [`BoxError`]
    /// (for example `tower::timeout`), keeping its kind; any other error is transient.
    /// Use it as `.map_err(HandlerError::from_boxed)` above such a layer.
    pub fn from_boxed(err: BoxError) -> Self {
        match err.downcast::<Boxed>() {
            Ok(inner) => inner.0,
            Err(other) => Self::new(FailureKind::Transient, other),
        }
    }
}

/// A [`HandlerError`] travelling as a `std::error::Error` through layers that want one.
#[derive(Debug)]
struct Boxed(HandlerError);

impl fmt::Display for Boxed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Boxed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0.source)
    }
}

impl From<HandlerError> for BoxError {
    fn from(err: HandlerError) -> Self {
        Box::new(Boxed(err))
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        let source: BoxError = Box::new(err);
        // A switchyard error keeps its meaning: a decode error is never worth a retry.
        let kind = match source.downcast_ref::<Error>() {
            Some(Error::Decode { .. }) => FailureKind::Decode,
            Some(e) if !e.is_transient() => FailureKind::Permanent,
            _ => FailureKind::Transient,
        };
        Self::new(kind, source)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("retries", &self.retries)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failure: {}", self.kind, self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_read_back_from_their_names_and_nothing_else() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::from_name(kind.as_str()), Some(kind));
        }
        for other in ["", "Transient", "transient ", "fatal"] {
            assert_eq!(FailureKind::from_name(other), None, "{other:?}");
        }
    }

    #[test]
    fn io_errors_convert_as_transient() {
        fn fails() -> Result<(), HandlerError> {
            Err(std::io::Error::other("disk full"))?;
            Ok(())
        }
        let err = fails().unwrap_err();
        assert_eq!(err.kind(), FailureKind::Transient);
        assert!(err.to_string().contains("disk full"));
    }

    #[test]
    fn decode_errors_keep_their_kind() {
        let decode = Error::Decode {
            content_type: "application/json".into(),
            target: "Order",
            source: "expected value".into(),
        };
        let err = HandlerError::from(decode);
        assert_eq!(err.kind(), FailureKind::Decode);
        assert!(!err.is_retryable());
    }

    #[test]
    fn kind_survives_a_trip_through_box_error() {
        let boxed: BoxError = HandlerError::permanent("bad order").into();
        let back = HandlerError::from_boxed(boxed);
        assert_eq!(back.kind(), FailureKind::Permanent);
        assert!(back.to_string().contains("bad order"));
        let other = HandlerError::from_boxed("request timed out".into());
        assert_eq!(other.kind(), FailureKind::Transient);
    }

    #[test]
    fn transience_is_reported() {
        assert!(Error::transient("kafka", "broker down").is_transient());
        assert!(!Error::permanent("kafka", "topic authorization failed").is_transient());
        assert!(!Error::config("concurrency", "must be at least 1").is_transient());
    }
}
