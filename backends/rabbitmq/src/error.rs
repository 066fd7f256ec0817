//! How the broker's refusals become switchyard errors: connection trouble is transient,
//! and a refused declaration names the object.

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
