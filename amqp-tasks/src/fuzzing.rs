//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the replay of their corpus in
//! the ordinary test run: what a worker does with bytes from the wire, with every invariant that
//! must hold asserted (a panic is a finding). Not a public API.

use crate::protocol::codec::{Codec, CodecError};
use crate::protocol::headers::{HeaderBudget, TaskHeaders, fit, table_len};
use crate::protocol::json_args::{JsonArgsReader, JsonArgsWriter};
use crate::protocol::reply::decode_error;
use crate::protocol::signature::Signature;
use crate::protocol::{WIRE_VERSION, trace::TraceParent};
use crate::task::{Param, Task, decode_args, encode_args};
use std::sync::OnceLock;
use std::time::Duration;

/// A header table as AMQP encodes it: parsed as lapin parses one, read as a worker reads a
/// delivery's headers, rewritten as a retry rewrites them (which must read back the same), and
/// fitted into every budget a frame size gives (which must then hold).
pub fn headers(bytes: &[u8]) {
    let Ok((_, table)) = amq_protocol_types::parsing::parse_field_table(bytes) else {
        return;
    };
    let headers = TaskHeaders::from_table(Some(&table));
    assert!(headers.attempt >= 1);
    let _ = headers.traceparent.as_deref().map(TraceParent::parse);
    let rewritten = headers.write_into(table.clone());
    let mut again = TaskHeaders::from_table(Some(&rewritten));
    if headers.wire == Some(WIRE_VERSION) {
        again.wire = headers.wire;
    }
    // The broker's `x-delivery-count` belongs to the delivery it came with: a copy never carries it.
    assert_eq!(
        again.delivery_count, None,
        "a rewrite kept x-delivery-count"
    );
    again.delivery_count = headers.delivery_count;
    assert_eq!(
        again, headers,
        "headers read back differently after a rewrite"
    );
    for frame_max in [4_096, 32_768, 131_072] {
        let budget = HeaderBudget::for_frame_max(frame_max);
        let fitted = fit(table.clone(), budget.write);
        assert!(
            table_len(&fitted) <= budget.write,
            "fit left a table too large"
        );
    }
}

/// A body as the bincode arguments of a task, and as a bincode error reply.
pub fn bincode(bytes: &[u8]) {
    decoders(Codec::Bincode, bytes);
}

/// A body as the JSON arguments of a task, and as a JSON error reply.
pub fn json(bytes: &[u8]) {
    decoders(Codec::Json, bytes);
}

fn decoders(codec: Codec, bytes: &[u8]) {
    if let Ok(args) = decode_args::<Sample>(codec, bytes) {
        // What decodes re-encodes, and reads back the same.
        let encoded = encode_args::<Sample>(codec, &args).expect("decoded arguments re-encode");
        let back = decode_args::<Sample>(codec, &encoded).expect("re-encoded arguments decode");
        assert_eq!(back, args);
    }
    let _ = decode_error::<Vec<Option<String>>>(codec, bytes);
    let _ = codec.decode::<serde_json::Value>(bytes);
}

/// A task with arguments of several shapes, written out by hand (a `#[task]` here would register
/// a handler in every binary that links this crate).
#[derive(Debug)]
enum Sample {}

impl Task for Sample {
    type Args = (String, u32, Vec<String>, Option<i64>);
    type Output = Vec<u8>;
    type Error = String;
    const NAME: &'static str = "fuzz.sample";
    const QUEUE: &'static str = "fuzz.sample";
    const TIMEOUT: Duration = Duration::from_secs(1);
    const RETRIES: u32 = 0;
    const BACKOFF: Duration = Duration::from_secs(1);
    const RETRY_ON_PANIC: bool = false;
    const CODEC: Codec = Codec::Bincode;
    const PARAMS: &'static [Param] = &[
        Param {
            name: "name",
            ty: "String",
        },
        Param {
            name: "count",
            ty: "u32",
        },
        Param {
            name: "tags",
            ty: "Vec<String>",
        },
        Param {
            name: "limit",
            ty: "Option<i64>",
        },
    ];
    const OUTPUT: &'static str = "Result<Vec<u8>, String>";

    fn signature() -> &'static Signature {
        static SIGNATURE: OnceLock<Signature> = OnceLock::new();
        SIGNATURE.get_or_init(|| {
            Signature::of_task(
                [
                    "(String, u32, Vec<String>, Option<i64>)",
                    "Vec<u8>",
                    "String",
                ],
                ["", "", ""],
            )
        })
    }

    fn write_json(args: &Self::Args, writer: &mut JsonArgsWriter) -> Result<(), CodecError> {
        writer.arg("name", &args.0)?;
        writer.arg("count", &args.1)?;
        writer.arg("tags", &args.2)?;
        writer.arg("limit", &args.3)
    }

    fn read_json(reader: &mut JsonArgsReader) -> Result<Self::Args, CodecError> {
        Ok((
            reader.arg("name")?,
            reader.arg("count")?,
            reader.arg("tags")?,
            reader.arg("limit")?,
        ))
    }

    fn error_message(error: &String) -> String {
        error.clone()
    }

    fn should_retry(_: &String) -> bool {
        false
    }
}
