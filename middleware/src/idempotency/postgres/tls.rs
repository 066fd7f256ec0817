//! TLS for the PostgreSQL store, by connection string, through rustls.
//!
//! `sslmode=require` (or `verify-ca`, `verify-full`) turns TLS on; `sslrootcert=<PEM
//! file>` names the certificate authorities to trust instead of the system's. Unlike
//! libpq's `require`, the server's certificate is always checked, authority and host
//! name both: rustls has no "encrypt but trust anyone" mode, and a store that trusted
//! anyone would hand its marks to whoever sits in between. `prefer` (tokio-postgres's
//! default) and `disable` connect without TLS.
//!
//! tokio-postgres does not know `sslrootcert` and refuses `verify-*`: both are taken
//! out of the string here before it is parsed.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use switchyard_core::{Error, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// The connection string without the settings tokio-postgres cannot parse, and what
/// they asked for.
pub(super) struct Split {
    /// What tokio-postgres parses.
    pub(super) config: String,
    /// `sslrootcert`, if given.
    pub(super) ca_file: Option<String>,
    /// The settings' names, in order.
    pub(super) keys: Vec<String>,
}

/// Takes `sslrootcert` out of a URL (`postgres://…?sslrootcert=…`) or key/value
/// (`host=… sslrootcert=…`) connection string, and turns `verify-ca`/`verify-full`
/// into `require` (which this store checks as strictly).
pub(super) fn split(config: &str) -> Result<Split> {
    let mut ca_file = None;
    let mut keys = Vec::new();
    let is_url = config.starts_with("postgres://") || config.starts_with("postgresql://");
    let config = if is_url {
        let Some((base, query)) = config.split_once('?') else {
            return Ok(Split {
                config: config.to_string(),
                ca_file,
                keys,
            });
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            keys.push(key.to_string());
            match key {
                "sslrootcert" => ca_file = Some(decode(value)?),
                "sslmode" if is_verify(&decode(value)?) => kept.push("sslmode=require".into()),
                _ => kept.push(pair.to_string()),
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (key, value, raw) in key_values(config)? {
            keys.push(key.to_string());
            match key {
                "sslrootcert" => ca_file = Some(value),
                "sslmode" if is_verify(&value) => kept.push("sslmode=require".to_string()),
                _ => kept.push(raw.to_string()),
            }
        }
        kept.join(" ")
    };
    Ok(Split {
        config,
        ca_file,
        keys,
    })
}

/// tokio-postgres's refusal of a connection string, without any part of the string
/// that may be a password: it names an unknown option, and a password holding a space
/// or a raw `&` is cut into such "options", so one is named only when it looks like a
/// setting's name and does not follow a secret setting.
pub(super) fn parse_error(refusal: &str, keys: &[String]) -> Error {
    let unknown = refusal
        .split_once("unknown option `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name);
    let Some(name) = unknown else {
        return Error::config(
            "postgres",
            format!("the connection string does not parse: {refusal}"),
        );
    };
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let after_secret = keys
        .iter()
        .position(|k| k == name)
        .and_then(|i| i.checked_sub(1))
        .is_some_and(|i| switchyard_core::backend::BrokerUrl::is_secret_setting(&keys[i]));
    if plain && !after_secret {
        Error::config(name, "unknown setting in the PostgreSQL connection string")
    } else {
        Error::config(
            "postgres",
            "the connection string holds a setting tokio-postgres does not know (not shown: \
             it may be part of a password); quote a value holding spaces (password='a b') \
             and percent-encode '&' in a URL's values as %26",
        )
    }
}

fn is_verify(mode: &str) -> bool {
    mode == "verify-ca" || mode == "verify-full"
}

fn decode(value: &str) -> Result<String> {
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| Error::config("postgres", "the connection string is not UTF-8"))
}

/// libpq's `key = value` pairs, a value maybe 'quoted' with `\'` and `\\` escapes:
/// (key, value, the pair as written).
fn key_values(config: &str) -> Result<Vec<(&str, String, &str)>> {
    let bytes = config.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i == bytes.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &config[start..i];
        i = skip_space(i);
        if bytes.get(i) != Some(&b'=') {
            // The word is not shown: it may be a password, or a URL holding one.
            return Err(Error::config(
                "postgres",
                format!(
                    "expected `key=value` at byte {start} of the connection string; a URL \
                     starts with `postgres://` or `postgresql://` in lower case, and a value \
                     holding spaces is quoted: password='a b'"
                ),
            ));
        }
        i = skip_space(i + 1);
        let mut value = String::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => {
                        return Err(Error::config(
                            "postgres",
                            // The key is not shown: a password with a space may have
                            // been cut into it.
                            "unterminated quoted value in the connection string",
                        ));
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1] as char);
                        i += 2;
                    }
                    Some(_) => {
                        let c = config[i..].chars().next().unwrap_or('\u{fffd}');
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            let v = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&config[v..i]);
        }
        pairs.push((key, value, &config[start..i]));
    }
}

