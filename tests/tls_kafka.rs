//! Kafka through TLS (feature `kafka-tls`): a tansu of its own, started by the test on a
//! fresh database, behind a TLS terminator (tests/tls). Its advertised listener is the
//! terminator's address, since Kafka's metadata sends clients to the advertised
//! address: behind the shared tansu the client would be sent around the terminator.
//! Needs `tansu` (`source scripts/brokers.sh; ensure_tansu`); fails, never skips,
//! without it.

mod tls;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::kafka::{KafkaBroker, KafkaProblem, KafkaRefused};
use switchyard::{Broker, Error, Message, Publisher, SubscribeOptions, Subscriber};
use switchyard_conformance::support::unique_name;
use tls::{Opening, Pki, Terminator};
use tokio::net::TcpListener;

/// A hang guard, not a timing assertion: tansu joins groups slowly.
const LONG: Duration = Duration::from_secs(90);

/// A tansu process on its own port and database; killed and removed on drop.
struct Tansu {
    child: Child,
    dir: PathBuf,
    port: u16,
    advertised: u16,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tansu_binary() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(PathBuf::from)
        .chain([PathBuf::from(home).join(".cargo/bin")])
        .map(|dir| dir.join("tansu"))
        .collect::<Vec<_>>();
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("tansu must be installed: source scripts/brokers.sh; ensure_tansu")
}

impl Tansu {
    /// Starts tansu on a free port, advertising `advertised` (the terminator's port).
    async fn start(advertised: u16) -> Self {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!(
            "switchyard-tansu-tls-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(&dir, port, advertised, false).await;
        Self {
            child,
            dir,
            port,
            advertised,
        }
    }

    async fn spawn(dir: &Path, port: u16, advertised: u16, authentication: bool) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .unwrap();
        let mut command = Command::new(tansu_binary());
        command.current_dir(dir).args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine",
            "sqlite://tansu.db",
        ]);
        if authentication {
            command.arg("--authentication");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child
    }

    /// Adds a SCRAM-SHA-512 user, then restarts requiring SASL logins: tansu takes
    /// credentials only from an authenticated client, so the user comes first.
    async fn require_scram_user(&mut self, user: &str, password: &str) {
        let status = Command::new(tansu_binary())
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--mechanism",
                "scram512",
                user,
                password,
            ])
            .stdout(Stdio::null())
            .status()
            .expect("tansu user create");
        assert!(status.success(), "tansu user create: {status}");
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(&self.dir, self.port, self.advertised, true).await;
    }
}

/// tansu behind a terminator presenting the PKI's server certificate.
async fn tls_kafka(pki: &Pki) -> (Tansu, Terminator) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tansu = Tansu::start(listener.local_addr().unwrap().port()).await;
    let terminator = Terminator::serve(
        listener,
        &format!("127.0.0.1:{}", tansu.port),
        pki.server_config(&pki.server, false),
        Opening::Tls,
    );
    (tansu, terminator)
}

