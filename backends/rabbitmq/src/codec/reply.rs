//! Request/reply fields as AMQP properties: the reply address in `reply_to`, the
//! correlation id in `correlation_id`, where every AMQP RPC client puts them (RabbitMQ's
//! own RPC pattern, pika, Spring's `RabbitTemplate`), and where the broker rewrites a
//! direct reply-to address into the requester's own pseudo-queue.
//!
//! On the way out the two request/reply headers move from the headers table into the
//! properties (a value too long for a short string stays in the table); on the way in
//! the properties become those headers again, taking precedence over a table entry of the
//! same name, since the broker rewrote the property and not the table.

use lapin::types::ShortString;
use lapin::BasicProperties;
use switchyard_core::rpc::headers::{CORRELATION_ID, REPLY_TO};
use switchyard_core::Headers;

/// Whether the header `name` = `value` travels as a property rather than in the table.
pub(super) fn is_property(name: &str, value: &str) -> bool {
    (name == REPLY_TO || name == CORRELATION_ID) && value.len() <= usize::from(u8::MAX)
}

/// `props` with the request/reply headers of `headers` that [`is_property`] picks.
pub(super) fn to_properties(mut props: BasicProperties, headers: &Headers) -> BasicProperties {
    let field = |name: &str| {
        headers
            .get(name)
            .filter(|v| is_property(name, v))
            .and_then(|v| ShortString::try_new(v.as_str()).ok())
    };
    if let Some(to) = field(REPLY_TO) {
        props = props.with_reply_to(to);
    }
    if let Some(id) = field(CORRELATION_ID) {
        props = props.with_correlation_id(id);
    }
    props
}

/// Writes `props`' `reply_to` and `correlation_id` into `headers`.
pub(super) fn to_headers(props: &BasicProperties, headers: &mut Headers) {
    for (name, value) in [
        (REPLY_TO, props.reply_to()),
        (CORRELATION_ID, props.correlation_id()),
    ] {
        if let Some(value) = value {
            headers.insert(name.to_string(), value.as_str().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};
    use switchyard_core::Message;

    use super::*;
    use crate::codec::{decode, properties};

    #[test]
    fn request_headers_travel_as_properties_and_come_back_as_headers() {
        let m = Message::new("q")
            .with_header(REPLY_TO, "amq.rabbitmq.reply-to")
            .with_header(CORRELATION_ID, "c-1")
            .with_header("other", "kept");
        let props = properties(&m).unwrap();
        assert_eq!(
            props.reply_to().as_ref().map(|s| s.as_str()),
            Some("amq.rabbitmq.reply-to")
        );
        assert_eq!(
            props.correlation_id().as_ref().map(|s| s.as_str()),
            Some("c-1")
        );
        let table = props.headers().as_ref().unwrap();
        assert!(!table.contains_key(REPLY_TO) && !table.contains_key(CORRELATION_ID));
        assert!(table.contains_key("other"));
        assert_eq!(decode(&props, b"q".to_vec()).headers, m.headers);
    }

    #[test]
    fn a_foreign_rpc_request_decodes_to_the_request_headers() {
        // What pika sends in RabbitMQ's RPC pattern, after the broker rewrote a direct
        // reply-to address.
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to.g1h2AA==".into())
            .with_correlation_id("4f1c".into());
        let m = decode(&props, b"30".to_vec());
        assert_eq!(m.headers[REPLY_TO], "amq.rabbitmq.reply-to.g1h2AA==");
        assert_eq!(m.headers[CORRELATION_ID], "4f1c");
    }

    #[test]
    fn the_property_wins_over_a_table_entry_and_long_values_stay_in_the_table() {
        let mut table = FieldTable::default();
        table.insert(REPLY_TO.into(), AMQPValue::LongString("stale".into()));
        let props = BasicProperties::default()
            .with_headers(table)
            .with_reply_to("amq.rabbitmq.reply-to.fresh".into());
        let m = decode(&props, Vec::new());
        assert_eq!(m.headers[REPLY_TO], "amq.rabbitmq.reply-to.fresh");

        let long = "c".repeat(300);
        let m = Message::new("q").with_header(CORRELATION_ID, long.clone());
        let props = properties(&m).unwrap();
        assert!(props.correlation_id().is_none());
        assert_eq!(decode(&props, b"q".to_vec()).headers[CORRELATION_ID], long);
    }
}
