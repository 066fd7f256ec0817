//! The pending-request map: matching, timeouts, late replies, close, a lost inbox.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::channel::mpsc;

use super::*;
use crate::message::Receipt;

/// A publisher that hands every request to the test, which plays the responder.
struct Capture(mpsc::UnboundedSender<Message>);

#[async_trait]
impl Publisher for Capture {
    async fn publish(&self, _topic: &str, message: Message) -> Result<Receipt> {
        let id = message.id.clone();
        self.0
            .unbounded_send(message)
            .expect("the test reads requests");
        Ok(Receipt::new(id, None, None))
    }
}

struct Harness {
    requester: Requester,
    publisher: Capture,
    requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>,
    /// Where the test sends replies; replaced each time an inbox opens.
    replies: Mutex<Option<mpsc::UnboundedSender<Result<Message>>>>,
    opened: AtomicUsize,
}

impl Harness {
    fn new() -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded();
        Arc::new(Self {
            requester: Requester::new("test"),
            publisher: Capture(tx),
            requests: tokio::sync::Mutex::new(rx),
            replies: Mutex::new(None),
            opened: AtomicUsize::new(0),
        })
    }

    async fn request(&self, payload: &str, timeout: Duration) -> Result<Message> {
        let open = || async {
            let n = self.opened.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::unbounded();
            *self.replies.lock() = Some(tx);
            Ok(Inbox::new(format!("inbox-{n}"), rx.boxed()))
        };
        self.requester
            .request(
                &self.publisher,
                open,
                "rates",
                Message::new(payload.to_string()),
                timeout,
            )
            .await
    }

    async fn next_request(&self) -> Message {
        self.requests.lock().await.next().await.expect("a request")
    }

    fn send(&self, reply: Result<Message>) {
        let tx = self.replies.lock().clone().expect("an inbox is open");
        tx.unbounded_send(reply).expect("the inbox reads replies");
    }

    fn answer(&self, request: &Message, payload: &str) {
        let correlation = &request.headers[headers::CORRELATION_ID];
        self.send(Ok(Message::new(payload.to_string())
            .with_header(headers::CORRELATION_ID, correlation.clone())));
    }

    fn pending_len(&self) -> usize {
        let current = self.requester.current.try_lock().expect("not opening");
        let p = current.as_ref().expect("an inbox is open");
        let n = p.waiters.lock().as_ref().map_or(0, HashMap::len);
        n
    }
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn each_reply_reaches_its_own_request() {
    let h = Harness::new();
    let n = 1000;
    let responder = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                seen.push(h.next_request().await);
            }
            // Answer in reverse order: matching must go by correlation id, not order.
            for request in seen.iter().rev() {
                let text = std::str::from_utf8(&request.payload).unwrap().to_string();
                assert_eq!(request.headers[headers::REPLY_TO], "inbox-0");
                h.answer(request, &format!("re:{text}"));
            }
        })
    };
    let requests = (0..n).map(|i| {
        let h = h.clone();
        async move { (i, h.request(&format!("q{i}"), LONG).await) }
    });
    for (i, reply) in futures::future::join_all(requests).await {
        assert_eq!(reply.unwrap().payload, format!("re:q{i}").as_bytes());
    }
    responder.await.unwrap();
    assert_eq!(
        h.opened.load(Ordering::SeqCst),
        1,
        "one inbox for every request"
    );
    assert_eq!(h.pending_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn no_reply_is_a_timeout_naming_topic_and_request() {
    let h = Harness::new();
    let err = h.request("q", Duration::from_secs(2)).await.unwrap_err();
    match &err {
        Error::Timeout { after, what } => {
            assert_eq!(*after, Duration::from_secs(2));
            assert!(what.contains("\"rates\""), "{err}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.is_transient());
    assert_eq!(h.pending_len(), 0, "a timed-out request leaves no entry");
}

#[tokio::test(start_paused = true)]
async fn a_late_reply_is_dropped_and_the_next_request_gets_its_own() {
    let h = Harness::new();
    let err = h
        .request("first", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let first = h.next_request().await;
    h.answer(&first, "late");

    let second = {
        let h = h.clone();
        tokio::spawn(async move { h.request("second", LONG).await })
    };
    let request = h.next_request().await;
    h.answer(&request, "on time");
    let reply = second.await.unwrap().unwrap();
    assert_eq!(reply.payload.as_ref(), b"on time");
    assert_eq!(h.pending_len(), 0);
}

#[tokio::test]
async fn close_ends_pending_requests_and_refuses_new_ones() {
    let h = Harness::new();
    let waiting: Vec<_> = (0..10)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.request(&format!("q{i}"), LONG).await })
        })
        .collect();
    for _ in 0..10 {
        h.next_request().await;
    }
    h.requester.close();
    for w in waiting {
        let err = w.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Closed { backend: "test" }), "{err}");
    }
    let err = h.request("after", LONG).await.unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");
}

#[tokio::test]
async fn close_before_any_request_refuses_without_opening() {
    let h = Harness::new();
    h.requester.close();
    let err = h.request("q", LONG).await.unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");
    assert_eq!(h.opened.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_error_reply_is_a_typed_error_with_the_kind() {
    let h = Harness::new();
    let asking = {
        let h = h.clone();
        tokio::spawn(async move { h.request("q", LONG).await })
    };
    let request = h.next_request().await;
    h.send(Ok(Message::new("")
        .with_header(
            headers::CORRELATION_ID,
            request.headers[headers::CORRELATION_ID].clone(),
        )
        .with_header(headers::ERROR, "no such currency")
        .with_header(headers::ERROR_KIND, "permanent")));
    match asking.await.unwrap().unwrap_err() {
        Error::ErrorReply {
            topic,
            request_id,
            kind,
            message,
        } => {
            assert_eq!(topic, "rates");
            assert_eq!(request_id, request.id);
            assert_eq!(kind, FailureKind::Permanent);
            assert_eq!(message, "no such currency");
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[tokio::test]
async fn a_lost_inbox_fails_pending_requests_and_the_next_request_reopens() {
    let h = Harness::new();
    let asking = {
        let h = h.clone();
        tokio::spawn(async move { h.request("q", LONG).await })
    };
    h.next_request().await;
    h.send(Err(Error::transient("test", "connection reset")));
    let err = asking.await.unwrap().unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("connection reset"), "{err}");

    let again = {
        let h = h.clone();
        tokio::spawn(async move { h.request("again", LONG).await })
    };
    let request = h.next_request().await;
    assert_eq!(request.headers[headers::REPLY_TO], "inbox-1");
    h.answer(&request, "ok");
    assert_eq!(again.await.unwrap().unwrap().payload.as_ref(), b"ok");
}

#[tokio::test]
async fn a_zero_timeout_is_a_config_error() {
    let h = Harness::new();
    let err = h.request("q", Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(err, Error::Config { ref setting, .. } if setting == "timeout"),
        "{err}"
    );
}

#[tokio::test]
async fn the_timeout_covers_an_inbox_that_never_opens() {
    let requester = Requester::new("test");
    let (tx, _requests) = mpsc::unbounded();
    let publisher = Capture(tx);
    let never = || std::future::pending::<Result<Inbox>>();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        requester.request(
            &publisher,
            never,
            "rates",
            Message::new("x"),
            Duration::from_millis(50),
        ),
    )
    .await
    .expect("the request's own timeout ends it");
    let err = ended.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("opening the reply inbox"), "{err}");
}