/// The rustls configuration: the CA file's authorities (only those) or the system's.
pub(super) fn client_config(ca_file: Option<&str>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(
                    "sslrootcert",
                    format!("cannot read {path}: {e}; give the path of a readable PEM file"),
                )
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::config("sslrootcert", format!("{path}: not a PEM file: {e}"))
                })?;
            if roots.add_parsable_certificates(certs).0 == 0 {
                return Err(Error::config(
                    "sslrootcert",
                    format!("{path}: no usable CA certificate in it"),
                ));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(Error::config(
                    "sslrootcert",
                    "the system has no CA certificates (install ca-certificates) and none \
                     were given: set sslrootcert=<PEM file of the server's CA>",
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("sslmode", format!("no usable TLS version: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What went wrong in the TLS handshake with PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostgresTlsProblem {
    /// The server's certificate is not signed by a trusted authority (see
    /// `sslrootcert`).
    UnknownIssuer,
    /// The server's certificate has expired or is not valid yet.
    Expired,
    /// The server's certificate does not name the host connected to.
    WrongName,
    /// Anything else rustls refused.
    Other,
}

/// A TLS handshake with PostgreSQL that failed in a way retrying cannot fix. Carried
/// as the source of a permanent [`Error::Backend`], so callers can downcast to it.
#[derive(Debug, Clone)]
pub struct PostgresTlsRefused {
    /// What went wrong.
    pub problem: PostgresTlsProblem,
    /// The host name the certificate was checked against.
    pub host: String,
    /// rustls's description.
    pub detail: String,
}

impl fmt::Display for PostgresTlsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = &self.host;
        let what = match self.problem {
            PostgresTlsProblem::UnknownIssuer => format!(
                "the certificate of {host} is not signed by a trusted CA; set sslrootcert to \
                 the PEM file of the CA that signed it"
            ),
            PostgresTlsProblem::Expired => format!(
                "the certificate of {host} has expired or is not valid yet (check the \
                 server's certificate and both clocks)"
            ),
            PostgresTlsProblem::WrongName => format!(
                "the certificate presented is not valid for the host {host}; connect with \
                 the name in the certificate"
            ),
            PostgresTlsProblem::Other => format!("the TLS handshake with {host} failed"),
        };
        write!(f, "PostgreSQL TLS: {what} ({})", self.detail)
    }
}

impl std::error::Error for PostgresTlsRefused {}

fn classify(e: &io::Error, host: &str) -> Option<PostgresTlsRefused> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let problem = match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => PostgresTlsProblem::UnknownIssuer,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => PostgresTlsProblem::Expired,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => PostgresTlsProblem::WrongName,
        _ => PostgresTlsProblem::Other,
    };
    Some(PostgresTlsRefused {
        problem,
        host: host.to_string(),
        detail: tls.to_string(),
    })
}

/// tokio-postgres's TLS hook, on rustls.
#[derive(Clone)]
pub(super) struct MakeRustls(pub(super) Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Connect {
            connector: tokio_rustls::TlsConnector::from(self.0.clone()),
            name,
            host: host.to_string(),
        })
    }
}

/// One connection's handshake.
pub(super) struct Connect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    host: String,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<Stream<S>, BoxError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            match self.connector.connect(self.name, stream).await {
                Ok(tls) => Ok(Stream(Box::new(tls))),
                Err(e) => Err(match classify(&e, &self.host) {
                    Some(refused) => refused.into(),
                    None => e.into(),
                }),
            }
        })
    }
}

/// A TLS connection to PostgreSQL.
pub(super) struct Stream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM then runs without channel binding, as with libpq's default `prefer`.
        ChannelBinding::none()
    }
}

/// The typed error inside a failed connection, if a certificate check failed.
pub(super) fn refused(e: &tokio_postgres::Error) -> Option<PostgresTlsRefused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<PostgresTlsRefused>() {
            return Some(refused.clone());
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_and_verify_modes_are_taken_out() {
        let s =
            split("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&x=1").unwrap();
        assert_eq!(s.config, "postgres://u@h/db?sslmode=require&x=1");
        assert_eq!(s.ca_file.as_deref(), Some("/tmp/ca.pem"));
        let s = split("host=h sslrootcert = '/tmp/my ca.pem' sslmode=verify-ca user=u").unwrap();
        assert_eq!(s.config, "host=h sslmode=require user=u");
        assert_eq!(s.ca_file.as_deref(), Some("/tmp/my ca.pem"));
        let s = split("host=h password='a b\\'c' user=u").unwrap();
        assert_eq!(s.config, "host=h password='a b\\'c' user=u");
        assert_eq!(s.ca_file, None);
        assert!(split("host=h user").is_err());
        assert!(split("host='h").is_err());
    }
}
