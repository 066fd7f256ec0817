//! Topic, group and queue name rules shared by every backend.

use crate::error::{Error, Result};

/// Longest accepted name: Kafka's topic limit, also within AMQP's 255-byte short strings.
pub const MAX_NAME_LEN: usize = 200;

/// Checks a topic, group or queue name: 1 to 200 characters of `A-Z a-z 0-9 . _ -`.
///
/// One rule for every backend, so an application that runs on memory today runs on
/// Kafka (which forbids other characters in topic names) tomorrow.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty; give a name such as \"orders\"".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "it is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are reserved".to_string())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| {
                format!("character {c:?} is not allowed; use only A-Z, a-z, 0-9, '.', '_' and '-'")
            })
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_names_and_rejects_bad_ones() {
        for ok in ["orders", "orders.dlq", "payment-service", "a_b.C-9"] {
            validate_name("topic", ok).unwrap();
        }
        for bad in ["", "has space", "slash/es", ".", "ü", &"x".repeat(201)] {
            let err = validate_name("topic", bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidName { what: "topic", .. }),
                "{err}"
            );
        }
        let err = validate_name("group", "").unwrap_err().to_string();
        assert!(err.contains("group") && err.contains("empty"), "{err}");
    }
}
