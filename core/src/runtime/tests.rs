//! The runtime against a scripted subscription: what it acks, nacks, counts and leaves
//! unsettled, with no broker.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{SubscribeOptions, Subscriber, Subscription};
use crate::delivery::{Acker, Delivery, Nack, Origin};
use crate::error::{FailureKind, HandlerError, Result};
use crate::message::Message;
use crate::runtime::{Consumer, ConsumerReport};

/// What happened to each delivery, by message payload, in order.
type Log = Arc<Mutex<Vec<(String, &'static str)>>>;

struct Recording {
    name: String,
    log: Log,
}

impl Recording {
    fn note(&self, what: &'static str) {
        self.log.lock().push((self.name.clone(), what));
    }
}

impl Acker for Recording {
    fn ack(&self) -> BoxFuture<'_, Result<()>> {
        self.note("ack");
        Box::pin(async { Ok(()) })
    }
    fn nack(&self, action: Nack) -> BoxFuture<'_, Result<()>> {
        self.note(match action {
            Nack::Requeue => "requeue",
            _ => "reject",
        });
        Box::pin(async { Ok(()) })
    }
    fn dropped_unsettled(&self) {
        self.note("dropped");
    }
}

/// Hands out what the test sends; ends when the sender is dropped.
struct Scripted(mpsc::UnboundedReceiver<Delivery>);

#[async_trait]
impl Subscription for Scripted {
    async fn recv_many(&mut self, buf: &mut Vec<Delivery>, max: usize) -> Result<usize> {
        let Some(first) = self.0.recv().await else {
            return Ok(0);
        };
        buf.push(first);
        while buf.len() < max {
            match self.0.try_recv() {
                Ok(d) => buf.push(d),
                Err(_) => break,
            }
        }
        Ok(buf.len())
    }
    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// A subscriber with scripted subscriptions, handed out in order.
struct Source(Mutex<Vec<Scripted>>);

#[async_trait]
impl Subscriber for Source {
    async fn subscribe(&self, _: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        let mut left = self.0.lock();
        assert!(!left.is_empty(), "more subscriptions than scripted");
        Ok(Box::new(left.remove(0)))
    }
}

/// A source, the sender that feeds it, and the log of settlements.
fn scripted() -> (Arc<Source>, mpsc::UnboundedSender<Delivery>, Log) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(Source(Mutex::new(vec![Scripted(rx)]))),
        tx,
        Log::default(),
    )
}

fn delivery(payload: &str, log: &Log) -> Delivery {
    let origin = Origin::new("t".into(), "g".into(), None, None);
    let acker = Recording {
        name: payload.to_string(),
        log: log.clone(),
    };
    Delivery::new(
        Arc::new(Message::new(payload.to_string())),
        1,
        origin,
        acker,
    )
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// Feeds `payloads`, ends the subscription, and runs the consumer to its end.
async fn run_all<S>(consumer: Consumer<S>, payloads: &[&str]) -> (ConsumerReport, Log)
where
    S: tower::Service<Delivery, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let (source, tx, log) = scripted();
    for p in payloads {
        tx.send(delivery(p, &log)).unwrap();
    }
    drop(tx);
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        consumer
            .redelivery_backoff(Duration::ZERO, Duration::ZERO)
            .run(source, CancellationToken::new()),
    )
    .await
    .expect("the consumer ends with its subscription")
    .expect("no fatal error");
    (report, log)
}

fn settled(log: &Log) -> Vec<(String, &'static str)> {
    let mut events = log.lock().clone();
    events.sort();
    events
}

fn ev(name: &str, what: &'static str) -> (String, &'static str) {
    (name.to_string(), what)
}

#[tokio::test]
async fn success_acks_and_failure_nacks_for_redelivery() {
    let consumer = Consumer::handler(SubscribeOptions::new("t", "g"), |d: Delivery| async move {
        match text(&d).as_str() {
            "bad" => Err(HandlerError::new(FailureKind::Transient, "no")),
            "slow" => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    });
    let (report, log) = run_all(consumer, &["ok", "bad", "slow"]).await;
    assert_eq!((report.acked, report.nacked, report.panics), (2, 1, 0));
    assert_eq!(
        settled(&log),
        vec![ev("bad", "requeue"), ev("ok", "ack"), ev("slow", "ack")]
    );
}

#[tokio::test]
async fn a_panic_is_a_failure_whether_in_the_call_or_while_running() {
    #[derive(Clone)]
    struct Panicky;
    impl tower::Service<Delivery> for Panicky {
        type Response = ();
        type Error = HandlerError;
        type Future = BoxFuture<'static, std::result::Result<(), HandlerError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::result::Result<(), HandlerError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, d: Delivery) -> Self::Future {
            if text(&d) == "in-call" {
                panic!("at once");
            }
            Box::pin(async move {
                tokio::task::yield_now().await;
                panic!("later")
            })
        }
    }
    let consumer = Consumer::new(SubscribeOptions::new("t", "g"), Panicky);
    let (report, log) = run_all(consumer, &["in-call", "running"]).await;
    assert_eq!((report.acked, report.nacked, report.panics), (0, 2, 2));
    assert_eq!(
        settled(&log),
        vec![ev("in-call", "requeue"), ev("running", "requeue")]
    );
}

#[tokio::test]
async fn a_delivery_the_handler_settled_is_left_alone() {
    let consumer = Consumer::handler(SubscribeOptions::new("t", "g"), |d: Delivery| async move {
        d.nack(Nack::Reject)
            .await
            .map_err(|e| HandlerError::new(FailureKind::Transient, e.to_string()))?;
        Err::<(), _>(HandlerError::new(FailureKind::Permanent, "after settling"))
    });
    let (report, log) = run_all(consumer, &["x"]).await;
    assert_eq!((report.acked, report.nacked), (0, 0));
    assert_eq!(settled(&log), vec![ev("x", "reject")]);
}

