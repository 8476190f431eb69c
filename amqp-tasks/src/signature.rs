//! Signature fingerprints: a stub whose argument or result types no longer match its worker gets
//! a `signature mismatch` error instead of bincode silently reading the wrong values.
//!
//! Types are compared by name without their module paths (`Vec<Order>`, not
//! `alloc::vec::Vec<shop::Order>`), so a service may declare its own mirror of another service's
//! types, while a changed field type, argument order or result type is caught.

use crate::task::Task;
use std::any::type_name;

/// The argument and result types of a task, as text and as a 64-bit FNV-1a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    text: String,
    fingerprint: String,
}

impl Signature {
    /// The signature of a task's types.
    pub fn of<T: Task>() -> Signature {
        let args = normalize(type_name::<T::Args>());
        let output = normalize(type_name::<T::Output>());
        let error = normalize(type_name::<T::Error>());
        let text = if error == "Never" {
            format!("{args} -> {output}")
        } else {
            format!("{args} -> Result<{output}, {error}>")
        };
        Signature::from_text(text)
    }

    fn from_text(text: String) -> Signature {
        let fingerprint = format!("{:016x}", fnv1a(text.as_bytes()));
        Signature { text, fingerprint }
    }

    /// `(i64, i64) -> Result<i64, DivError>`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// 16 hexadecimal digits, sent in the `signature` header.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Drops every path prefix: `alloc::vec::Vec<core::option::Option<my::T>>` → `Vec<Option<T>>`.
pub(crate) fn normalize(type_name: &str) -> String {
    let mut out = String::with_capacity(type_name.len());
    let mut segment = String::new();
    let mut chars = type_name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            segment.push(c);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            segment.clear();
        } else {
            out.push_str(&segment);
            segment.clear();
            out.push(c);
        }
    }
    out.push_str(&segment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_dropped() {
        assert_eq!(
            normalize("alloc::vec::Vec<core::option::Option<shop::Order>>"),
            "Vec<Option<Order>>"
        );
        assert_eq!(normalize("(i64, alloc::string::String)"), "(i64, String)");
        assert_eq!(normalize("[u8; 4]"), "[u8; 4]");
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = Signature::from_text("(i64, i64) -> i64".into());
        assert_eq!(
            a.fingerprint(),
            Signature::from_text("(i64, i64) -> i64".into()).fingerprint()
        );
        assert_ne!(
            a.fingerprint(),
            Signature::from_text("(i64, i32) -> i64".into()).fingerprint()
        );
        assert_eq!(a.fingerprint().len(), 16);
        // FNV-1a test vector: the empty input hashes to the offset basis.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
