//! Why a broker's certificate failed verification.
//!
//! librdkafka's OpenSSL reports only "certificate verify failed", whether the
//! certificate is signed by an unknown CA, expired, or made for another host. One
//! handshake of our own with rustls, against the same CA and host, names which.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConnection, RootCertStore};

use crate::context::KafkaProblem;

/// Bounds each step of the handshake; the broker answered librdkafka moments ago.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the client trusts, from its librdkafka settings.
#[derive(Clone, Debug)]
pub(crate) struct Trust {
    ca_location: Option<String>,
    ca_pem: Option<String>,
}

impl Trust {
    /// `ssl.ca.location` (a PEM file) or `ssl.ca.pem`; the system's roots otherwise.
    pub(crate) fn of(config: &ClientConfig) -> Self {
        Self {
            ca_location: config.get("ssl.ca.location").map(str::to_string),
            ca_pem: config.get("ssl.ca.pem").map(str::to_string),
        }
    }

    fn roots(&self) -> Option<RootCertStore> {
        let mut roots = RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = if let Some(pem) = &self.ca_pem {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .ok()?
        } else if let Some(path) = &self.ca_location {
            CertificateDer::pem_file_iter(path)
                .ok()?
                .collect::<Result<_, _>>()
                .ok()?
        } else {
            rustls_native_certs::load_native_certs().certs
        };
        for cert in certs {
            roots.add(cert).ok()?;
        }
        Some(roots)
    }

    /// The problem with the certificate of the broker named in librdkafka's `reason`
    /// (`ssl://host:port/...`) and rustls's description of it, or `None` if it cannot
    /// be told.
    pub(crate) fn diagnose(&self, reason: &str) -> Option<(KafkaProblem, String)> {
        let (host, port) = broker_address(reason)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(self.roots()?)
        .with_no_client_auth();
        let name = ServerName::try_from(host.to_string()).ok()?;
        let mut tls = ClientConnection::new(Arc::new(config), name).ok()?;
        let addr = (host, port).to_socket_addrs().ok()?.next()?;
        let mut socket = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
        socket.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
        socket.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
        while tls.is_handshaking() {
            if let Err(e) = tls.complete_io(&mut socket) {
                return classify(&e);
            }
        }
        None
    }
}

/// `host` and `port` from `ssl://host:port/bootstrap: ...` (or `sasl_ssl://`).
fn broker_address(reason: &str) -> Option<(&str, u16)> {
    let rest = &reason[reason.find("://")? + 3..];
    let address = &rest[..rest.find('/')?];
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

fn classify(e: &io::Error) -> Option<(KafkaProblem, String)> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(cert) = tls else {
        return None;
    };
    let problem = match cert {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            KafkaProblem::UnknownIssuer
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => KafkaProblem::Expired,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            KafkaProblem::WrongName
        }
        _ => KafkaProblem::Other,
    };
    Some((problem, tls.to_string()))
}

#[cfg(test)]
mod tests {
    use super::broker_address;

    #[test]
    fn the_broker_address_comes_from_librdkafkas_reason() {
        assert_eq!(
            broker_address("ssl://127.0.0.1:9093/bootstrap: SSL handshake failed"),
            Some(("127.0.0.1", 9093))
        );
        assert_eq!(
            broker_address("sasl_ssl://b-1.example.com:9096/1: error"),
            Some(("b-1.example.com", 9096))
        );
        assert_eq!(broker_address("1/1 brokers are down"), None);
    }
}