#[tokio::test]
async fn no_more_handlers_run_at_once_than_the_concurrency() {
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    let consumer = Consumer::handler(SubscribeOptions::new("t", "g"), move |_: Delivery| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let now = r.fetch_add(1, SeqCst) + 1;
            m.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            r.fetch_sub(1, SeqCst);
            Ok::<_, HandlerError>(())
        }
    })
    .concurrency(3);
    let payloads: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    let (report, _) = run_all(consumer, &payloads).await;
    assert_eq!(report.acked, 20);
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!((2..=3).contains(&most), "{most} handlers ran at once");
}

#[tokio::test]
async fn handlers_still_running_at_the_deadline_are_abandoned_unsettled() {
    let (source, tx, log) = scripted();
    let (started, mut is_started) = mpsc::channel::<()>(1);
    let consumer = Consumer::handler(SubscribeOptions::new("t", "g"), move |_: Delivery| {
        let started = started.clone();
        async move {
            let _ = started.send(()).await;
            std::future::pending::<()>().await;
            Ok::<_, HandlerError>(())
        }
    })
    .shutdown_timeout(Duration::from_millis(20));
    let token = CancellationToken::new();
    let running = consumer.start(source, token.clone()).await.unwrap();
    tx.send(delivery("stuck", &log)).unwrap();
    is_started.recv().await.unwrap();
    token.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("the deadline ends the wait")
        .expect("no fatal error");
    assert_eq!((report.acked, report.abandoned), (0, 1), "{report:?}");
    assert_eq!(settled(&log), vec![ev("stuck", "dropped")]);
}

#[tokio::test]
async fn an_unreachable_shutdown_timeout_waits_for_the_handler_without_panicking() {
    let (source, tx, log) = scripted();
    let (started, mut is_started) = mpsc::channel::<()>(1);
    let consumer = Consumer::handler(SubscribeOptions::new("t", "g"), move |_: Delivery| {
        let started = started.clone();
        async move {
            let _ = started.send(()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, HandlerError>(())
        }
    })
    .shutdown_timeout(Duration::MAX);
    let token = CancellationToken::new();
    let running = consumer.start(source, token.clone()).await.unwrap();
    tx.send(delivery("x", &log)).unwrap();
    is_started.recv().await.unwrap();
    token.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("the consumer stops once its handler is done")
        .expect("no member panicked");
    assert_eq!((report.acked, report.abandoned), (1, 0), "{report:?}");
}

#[tokio::test]
async fn shutdown_stops_one_consumer_and_leaves_the_shared_token_alone() {
    let (source, tx, log) = scripted();
    let token = CancellationToken::new();
    let running = Consumer::handler(SubscribeOptions::new("t", "g"), ok)
        .start(source, token.clone())
        .await
        .unwrap();
    tx.send(delivery("a", &log)).unwrap();
    // The subscription stays open (`tx` lives on): only shutdown can end the consumer.
    tokio::time::timeout(Duration::from_secs(10), async {
        while settled(&log).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the delivery is handled");
    running.shutdown();
    let report = tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("shutdown ends the consumer")
        .expect("no fatal error");
    assert_eq!(report.acked, 1, "{report:?}");
    assert!(
        !token.is_cancelled(),
        "the token other consumers share stays live"
    );
    drop(tx);
}

#[tokio::test]
async fn a_member_that_panics_outside_the_handler_stops_its_siblings_at_once() {
    /// Panics in `poll_ready` once a delivery arrived for it.
    #[derive(Clone)]
    struct PanicsWhenReady;
    impl tower::Service<Delivery> for PanicsWhenReady {
        type Response = ();
        type Error = HandlerError;
        type Future = futures::future::Ready<std::result::Result<(), HandlerError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::result::Result<(), HandlerError>> {
            panic!("poll_ready broke");
        }
        fn call(&mut self, _: Delivery) -> Self::Future {
            futures::future::ready(Ok(()))
        }
    }
    // Two members; the second gets the delivery, the first waits on an open
    // subscription that never delivers, so only the panic can end it.
    let (idle_tx, idle_rx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::unbounded_channel();
    let source = Arc::new(Source(Mutex::new(vec![Scripted(idle_rx), Scripted(rx)])));
    let log = Log::default();
    let token = CancellationToken::new();
    let running = Consumer::new(SubscribeOptions::new("t", "g"), PanicsWhenReady)
        .members(2)
        .start(source, token.clone())
        .await
        .unwrap();
    tx.send(delivery("a", &log)).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), running.join())
        .await
        .expect("the panic stops the whole consumer");
    let err = ended.expect_err("the panic is the consumer's error");
    assert!(err.to_string().contains("poll_ready broke"), "{err}");
    assert!(!token.is_cancelled(), "the shared token stays live");
    drop((idle_tx, tx));
}

async fn ok(_: Delivery) -> std::result::Result<(), HandlerError> {
    Ok(())
}

#[tokio::test]
async fn zero_concurrency_or_members_is_a_config_error() {
    let options = || SubscribeOptions::new("t", "g");
    for consumer in [
        Consumer::handler(options(), ok).concurrency(0),
        Consumer::handler(options(), ok).members(0),
    ] {
        let (source, _tx, _) = scripted();
        let err = consumer
            .run(source, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, crate::Error::Config { .. }), "{err}");
    }
}
