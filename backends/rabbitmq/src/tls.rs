//! TLS for `amqps://`: which certificate authorities to trust, which client certificate
//! to show (mutual TLS), which name the broker's certificate must carry, and how a
//! refused handshake becomes a typed error.
//!
//! The files are read again at every connection, not once: certificates rotated on
//! disk (short-lived client certificates, a renewed CA bundle) take effect at the next
//! reconnect without a restart.

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use switchyard_core::backend::BrokerUrl;
use switchyard_core::{Error, Result};

use crate::BACKEND;

/// The URL settings this module reads.
pub(crate) const SETTINGS: &[&str] = &[
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
];

/// TLS settings of an `amqps://` URL.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    /// PEM file of the certificate authorities to trust, instead of the system's.
    ca_file: Option<String>,
    /// PEM files of the client certificate (chain) and its private key.
    identity: Option<(String, String)>,
    /// The name the broker's certificate must carry, if not the URL's host.
    server_name: Option<String>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // File names only: the key file's name is shown as a secret setting's value is.
        f.debug_struct("TlsSettings")
            .field("ca_file", &self.ca_file)
            .field(
                "cert_file",
                &self.identity.as_ref().map(|(cert, _)| cert.as_str()),
            )
            .field(
                "key_file",
                &self
                    .identity
                    .as_ref()
                    .map(|(_, key)| BrokerUrl::redact_setting("tls_key_file", key)),
            )
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl TlsSettings {
    /// Reads the `tls_*` settings; they are refused on a plain `amqp://` URL, where
    /// they would silently do nothing. The files are read once here, so a wrong path
    /// fails at startup and not at the first connection.
    pub(crate) fn from_url(parsed: &BrokerUrl) -> Result<Self> {
        let given: Vec<&str> = SETTINGS
            .iter()
            .copied()
            .filter(|s| parsed.param(s).is_some())
            .collect();
        if parsed.scheme != "amqps" {
            if let Some(first) = given.first() {
                return Err(Error::config(
                    *first,
                    "TLS settings need an amqps:// URL (this one is amqp://, unencrypted)",
                ));
            }
            return Ok(Self::default());
        }
        let identity = match (parsed.param("tls_cert_file"), parsed.param("tls_key_file")) {
            (Some(cert), Some(key)) => Some((cert.to_string(), key.to_string())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::config(
                    "tls_key_file",
                    "tls_cert_file needs tls_key_file, the PEM file of the client \
                     certificate's private key",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "tls_cert_file",
                    "tls_key_file needs tls_cert_file, the PEM file of the client certificate",
                ))
            }
        };
        let server_name = parsed.param("tls_server_name").map(str::to_string);
        if let Some(name) = &server_name {
            ServerName::try_from(name.as_str()).map_err(|_| {
                Error::config(
                    "tls_server_name",
                    format!("{name:?} is neither a DNS name nor an IP address"),
                )
            })?;
        }
        let settings = Self {
            ca_file: parsed.param("tls_ca_file").map(str::to_string),
            identity,
            server_name,
        };
        settings.client_config()?;
        Ok(settings)
    }

    /// The name the broker's certificate is checked against.
    pub(crate) fn server_name<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }

    /// The rustls client configuration: the CA file's authorities (only those: a
    /// private CA is the point of giving one) or the system's, and the client
    /// certificate if one is set.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = read_certs("tls_ca_file", path)?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(Error::config(
                        "tls_ca_file",
                        format!("{path}: no usable CA certificate in it"),
                    ));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(Error::config(
                        "tls_ca_file",
                        "the system has no CA certificates (install ca-certificates) and \
                         none were given: set tls_ca_file=<PEM file of the broker's CA>",
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config("tls", format!("no usable TLS version: {e}")))?
            .with_root_certificates(roots);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert_path, key_path)) => {
                let chain = read_certs("tls_cert_file", cert_path)?;
                if chain.is_empty() {
                    return Err(Error::config(
                        "tls_cert_file",
                        format!("{cert_path}: no PEM certificate in it"),
                    ));
                }
                let shown_key = BrokerUrl::redact_setting("tls_key_file", key_path);
                let pem = read_file("tls_key_file", key_path)?;
                // The parse error is not shown: it could quote the key.
                let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
                    Error::config(
                        "tls_key_file",
                        format!(
                            "{shown_key}: no unencrypted PEM private key in it (PKCS#8, \
                             PKCS#1 or SEC1; decrypt an encrypted key with openssl first)"
                        ),
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::config(
                        "tls_key_file",
                        format!("the key does not fit the certificate of tls_cert_file: {e}"),
                    )
                })?
            }
        };
        Ok(Arc::new(config))
    }
}

