//! Tracing: the trace context travels from publisher to handler.

use std::sync::{Arc, Mutex};

use switchyard_core::headers::TRACEPARENT;
use switchyard_core::observe::TraceContext;
use switchyard_core::{Consumer, Delivery, HandlerError, Message, SubscribeOptions};

use super::{publish_all, recv_n, spawn, stop, subscribe};
use crate::kit::{ensure, Check, Ctx, OrFail, Outcome};

/// What the handler saw: the current trace context and the delivery's traceparent.
type TraceSeen = Arc<Mutex<Vec<(Option<TraceContext>, Option<String>)>>>;

pub(super) async fn trace_context(ctx: Arc<Ctx>) -> Check {
    let topic = ctx.name("trace");
    let onward = ctx.name("trace-onward");
    let seen: TraceSeen = Arc::default();
    let handler = {
        let (seen, broker, onward) = (seen.clone(), ctx.broker.clone(), onward.clone());
        move |d: Delivery| {
            let (seen, broker, onward) = (seen.clone(), broker.clone(), onward.clone());
            async move {
                let current = TraceContext::current();
                // A message published while handling continues the same trace.
                broker.publish(&onward, Message::new("onward")).await?;
                seen.lock()
                    .unwrap()
                    .push((current, d.message().headers.get(TRACEPARENT).cloned()));
                Ok::<_, HandlerError>(())
            }
        }
    };
    let mut onward_sub = subscribe(&ctx, SubscribeOptions::new(&onward, ctx.name("g"))).await?;
    let running = spawn(
        &ctx,
        Consumer::handler(SubscribeOptions::new(&topic, ctx.name("g")), handler),
    )
    .await?;
    publish_all(&ctx, &topic, vec![Message::new("traced")]).await?;
    let onward_msg = recv_n(&mut onward_sub, 1, true).await?.remove(0);
    stop(running).await?;
    onward_sub.close().await.or_fail("close")?;
    let seen = seen.lock().unwrap();
    let (current, header) = seen
        .first()
        .cloned()
        .ok_or_else(|| Outcome::Failed("handler never ran".into()))?;
    let sent = header
        .as_deref()
        .and_then(TraceContext::parse)
        .ok_or_else(|| Outcome::Failed(format!("no valid traceparent arrived: {header:?}")))?;
    let current =
        current.ok_or_else(|| Outcome::Failed("no trace context while the handler ran".into()))?;
    ensure!(
        current.trace_id == sent.trace_id,
        "the handler's trace {current:?} is not the producer's {sent:?}"
    );
    ensure!(
        current.span_id != sent.span_id,
        "the handler runs in its own span"
    );
    let next = onward_msg
        .message()
        .headers
        .get(TRACEPARENT)
        .and_then(|v| TraceContext::parse(v))
        .ok_or_else(|| Outcome::Failed("the onward message has no traceparent".into()))?;
    ensure!(
        next.trace_id == sent.trace_id,
        "a message published by the handler starts a new trace"
    );
    Ok(())
}