/// The terminator's address, the test CA, and `settings`.
fn url(t: &Terminator, pki: &Pki, settings: &str) -> String {
    format!(
        "kafka://127.0.0.1:{}?ssl.ca.location={}&partitions=4&{settings}",
        t.addr.port(),
        pki.path("ca.pem")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_and_a_two_member_group_through_tls() {
    let pki = Pki::new();
    let (_tansu, t) = tls_kafka(&pki).await;
    let broker =
        Arc::new(KafkaBroker::connect(&url(&t, &pki, "security.protocol=SSL")).expect("a TLS URL"));
    let topic = unique_name("sy-tls-t");
    tls::two_members_share_a_topic(&*broker, &topic, LONG, Duration::from_millis(200)).await;
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_scram_login_through_tls() {
    let pki = Pki::new();
    let (mut tansu, t) = tls_kafka(&pki).await;
    tansu.require_scram_user("ann", "s3cret%pw").await;
    let url = url(
        &t,
        &pki,
        "security.protocol=SASL_SSL&sasl.mechanisms=SCRAM-SHA-512&sasl.username=ann\
         &sasl.password=s3cret%25pw",
    );
    let broker = KafkaBroker::connect(&url).expect("a SASL_SSL URL");
    assert!(!format!("{:?}", broker.config()).contains("s3cret"));
    let topic = unique_name("sy-tls-sasl");
    let mut sub = broker
        .subscribe(SubscribeOptions::new(&topic, unique_name("g")))
        .await
        .expect("joining with a SCRAM login through TLS");
    broker
        .publish(&topic, Message::new("logged in"))
        .await
        .unwrap();
    let d = tokio::time::timeout(LONG, sub.recv())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();
    assert_eq!(d.payload(), b"logged in");
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

/// Short enough to keep these tests quick; a refusal shows within milliseconds.
const REFUSED_WAIT: &str = "publish_timeout_ms=4000";

/// What a publish through `url` was refused with: librdkafka retries a refused
/// handshake or login until the wait times out, which must end in the typed error.
async fn refusal(url: &str, secret: Option<&str>) -> (KafkaProblem, String) {
    let broker = KafkaBroker::connect(url).expect("a URL");
    let e = broker
        .publish(&unique_name("sy-tls-refused"), Message::new("x"))
        .await
        .expect_err("the broker refuses this client");
    if let Some(secret) = secret {
        assert!(!format!("{e} {e:?}").contains(secret), "{e:?}");
    }
    let Error::Backend {
        transient, source, ..
    } = &e
    else {
        panic!("expected a typed refusal, got {e:?}");
    };
    assert!(!transient, "{e:?}");
    let refused = source
        .downcast_ref::<KafkaRefused>()
        .unwrap_or_else(|| panic!("expected a KafkaRefused, got {e:?}"));
    (refused.problem, e.to_string())
}

/// A terminator presenting `leaf`; the handshake fails before it reaches upstream.
async fn presenting(pki: &Pki, leaf: &tls::Leaf) -> Terminator {
    Terminator::start("127.0.0.1:9", pki.server_config(leaf, false), Opening::Tls).await
}

#[tokio::test]
async fn a_wrong_ca_is_a_typed_unknown_issuer_error() {
    let pki = Pki::new();
    let t = presenting(&pki, &pki.server).await;
    let url = format!(
        "kafka://127.0.0.1:{}?security.protocol=SSL&ssl.ca.location={}&{REFUSED_WAIT}",
        t.addr.port(),
        pki.path("other-ca.pem")
    );
    let (problem, e) = refusal(&url, None).await;
    assert_eq!(problem, KafkaProblem::UnknownIssuer, "{e}");
}

#[tokio::test]
async fn a_wrong_host_name_is_a_typed_wrong_name_error() {
    let pki = Pki::new();
    let t = presenting(&pki, &pki.wrong_host).await;
    let url = url(&t, &pki, &format!("security.protocol=SSL&{REFUSED_WAIT}"));
    let (problem, e) = refusal(&url, None).await;
    assert_eq!(problem, KafkaProblem::WrongName, "{e}");
}

#[tokio::test]
async fn an_expired_certificate_is_a_typed_expired_error() {
    let pki = Pki::new();
    let t = presenting(&pki, &pki.expired).await;
    let url = url(&t, &pki, &format!("security.protocol=SSL&{REFUSED_WAIT}"));
    let (problem, e) = refusal(&url, None).await;
    assert_eq!(problem, KafkaProblem::Expired, "{e}");
}

#[tokio::test]
async fn a_wrong_scram_password_is_a_typed_auth_failed_error() {
    let pki = Pki::new();
    let (mut tansu, t) = tls_kafka(&pki).await;
    tansu.require_scram_user("ann", "s3cret%pw").await;
    let url = url(
        &t,
        &pki,
        &format!(
            "security.protocol=SASL_SSL&sasl.mechanisms=SCRAM-SHA-512&sasl.username=ann\
             &sasl.password=wr0ng-pw&{REFUSED_WAIT}"
        ),
    );
    let (problem, e) = refusal(&url, Some("wr0ng-pw")).await;
    assert_eq!(problem, KafkaProblem::AuthFailed, "{e}");
}