fn read_file(setting: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::config(
            setting,
            format!(
                "cannot read {}: {e}; give the path of a readable PEM file",
                BrokerUrl::redact_setting(setting, path)
            ),
        )
    })
}

fn read_certs(setting: &str, path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(setting, path)?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config(setting, format!("{path}: not a PEM certificate file: {e}")))
}

/// What went wrong in a TLS handshake, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsProblem {
    /// The broker's certificate is not signed by a trusted authority (wrong
    /// `tls_ca_file`, or a self-signed certificate).
    UnknownIssuer,
    /// The broker's certificate has expired, or is not valid yet (check clocks too).
    Expired,
    /// The broker's certificate does not name the host connected to (see
    /// `tls_server_name`).
    WrongName,
    /// The broker refused the client: it wants a client certificate
    /// (`tls_cert_file`/`tls_key_file`) or does not trust the one given.
    ClientCertificateRefused,
    /// Anything else: no common protocol version or cipher, a broken peer.
    Other,
}

/// A TLS handshake that failed in a way retrying cannot fix. Carried as the source of
/// a permanent [`Error::Backend`], so callers can downcast to it.
#[derive(Debug)]
pub struct TlsRefused {
    /// What went wrong.
    pub problem: TlsProblem,
    /// The name the certificate was checked against.
    pub server_name: String,
    /// rustls's description.
    pub detail: String,
}

impl fmt::Display for TlsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.server_name;
        let what = match self.problem {
            TlsProblem::UnknownIssuer => format!(
                "the certificate of {name} is not signed by a trusted CA; set tls_ca_file to \
                 the PEM file of the CA that signed it"
            ),
            TlsProblem::Expired => format!(
                "the certificate of {name} has expired or is not valid yet (check the \
                 broker's certificate and both clocks)"
            ),
            TlsProblem::WrongName => format!(
                "the certificate presented is not valid for the name {name}; connect with \
                 the name in the certificate or set tls_server_name to it"
            ),
            TlsProblem::ClientCertificateRefused => format!(
                "{name} refused the client: it requires a client certificate \
                 (tls_cert_file and tls_key_file) or does not trust the one given"
            ),
            TlsProblem::Other => format!("the TLS handshake with {name} failed"),
        };
        write!(f, "TLS: {what} ({})", self.detail)
    }
}

impl std::error::Error for TlsRefused {}

/// The typed error for a failed TLS handshake, if `e` is one rustls reported.
pub(crate) fn classify(e: &io::Error, server_name: &str) -> Option<TlsRefused> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let problem = match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsProblem::UnknownIssuer
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsProblem::Expired,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsProblem::WrongName
            }
            _ => TlsProblem::Other,
        },
        rustls::Error::AlertReceived(alert) => {
            use rustls::AlertDescription as A;
            match alert {
                A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::CertificateUnknown
                | A::AccessDenied => TlsProblem::ClientCertificateRefused,
                _ => TlsProblem::Other,
            }
        }
        _ => TlsProblem::Other,
    };
    Some(TlsRefused {
        problem,
        server_name: server_name.to_string(),
        detail: tls.to_string(),
    })
}

/// A [`TlsRefused`] as switchyard's error: permanent, since the same certificates
/// give the same answer next time.
pub(crate) fn refused(e: TlsRefused) -> Error {
    Error::permanent(BACKEND, e)
}
