//! Signature fingerprints: a stub whose argument or result types no longer match its worker gets
//! a `signature mismatch` error instead of bincode silently reading the wrong values. Pure.
//!
//! The fingerprint is the 64-bit FNV-1a hash of a text such as `(i64, i64) -> Result<i64,
//! DivError>`, built from **the types as written** in the `#[task]` signature (the macro hands
//! them over as text), with module paths dropped (`Vec<Order>`, not `alloc::vec::Vec<shop::Order>`),
//! so that a service may declare its own mirror of another service's types. It depends only on
//! the source, never on the compiler: two builds of the same code with different compiler versions
//! send the same fingerprint. A stub must therefore name the types as the worker does (an alias
//! counts as a name of its own).
//!
//! Earlier releases hashed `std::any::type_name` of the types instead, which the standard library
//! does not promise to keep stable. For ordinary types both texts are the same, and so are the
//! fingerprints; where they differ (an alias, say), a worker accepts either for one release (the
//! [`legacy`](Signature::legacy_fingerprint) one), so that a rolling upgrade never answers
//! `SignatureMismatch`.

use std::fmt;

/// The argument and result types of a task, as text and as a 64-bit FNV-1a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    text: String,
    fingerprint: String,
    /// The fingerprint of `type_name`'s text, when it differs.
    legacy: Option<String>,
}

impl Signature {
    /// The signature of a task from the types as written (`written`: the argument tuple, the
    /// success type, the error type or `""` for an infallible task) and as compiled (`compiled`:
    /// `type_name` of the argument tuple, the output and the error, for the legacy fingerprint).
    /// Called by the code `#[task]` generates.
    #[doc(hidden)]
    pub fn of_task(written: [&str; 3], compiled: [&str; 3]) -> Signature {
        let [args, output, error] = written.map(normalize);
        let text = signature_text(&args, &output, (!error.is_empty()).then_some(&*error));
        let [args, output, error] = compiled.map(normalize);
        let legacy = signature_text(&args, &output, (error != "Never").then_some(&*error));
        let mut signature = Signature::from_text(text);
        let legacy = fingerprint_of(&legacy);
        if legacy != signature.fingerprint {
            signature.legacy = Some(legacy);
        }
        signature
    }

    fn from_text(text: String) -> Signature {
        Signature {
            fingerprint: fingerprint_of(&text),
            text,
            legacy: None,
        }
    }

    /// `(i64, i64) -> Result<i64, DivError>`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// 16 hexadecimal digits, sent in the `signature` header.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The fingerprint earlier releases sent for the same task, when it differs: accepted too.
    pub fn legacy_fingerprint(&self) -> Option<&str> {
        self.legacy.as_deref()
    }

    /// Whether a caller's fingerprint names these types.
    pub fn accepts(&self, fingerprint: &str) -> bool {
        fingerprint == self.fingerprint || self.legacy.as_deref() == Some(fingerprint)
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text, self.fingerprint)
    }
}

fn signature_text(args: &str, output: &str, error: Option<&str>) -> String {
    match error {
        None => format!("{args} -> {output}"),
        Some(error) => format!("{args} -> Result<{output}, {error}>"),
    }
}

fn fingerprint_of(text: &str) -> String {
    format!("{:016x}", fnv1a(text.as_bytes()))
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
        // Pinned: the fingerprint of a text never changes (it is on the wire).
        assert_eq!(a.fingerprint(), fingerprint_of("(i64, i64) -> i64"));
    }

    #[test]
    fn the_written_text_decides_and_the_compiled_one_is_accepted_too() {
        let same = Signature::of_task(
            ["(i64, String)", "Vec<u8>", ""],
            [
                "(i64, alloc::string::String)",
                "alloc::vec::Vec<u8>",
                "amqp_tasks::error::Never",
            ],
        );
        assert_eq!(same.text(), "(i64, String) -> Vec<u8>");
        assert_eq!(
            same.legacy_fingerprint(),
            None,
            "the same text, the same fingerprint"
        );

        // An alias: written `Meters`, compiled `u32`.
        let alias = Signature::of_task(
            ["(Meters,)", "()", "WalkError"],
            ["(u32,)", "()", "x::WalkError"],
        );
        assert_eq!(alias.text(), "(Meters,) -> Result<(), WalkError>");
        let legacy = fingerprint_of("(u32,) -> Result<(), WalkError>");
        assert_eq!(alias.legacy_fingerprint(), Some(legacy.as_str()));
        assert!(alias.accepts(alias.fingerprint()) && alias.accepts(&legacy));
        assert!(!alias.accepts(same.fingerprint()));
    }
}
