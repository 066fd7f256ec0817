//! What the TLS tests share: a throwaway certificate authority with the certificates
//! each case needs ([`Pki`]), and a TLS terminator in front of a plain broker
//! ([`Terminator`]), so the brokers on this machine need no TLS listener of their own.
#![allow(dead_code)] // each test binary uses its own share of these

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A certificate and its private key, for the terminator to present.
#[derive(Clone)]
pub(crate) struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

/// A throwaway CA and everything signed by it, written to a directory of its own
/// (removed on drop):
/// - `ca.pem`: the CA the clients trust; `other-ca.pem`: a CA that signed nothing here;
/// - `client.pem`/`client.key`: a client certificate signed by the CA;
/// - in memory, the server certificates: [`Pki::server`] (for `127.0.0.1` and
///   `localhost`), [`Pki::expired`], [`Pki::wrong_host`] (for `wrong.example` only).
pub(crate) struct Pki {
    dir: PathBuf,
    pub(crate) server: Leaf,
    pub(crate) expired: Leaf,
    pub(crate) wrong_host: Leaf,
    ca_der: CertificateDer<'static>,
}

fn key_pair() -> KeyPair {
    KeyPair::generate().expect("generating a key")
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, key_pair()).unwrap()
}

fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    expired: bool,
) -> Leaf {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "switchyard test");
    params.extended_key_usages = vec![usage];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = key_pair();
    let cert = params.signed_by(&key, ca).unwrap();
    Leaf {
        chain: vec![cert.der().clone()],
        key: key.serialize_der(),
    }
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

impl Pki {
    /// Makes the CA and every certificate (a few milliseconds: ECDSA P-256 keys).
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-tls-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = new_ca("switchyard test CA");
        let other = new_ca("some other CA");
        let server_names = ["127.0.0.1", "localhost"];
        let server = leaf(
            &ca,
            &server_names,
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let expired = leaf(
            &ca,
            &server_names,
            ExtendedKeyUsagePurpose::ServerAuth,
            true,
        );
        let wrong_host = leaf(
            &ca,
            &["wrong.example"],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let client_key = key_pair();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "guest");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client.signed_by(&client_key, &ca).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
        Self {
            dir,
            server,
            expired,
            wrong_host,
            ca_der: ca.der().clone(),
        }
    }

    /// The path of one of the files, as a URL setting's value.
    pub(crate) fn path(&self, file: &str) -> String {
        let path = self.dir.join(file);
        assert!(Path::new(&path).exists(), "no {file} in the test PKI");
        path.to_str().unwrap().to_string()
    }

    /// A server configuration presenting `leaf`; with `client_auth`, clients must show
    /// a certificate signed by the CA.
    pub(crate) fn server_config(&self, leaf: &Leaf, client_auth: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_auth {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key.clone()));
        Arc::new(builder.with_single_cert(leaf.chain.clone(), key).unwrap())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the terminator starts a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// TLS from the first byte (AMQP, Kafka).
    Tls,
    /// PostgreSQL's: the client first sends an 8-byte SSLRequest and waits for one byte,
    /// `S` (go ahead with TLS) or `N`; only then does the TLS handshake start. A plain
    /// TLS terminator would read the SSLRequest as a broken ClientHello.
    PostgresSslRequest,
}

/// A TLS terminator on 127.0.0.1 (a port of its own) in front of `upstream`, which it
/// reaches over plain TCP; stops when dropped.
pub(crate) struct Terminator {
    /// Where clients connect.
    pub(crate) addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// PostgreSQL's SSLRequest: length 8, then the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl Terminator {
    /// Starts one, on the current tokio runtime.
    pub(crate) async fn start(upstream: &str, config: Arc<ServerConfig>, opening: Opening) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, upstream, config, opening)
    }

    /// Serves on a listener already bound (a dedicated broker needs to know the port
    /// before it starts, to advertise it).
    pub(crate) fn serve(
        listener: TcpListener,
        upstream: &str,
        config: Arc<ServerConfig>,
        opening: Opening,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let upstream = upstream.to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    // A failed handshake just ends this connection: the client reports it.
                    let _ = relay(client, acceptor, &upstream, opening).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// How many TCP connections clients opened so far (a client that retries a
    /// refused login or certificate shows up here).
    pub(crate) fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn relay(
    mut client: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: &str,
    opening: Opening,
) -> std::io::Result<()> {
    if opening == Opening::PostgresSslRequest {
        let mut request = [0u8; 8];
        client.read_exact(&mut request).await?;
        if request != SSL_REQUEST {
            return Err(std::io::Error::other("expected an SSLRequest"));
        }
        client.write_all(b"S").await?;
    }
    let mut tls = acceptor.accept(client).await?;
    let mut server = TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two members of group `g` on `topic` share the work: rounds of 16 keyed messages until
/// both have had some (partitions move to the second member at its first rebalance),
/// then every message published is received, all within `limit`; `round` is the pause
/// after each round.
pub(crate) async fn two_members_share_a_topic(
    broker: &dyn switchyard::Broker,
    topic: &str,
    limit: std::time::Duration,
    round: std::time::Duration,
) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use switchyard::{Message, SubscribeOptions};

    let seen: Arc<Mutex<Vec<HashSet<String>>>> = Arc::new(Mutex::new(vec![HashSet::new(); 2]));
    let mut members = Vec::new();
    // A group of this call's own: tests run side by side, and one group's members on
    // different topics would rebalance each other.
    let group = switchyard_conformance::support::unique_name("g");
    for m in 0..2 {
        let mut sub = broker
            .subscribe(SubscribeOptions::new(topic, &group))
            .await
            .expect("joining through TLS");
        let seen = seen.clone();
        members.push(tokio::spawn(async move {
            while let Some(Ok(d)) = sub.recv().await {
                let id = String::from_utf8(d.payload().to_vec()).unwrap();
                d.ack().await.unwrap();
                seen.lock().unwrap()[m].insert(id);
            }
        }));
    }
    let mut published = 0;
    let deadline = Instant::now() + limit;
    loop {
        let batch: Vec<Message> = (published..published + 16)
            .map(|i| Message::new(i.to_string()).with_key(format!("k{i}")))
            .collect();
        broker.publish_batch(topic, batch).await.unwrap();
        published += 16;
        tokio::time::sleep(round).await;
        if seen.lock().unwrap().iter().all(|s| !s.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "one member never got work");
    }
    loop {
        let got: HashSet<String> = seen.lock().unwrap().iter().flatten().cloned().collect();
        if got.len() == published {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "received {} of {published}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for m in members {
        m.abort();
    }
}
