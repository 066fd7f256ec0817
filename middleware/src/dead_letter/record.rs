//! A dead letter as read back, and which ones to replay.

use std::collections::HashSet;
use std::time::SystemTime;

use switchyard_core::{Delivery, FailureKind, Message};

use super::headers;
use crate::retry_tiers;

/// Which dead letters to replay.
#[derive(Clone, Debug)]
pub enum Selection {
    /// Every dead letter.
    All,
    /// Those with these message ids.
    Ids(HashSet<String>),
    /// Those whose last failure lies in `[from, to)`.
    FailedBetween(SystemTime, SystemTime),
}

/// A dead letter as read back, with its failure headers parsed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetterRecord {
    /// The message as stored in the dead-letter topic (failure headers included).
    pub message: Message,
    /// The error's text.
    pub error: String,
    /// The failure kind; `None` when the header is missing or names no kind known here.
    pub kind: Option<FailureKind>,
    /// Deliveries by the broker, the last one included.
    pub deliveries: u32,
    /// The topic to replay it to.
    pub original_topic: Option<String>,
    /// The group that failed.
    pub original_group: Option<String>,
    /// The original message key.
    pub original_key: Option<String>,
    /// The last failure.
    pub failed_at: Option<SystemTime>,
    /// The dead letter's own partition in the dead-letter topic, where there is one.
    pub partition: Option<i32>,
    /// The dead letter's own offset in the dead-letter topic, where there is one.
    pub offset: Option<i64>,
}

impl DeadLetterRecord {
    pub(super) fn from_delivery(d: &Delivery) -> Self {
        let origin = d.origin();
        let mut record = Self::from_message(d.message().clone());
        record.partition = origin.partition;
        record.offset = origin.offset;
        record
    }

    pub(super) fn from_message(message: Message) -> Self {
        let get = |k: &str| message.headers.get(k).cloned();
        Self {
            partition: None,
            offset: None,
            error: get(headers::ERROR).unwrap_or_default(),
            kind: get(headers::ERROR_KIND).and_then(|k| FailureKind::from_name(&k)),
            deliveries: get(headers::DELIVERIES)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            original_topic: get(headers::ORIGINAL_TOPIC),
            original_group: get(headers::ORIGINAL_GROUP),
            original_key: get(headers::ORIGINAL_KEY),
            failed_at: get(headers::LAST_FAILURE).and_then(|v| humantime::parse_rfc3339(&v).ok()),
            message,
        }
    }

    pub(super) fn selected(&self, selection: &Selection) -> bool {
        match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&self.message.id),
            Selection::FailedBetween(from, to) => {
                self.failed_at.is_some_and(|t| t >= *from && t < *to)
            }
        }
    }

    /// The original message: same id, key, payload and headers, failure headers removed
    /// (the dead-letter ones and the retry tiers' `x-retry-*`, so a replay starts afresh).
    pub fn original(&self) -> Message {
        let mut m = self.message.clone();
        m.key = m.headers.get(headers::ORIGINAL_KEY).cloned();
        for h in headers::ALL {
            m.headers.remove(*h);
        }
        m.headers
            .retain(|k, _| !k.starts_with(retry_tiers::headers::PREFIX));
        m
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    fn dlq_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,24}",
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})?",
        ]
    }

    fn headers() -> impl Strategy<Value = BTreeMap<String, String>> {
        let name = prop_oneof![
            3 => proptest::sample::select(headers::ALL.to_vec()).prop_map(String::from),
            1 => Just("x-retry-tier".to_string()),
            1 => "\\PC{0,12}",
        ];
        proptest::collection::btree_map(name, dlq_value(), 0..16)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a dead letter's headers hold (another client may write the
        /// dead-letter topic too), it reads as a record, and its original is the
        /// message without the failure headers.
        #[test]
        fn any_dead_letter_headers_parse(hs in headers(), key in proptest::option::of("\\PC{0,8}")) {
            let mut m = Message::new("p").with_id("id");
            m.key = key;
            m.headers = hs.clone();
            let r = DeadLetterRecord::from_message(m.clone());
            let get = |k: &str| hs.get(k).cloned();
            prop_assert_eq!(&r.error, &get(headers::ERROR).unwrap_or_default());
            prop_assert_eq!(
                r.kind.map(FailureKind::as_str),
                get(headers::ERROR_KIND).as_deref().and_then(|k| FailureKind::from_name(k).map(FailureKind::as_str))
            );
            prop_assert_eq!(
                r.deliveries,
                get(headers::DELIVERIES).and_then(|v| v.parse().ok()).unwrap_or(0)
            );
            prop_assert_eq!(r.original_topic.clone(), get(headers::ORIGINAL_TOPIC));
            prop_assert_eq!(r.original_group.clone(), get(headers::ORIGINAL_GROUP));
            prop_assert_eq!(r.original_key.clone(), get(headers::ORIGINAL_KEY));
            prop_assert_eq!(
                r.failed_at.is_some(),
                get(headers::LAST_FAILURE).is_some_and(|v| humantime::parse_rfc3339(&v).is_ok())
            );
            let original = r.original();
            prop_assert_eq!(&original.id, &m.id);
            prop_assert_eq!(&original.payload, &m.payload);
            prop_assert_eq!(original.key, get(headers::ORIGINAL_KEY));
            for (k, v) in &original.headers {
                prop_assert!(!headers::ALL.contains(&k.as_str()) && !k.starts_with(retry_tiers::headers::PREFIX), "{k}");
                prop_assert_eq!(hs.get(k), Some(v));
            }
        }

        /// Every kind the dead-letter layer writes reads back as itself.
        #[test]
        fn written_kinds_parse_back(i in 0..5usize) {
            let kind = [
                FailureKind::Transient,
                FailureKind::Permanent,
                FailureKind::Decode,
                FailureKind::Panic,
                FailureKind::Unavailable,
            ][i];
            let m = Message::new("p").with_header(headers::ERROR_KIND, kind.as_str());
            prop_assert_eq!(DeadLetterRecord::from_message(m).kind, Some(kind));
        }

        /// The failure time the dead-letter layer writes reads back to the millisecond.
        #[test]
        fn written_failure_times_parse_back(ms in 0..253_402_300_799_999u64) {
            let at = UNIX_EPOCH + Duration::from_millis(ms);
            let m = Message::new("p").with_header(
                headers::LAST_FAILURE,
                humantime::format_rfc3339_millis(at).to_string(),
            );
            prop_assert_eq!(DeadLetterRecord::from_message(m).failed_at, Some(at));
        }
    }
}
