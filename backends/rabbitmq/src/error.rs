//! How the broker's refusals become switchyard errors: connection trouble is transient,
//! a refused declaration names the object, and an exchange of the earlier layout names
//! the migration.

use std::fmt;

use switchyard_core::Error;

use crate::BACKEND;

/// A declaration that clashes with what the broker already has (another exchange type,
/// other queue arguments). Carried as the source of a permanent [`Error::Backend`], so
/// callers can downcast to it.
#[derive(Debug)]
pub struct DeclareConflict {
    /// "exchange" or "queue".
    pub kind: &'static str,
    /// The object's name.
    pub name: String,
    /// The broker's explanation.
    pub detail: String,
}

impl fmt::Display for DeclareConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} {:?} already exists with settings switchyard cannot use ({}); \
             delete it or pick another topic/group name",
            self.kind, self.name, self.detail
        )
    }
}

impl std::error::Error for DeclareConflict {}

/// A topic (or a group's return exchange) declared by the earlier RabbitMQ layout: a
/// topic exchange whose routing keys are a slot's bits (`0.1.1.…`) and whose partition
/// queues bind `#.<bits>` patterns. This release routes through a direct exchange,
/// routing key = slot number, so it cannot publish to or consume from that exchange.
/// Carried as the source of a permanent [`Error::Backend`].
///
/// Not migrated in place: a client of the earlier release still publishing bit-string
/// keys would lose its messages (or see them returned) the moment the exchange changes
/// type, and no broker query tells whether one is running. The migration is safe once
/// they are stopped; see [`Display`](fmt::Display).
#[derive(Debug)]
pub struct OldLayout {
    /// The exchange of the earlier layout.
    pub exchange: String,
}

impl fmt::Display for OldLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.exchange;
        write!(
            f,
            "the exchange {name:?} has the earlier switchyard layout (a topic exchange routing \
             slot bits through `#.<bits>` bindings); this release routes through a direct \
             exchange whose routing key is the slot number. To migrate: stop every client of \
             it that runs the earlier release, then delete the exchange (management UI, or \
             `DELETE /api/exchanges/<vhost>/{name}` on the management API); the partition \
             queues keep their messages, each key keeps its partition, and the next subscribe \
             or publish declares the exchange anew and binds the queues again"
        )
    }
}

impl std::error::Error for OldLayout {}

/// Maps a lapin error to switchyard's: connection trouble is transient, broker refusals
/// (access, precondition) are permanent.
pub(crate) fn map_err(what: &str, e: lapin::Error) -> Error {
    let transient = !e.is_amqp_soft_error() || e.is_io_error();
    let source = format!("{what}: {e}");
    if transient {
        Error::transient(BACKEND, source)
    } else {
        Error::permanent(BACKEND, source)
    }
}

/// The broker's soft error code (404, 403, 405, 406...), if that is what `e` is.
pub(crate) fn soft_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// A refused declaration of `kind` `name`: a clash of settings is a [`DeclareConflict`],
/// anything else as [`map_err`] says.
pub(crate) fn conflict(kind: &'static str, name: &str, e: lapin::Error) -> Error {
    match soft_code(&e) {
        Some(406) | Some(405) => Error::permanent(
            BACKEND,
            DeclareConflict {
                kind,
                name: name.to_string(),
                detail: e.to_string(),
            },
        ),
        _ => map_err(&format!("declaring {kind} {name:?}"), e),
    }
}

/// A refused declaration of exchange `name` as a direct exchange: an exchange that is
/// a topic exchange there is one of the earlier layout ([`OldLayout`]).
pub(crate) fn exchange_conflict(name: &str, e: lapin::Error) -> Error {
    // RabbitMQ: "inequivalent arg 'type' for exchange 'T' in vhost '/': received
    // 'direct' but current is 'topic'".
    if soft_code(&e) == Some(406) && e.to_string().contains("current is 'topic'") {
        return Error::permanent(
            BACKEND,
            OldLayout {
                exchange: name.to_string(),
            },
        );
    }
    conflict("exchange", name, e)
}
