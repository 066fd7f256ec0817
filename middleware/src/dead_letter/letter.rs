//! The dead letter itself: the failed message plus headers saying why.

use std::time::SystemTime;

use switchyard_core::{Delivery, HandlerError, Message};

use super::headers;

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The longest error text a dead letter carries: the rest is cut, so a long error
/// cannot make the letter too large for the broker.
pub(super) const MAX_ERROR_TEXT: usize = 4096;

fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `letter` with only the dead-letter headers (and the content type) kept, and a note
/// of what was dropped and why.
pub(super) fn without_own_headers(mut letter: Message, why: &switchyard_core::Error) -> Message {
    let before = letter.headers.len();
    letter.headers.retain(|name, _| {
        headers::ALL.contains(&name.as_str()) || name == switchyard_core::headers::CONTENT_TYPE
    });
    let dropped = before - letter.headers.len();
    letter.headers.insert(
        headers::HEADERS_DROPPED.into(),
        truncated(format!("{dropped}: {why}"), 512),
    );
    letter
}

/// The dead letter for a failed delivery: the same message plus failure headers.
pub(super) fn dead_letter(delivery: &Delivery, error: &HandlerError) -> Message {
    let origin = delivery.origin();
    let mut m = delivery.message().clone();
    // Dead-letter headers the message already carries (written by another client, or
    // left from an earlier failure) would pass for this failure's where absent here.
    m.headers
        .retain(|name, _| !headers::ALL.contains(&name.as_str()));
    let h = &mut m.headers;
    h.insert(
        headers::ERROR.into(),
        truncated(error.source_error().to_string(), MAX_ERROR_TEXT),
    );
    h.insert(headers::ERROR_KIND.into(), error.kind().as_str().into());
    h.insert(
        headers::DELIVERIES.into(),
        delivery.delivery_count().to_string(),
    );
    h.insert(headers::RETRIES.into(), error.retries().to_string());
    h.insert(headers::ORIGINAL_TOPIC.into(), origin.topic.to_string());
    h.insert(headers::ORIGINAL_GROUP.into(), origin.group.to_string());
    if let Some(p) = origin.partition {
        h.insert(headers::ORIGINAL_PARTITION.into(), p.to_string());
    }
    if let Some(o) = origin.offset {
        h.insert(headers::ORIGINAL_OFFSET.into(), o.to_string());
    }
    h.insert(
        headers::FIRST_FAILURE.into(),
        rfc3339(error.first_failure()),
    );
    h.insert(headers::LAST_FAILURE.into(), rfc3339(SystemTime::now()));
    if let Some(key) = m.key.take() {
        m.headers.insert(headers::ORIGINAL_KEY.into(), key);
    }
    m
}
