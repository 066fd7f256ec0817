//! Settle futures for outcomes a backend knows at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::error::Result;

/// The [`Acker`](super::Acker) future for an outcome known when the call is made (an ack
/// recorded in memory, say). `Ok(())`, the common case, is a zero-sized future, which
/// a `Box` holds without allocating; an error is boxed as usual.
pub fn settled(outcome: Result<()>) -> BoxFuture<'static, Result<()>> {
    match outcome {
        Ok(()) => Box::pin(Done),
        Err(e) => Box::pin(futures::future::ready(Err(e))),
    }
}

/// Resolves to `Ok(())` at once; zero-sized.
struct Done;

impl Future for Done {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[tokio::test]
    async fn resolves_to_the_outcome() {
        settled(Ok(())).await.unwrap();
        let e = settled(Err(Error::transient("test", "down"))).await;
        assert!(e.is_err_and(|e| e.is_transient()));
    }

    #[test]
    fn success_is_zero_sized_so_boxing_it_does_not_allocate() {
        assert_eq!(std::mem::size_of::<Done>(), 0);
    }
}
