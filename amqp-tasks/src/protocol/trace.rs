//! W3C trace context (`traceparent`): one trace id follows a task through every hop, so that the
//! logs of the producer, the relay and the worker can be joined. Also the process's cheap source
//! of random ids. Pure: parsing, formatting and a per-thread generator.

use std::cell::Cell;
use std::fmt;

/// A `traceparent`: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`, kept as ASCII
/// hex in fixed arrays (no allocation per task).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TraceParent {
    trace_id: [u8; 32],
    span_id: [u8; 16],
    flags: [u8; 2],
}

impl TraceParent {
    /// A new trace.
    pub(crate) fn new_root() -> TraceParent {
        let mut trace_id = [0; 32];
        hex_into(&random_u64().to_be_bytes(), &mut trace_id[..16]);
        hex_into(&random_u64().to_be_bytes(), &mut trace_id[16..]);
        TraceParent {
            trace_id,
            span_id: new_span_id(),
            flags: *b"01",
        }
    }

    /// The same trace, one hop further.
    pub(crate) fn child(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            flags: self.flags,
        }
    }

    /// Parses a `traceparent` header; `None` if it is malformed (then a new trace starts).
    pub(crate) fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex(span_id, 16)
            && span_id.bytes().any(|b| b != b'0')
            && hex(flags, 2);
        if !valid {
            return None;
        }
        let mut parsed = TraceParent {
            trace_id: [0; 32],
            span_id: [0; 16],
            flags: [0; 2],
        };
        parsed.trace_id.copy_from_slice(trace_id.as_bytes());
        parsed.span_id.copy_from_slice(span_id.as_bytes());
        parsed.flags.copy_from_slice(flags.as_bytes());
        for byte in parsed
            .trace_id
            .iter_mut()
            .chain(&mut parsed.span_id)
            .chain(&mut parsed.flags)
        {
            byte.make_ascii_lowercase();
        }
        Some(parsed)
    }

    /// The 32-digit trace id shared by every hop.
    pub(crate) fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace_id).unwrap_or_default()
    }

    /// From binary ids and flags (an OpenTelemetry span context's).
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn from_ids(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> TraceParent {
        let mut parsed = TraceParent {
            trace_id: [0; 32],
            span_id: [0; 16],
            flags: [0; 2],
        };
        hex_into(&trace_id, &mut parsed.trace_id);
        hex_into(&span_id, &mut parsed.span_id);
        hex_into(&[flags], &mut parsed.flags);
        parsed
    }

    /// The binary trace id, parent span id and flags (for an OpenTelemetry span context).
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn ids(&self) -> ([u8; 16], [u8; 8], u8) {
        let mut trace_id = [0; 16];
        let mut span_id = [0; 8];
        let mut flags = [0; 1];
        unhex_into(&self.trace_id, &mut trace_id);
        unhex_into(&self.span_id, &mut span_id);
        unhex_into(&self.flags, &mut flags);
        (trace_id, span_id, flags[0])
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |bytes: &[u8]| std::str::from_utf8(bytes).unwrap_or_default().to_owned();
        write!(
            f,
            "00-{}-{}-{}",
            text(&self.trace_id),
            text(&self.span_id),
            text(&self.flags)
        )
    }
}

fn new_span_id() -> [u8; 16] {
    let mut span = [0; 16];
    hex_into(&random_u64().to_be_bytes(), &mut span);
    span
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

/// The inverse of [`hex_into`], for digits [`TraceParent::parse`] has checked.
fn unhex_into(digits: &[u8], out: &mut [u8]) {
    let value = |digit: u8| match digit {
        b'0'..=b'9' => digit - b'0',
        _ => digit.to_ascii_lowercase().wrapping_sub(b'a' - 10) & 0xf,
    };
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (value(pair[0]) << 4) | value(pair[1]);
    }
}

/// 64 random bits from a per-thread generator (SplitMix64) seeded once from the OS, so that ids
/// cost no system call per task. Not for secrets: ids only need to be unique.
pub(crate) fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(u64::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or([7; 8]),
        ));
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A random (version 4) UUID from [`random_u64`].
pub(crate) fn random_uuid() -> uuid::Uuid {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&random_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&random_u64().to_le_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_the_trace() {
        let root = TraceParent::new_root();
        let parsed = TraceParent::parse(&root.to_string()).unwrap();
        assert_eq!(parsed, root);
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(root.to_string().len(), 55);
    }

    #[test]
    fn binary_ids_round_trip() {
        let parsed =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let (trace_id, span_id, flags) = parsed.ids();
        assert_eq!(trace_id[0], 0x0a);
        assert_eq!(trace_id[15], 0x9c);
        assert_eq!(span_id, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        assert_eq!(flags, 1);
        assert_eq!(TraceParent::from_ids(trace_id, span_id, flags), parsed);
    }

    #[test]
    fn rejects_malformed() {
        let valid = TraceParent::parse("00-0AF7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(
            valid.unwrap().trace_id(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(
            TraceParent::parse("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none()
        );
        assert!(
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01").is_none()
        );
        assert!(TraceParent::parse("garbage").is_none());
    }

    #[test]
    fn random_ids_are_distinct_uuids() {
        let ids: std::collections::BTreeSet<_> = (0..1000).map(|_| random_uuid()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.get_version_num() == 4));
    }
}
