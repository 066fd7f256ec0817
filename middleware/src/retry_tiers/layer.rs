//! The layer that sends a failed delivery to its next retry tier.

use std::sync::Arc;

use tower::Layer;

use super::{RetryTiers, RetryTiersService};

/// Sends a failed delivery to its next retry tier (see [`RetryTiers`]).
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RetryTiersLayer {
    tiers: Arc<RetryTiers>,
}

impl RetryTiersLayer {
    /// A layer sending failures through `tiers`.
    pub fn new(tiers: RetryTiers) -> Self {
        Self {
            tiers: Arc::new(tiers),
        }
    }
}

impl<S> Layer<S> for RetryTiersLayer {
    type Service = RetryTiersService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryTiersService::new(inner, self.tiers.clone())
    }
}
