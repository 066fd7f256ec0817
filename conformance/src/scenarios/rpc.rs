//! Request/reply: every reply reaches its own request, no responder is a timeout, a
//! failing responder is a typed error reply, and closing the client ends what is pending.
//! Backends whose `Capabilities::request_reply` is false report these not applicable.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::{
    reply_fn, rpc, Consumer, Delivery, Error, FailureKind, HandlerError, Message, SubscribeOptions,
};

use super::{recv_n, spawn, stop, subscribe, LONG};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

/// Concurrent requests in the matching scenario.
const REQUESTS: usize = 1000;

/// The responder every scenario runs: answers `re:<payload>`, or fails on `fail:<kind>`.
async fn answer(d: Delivery) -> Result<String, HandlerError> {
    let text = String::from_utf8_lossy(d.payload()).into_owned();
    match text.strip_prefix("fail:") {
        Some("permanent") => Err(HandlerError::permanent(std::io::Error::other(
            "no such currency",
        ))),
        Some(_) => Err(HandlerError::transient(std::io::Error::other(
            "rates service busy",
        ))),
        None => Ok(format!("re:{text}")),
    }
}

/// Starts the responder on `topic` (a queue: one group of responders).
async fn responder(ctx: &Ctx, topic: &str) -> Result<super::Running, Outcome> {
    let consumer = Consumer::new(
        SubscribeOptions::queue(topic),
        reply_fn(ctx.broker.clone(), answer),
    )
    .concurrency(64);
    spawn(ctx, consumer).await
}

pub(super) async fn concurrent_requests(ctx: Arc<Ctx>) -> Check {
    ctx.require(ctx.caps.request_reply, "request/reply")?;
    let topic = ctx.name("rpc");
    let running = responder(&ctx, &topic).await?;
    let asks = (0..REQUESTS).map(|i| {
        let (broker, topic) = (ctx.broker.clone(), topic.clone());
        async move {
            let request = Message::new(format!("q{i}")).with_header("n", i.to_string());
            (i, broker.request(&topic, request, LONG).await)
        }
    });
    let results = futures::future::join_all(asks).await;
    stop(running).await?;
    let mut mismatched = Vec::new();
    for (i, result) in results {
        let reply = result.or_fail(&format!("request {i}"))?;
        if reply.payload != format!("re:q{i}").as_bytes() {
            mismatched.push((i, String::from_utf8_lossy(&reply.payload).into_owned()));
        }
        ensure!(
            reply.headers.contains_key(rpc::headers::CORRELATION_ID),
            "reply to request {i} has no correlation id header: {:?}",
            reply.headers
        );
    }
    ensure!(
        mismatched.is_empty(),
        "{} of {REQUESTS} replies answered another request, first {:?}",
        mismatched.len(),
        mismatched.first()
    );
    Ok(())
}

pub(super) async fn no_responder_times_out(ctx: Arc<Ctx>) -> Check {
    ctx.require(ctx.caps.request_reply, "request/reply")?;
    let timeout = Duration::from_secs(2);
    let topic = ctx.name("rpc-nobody");
    let asked = ctx.broker.request(&topic, Message::new("anyone?"), timeout);
    // The outer limit only catches a hang; the error itself must name the timeout.
    let result = tokio::time::timeout(timeout + LONG, asked)
        .await
        .map_err(|_| Outcome::Failed("a request with no responder hung".into()))?;
    match result {
        Err(Error::Timeout { after, .. }) => {
            ensure!(
                after == timeout,
                "timed out after {after:?}, not {timeout:?}"
            );
            Ok(())
        }
        Err(other) => Err(Outcome::Failed(format!("expected a timeout, got {other}"))),
        Ok(reply) => Err(Outcome::Failed(format!(
            "nobody answers, yet a reply came: {reply:?}"
        ))),
    }
}

pub(super) async fn error_reply_is_typed(ctx: Arc<Ctx>) -> Check {
    ctx.require(ctx.caps.request_reply, "request/reply")?;
    let topic = ctx.name("rpc-err");
    let running = responder(&ctx, &topic).await?;
    for (ask, want_kind, want_text) in [
        ("fail:permanent", FailureKind::Permanent, "no such currency"),
        (
            "fail:transient",
            FailureKind::Transient,
            "rates service busy",
        ),
    ] {
        match ctx.broker.request(&topic, Message::new(ask), LONG).await {
            Err(e @ Error::ErrorReply { .. }) => {
                let Error::ErrorReply { kind, message, .. } = &e else {
                    unreachable!()
                };
                ensure!(
                    *kind == want_kind && message.contains(want_text),
                    "{ask}: got {e}"
                );
                ensure!(
                    e.is_transient() == want_kind.is_retryable(),
                    "{ask}: transience {} for a {want_kind} failure",
                    e.is_transient()
                );
            }
            Err(other) => {
                return Err(Outcome::Failed(format!(
                    "{ask}: expected an error reply, got {other}"
                )))
            }
            Ok(reply) => return Err(Outcome::Failed(format!("{ask}: got a reply {reply:?}"))),
        }
    }
    // The failed requests were answered, so acked: the responder serves on.
    let reply = ctx
        .broker
        .request(&topic, Message::new("after"), LONG)
        .await
        .or_fail("request after the error replies")?;
    ensure!(
        reply.payload.as_ref() == b"re:after",
        "got {:?}",
        reply.payload
    );
    let report = stop(running).await?;
    ensure!(
        report.acked == 3 && report.nacked == 0,
        "each request is acked once it is answered, error or not: {report:?}"
    );
    Ok(())
}

pub(super) async fn close_ends_pending(ctx: Arc<Ctx>) -> Check {
    ctx.require(ctx.caps.request_reply, "request/reply")?;
    let topic = ctx.name("rpc-close");
    // A reader that never answers, so the requests are published and then wait.
    let mut silent = subscribe(&ctx, SubscribeOptions::queue(&topic)).await?;
    let pending: Vec<_> = (0..10)
        .map(|i| {
            let (broker, topic) = (ctx.broker.clone(), topic.clone());
            tokio::spawn(async move {
                broker
                    .request(&topic, Message::new(format!("q{i}")), LONG)
                    .await
            })
        })
        .collect();
    recv_n(&mut silent, pending.len(), true).await?;
    silent.close().await.or_fail("close the silent reader")?;
    ctx.broker.close().await.or_fail("close the broker")?;
    for (i, task) in pending.into_iter().enumerate() {
        let result = tokio::time::timeout(LONG, task)
            .await
            .map_err(|_| Outcome::Failed(format!("request {i} hung after close")))?
            .or_fail("request task")?;
        ensure!(
            matches!(result, Err(Error::Closed { .. })),
            "request {i} pending at close ended with {result:?}, expected a closed error"
        );
    }
    let after = ctx.broker.request(&topic, Message::new("late"), LONG).await;
    ensure!(
        matches!(after, Err(Error::Closed { .. })),
        "a request after close ended with {after:?}, expected a closed error"
    );
    Ok(())
}
