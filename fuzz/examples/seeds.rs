//! Writes the seed inputs of the fuzz targets into `corpus/<target>/` (beside this project's
//! Cargo.toml): header tables as AMQP encodes them, and task arguments and error replies in
//! bincode and JSON as the framework writes them.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --example seeds`

use amq_protocol_types::{AMQPValue, DecimalValue, FieldTable};
use serde::Serialize;
use std::path::Path;

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    };
    for (name, table) in tables() {
        write("headers", name, &encode_table(&table));
    }
    for (name, args) in args() {
        write("bincode", name, &bincode(&args));
        write("json", name, &json_args(&args));
    }
    for (name, reply) in replies() {
        write("bincode", name, &bincode(&reply));
        write("json", name, &serde_json::to_vec(&reply).unwrap());
    }
    // JSON from other senders: an error reply without `kind` or `args` (aio-pika), arguments
    // as an array, a value of the wrong shape.
    write(
        "json",
        "reply-foreign",
        br#"{"error":{"type":"ValueError","message":"bad"}}"#,
    );
    write("json", "args-array", br#"["a",1,[],null]"#);
    write(
        "json",
        "args-unknown-field",
        br#"{"name":"a","count":1,"tags":["x"],"limit":5,"extra":true}"#,
    );
    write(
        "json",
        "reply-odd-value",
        br#"{"error":{"kind":"task","type":"X","message":"m","args":[],"value":{"a":[1.5e300,-0,"\u00e9\ud83d\ude00"]}}}"#,
    );
}

fn encode_table(table: &FieldTable) -> Vec<u8> {
    cookie_factory::gen_simple(
        amq_protocol_types::generation::gen_field_table(table),
        Vec::new(),
    )
    .unwrap()
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(key.into(), value);
    }
    table
}

fn tables() -> Vec<(&'static str, FieldTable)> {
    let errors = |n: usize, len: usize| {
        AMQPValue::FieldArray(
            (1..=n)
                .map(|i| long(&format!("attempt {i}: {}", "e".repeat(len))))
                .collect::<Vec<_>>()
                .into(),
        )
    };
    vec![
        ("empty", FieldTable::default()),
        ("task-only", table(vec![("task", long("math.add"))])),
        (
            "retry",
            table(vec![
                ("task", long("math.div")),
                ("wire", AMQPValue::LongLongInt(1)),
                ("signature", long("0123456789abcdef")),
                ("attempt", AMQPValue::LongUInt(3)),
                ("deadline", AMQPValue::LongLongInt(1_700_000_000_000)),
                ("eta", AMQPValue::LongLongInt(1_700_000_005_000)),
                ("root_id", long("4f1c2a9e-0000-4000-8000-000000000001")),
                ("parent_id", long("4f1c2a9e-0000-4000-8000-000000000002")),
                (
                    "traceparent",
                    long("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ),
                ("errors", errors(2, 10)),
                ("redeliveries", AMQPValue::LongUInt(1)),
                ("x-delivery-count", AMQPValue::LongLongInt(2)),
                ("delay_bucket", long("800")),
                ("x-custom", long("kept")),
            ]),
        ),
        (
            "forged",
            table(vec![
                ("task", AMQPValue::LongInt(7)),
                ("wire", long("99")),
                ("attempt", AMQPValue::LongLongInt(i64::MAX)),
                ("deadline", AMQPValue::Boolean(true)),
                ("eta", AMQPValue::LongLongInt(-1)),
                ("redeliveries", AMQPValue::LongLongInt(4_294_967_296)),
                ("x-delivery-count", AMQPValue::LongLongInt(-3)),
                ("traceparent", long("00-zz-00-01")),
                ("errors", long("not an array")),
            ]),
        ),
        (
            "string-counts",
            table(vec![
                ("task", AMQPValue::ShortString("add".into())),
                ("attempt", long(" 3 ")),
                ("deadline", AMQPValue::Timestamp(u64::MAX)),
                ("redeliveries", AMQPValue::ShortString("2".into())),
                ("x-delivery-count", AMQPValue::ShortUInt(5)),
                (
                    "errors",
                    AMQPValue::FieldArray(
                        vec![
                            long("x"),
                            AMQPValue::ShortString("y".into()),
                            AMQPValue::LongInt(1),
                            AMQPValue::LongString(b"\xff\xfe not utf-8".to_vec().into()),
                        ]
                        .into(),
                    ),
                ),
            ]),
        ),
        (
            "every-type",
            table(vec![
                ("task", long("t")),
                ("b", AMQPValue::Boolean(false)),
                ("i8", AMQPValue::ShortShortInt(-1)),
                ("u8", AMQPValue::ShortShortUInt(255)),
                ("i16", AMQPValue::ShortInt(-2)),
                ("u16", AMQPValue::ShortUInt(2)),
                ("i32", AMQPValue::LongInt(-3)),
                ("u32", AMQPValue::LongUInt(3)),
                ("i64", AMQPValue::LongLongInt(-4)),
                ("f32", AMQPValue::Float(1.5)),
                ("f64", AMQPValue::Double(f64::NAN)),
                (
                    "dec",
                    AMQPValue::DecimalValue(DecimalValue {
                        scale: 2,
                        value: 12345,
                    }),
                ),
                ("ts", AMQPValue::Timestamp(1_700_000_000)),
                ("bytes", AMQPValue::ByteArray(vec![0, 1, 2, 255].into())),
                ("void", AMQPValue::Void),
                (
                    "nested",
                    AMQPValue::FieldTable(table(vec![
                        ("task", long("inner")),
                        ("deep", AMQPValue::FieldTable(table(vec![("x", long("y"))]))),
                    ])),
                ),
            ]),
        ),
        // Larger than the 4 KiB frame's budget (1 KiB of headers), within the fuzzers' -max_len
        // (8 KiB): fitting must drop foreign headers, cut the history, keep the task.
        (
            "long-errors",
            table(vec![
                ("task", long("t")),
                ("x-foreign", long("f")),
                ("errors", errors(5, 1_000)),
            ]),
        ),
        (
            "big-foreign",
            table(vec![
                ("task", long("t")),
                ("x-a", long(&"a".repeat(700))),
                ("x-b", AMQPValue::ByteArray(vec![7; 900].into())),
                (
                    "x-c",
                    AMQPValue::FieldArray(vec![long(&"c".repeat(600))].into()),
                ),
                ("x-small", long("s")),
            ]),
        ),
        (
            "big-task",
            table(vec![
                ("task", long(&"t".repeat(3_000))),
                ("x-small", long("s")),
            ]),
        ),
        // Larger than the 32 KiB and 128 KiB frames' budgets too (replayed by the tests; past the
        // fuzzers' -max_len).
        (
            "huge-task",
            table(vec![("task", long(&"t".repeat(40_000)))]),
        ),
        (
            "huge-errors",
            table(vec![("task", long("t")), ("errors", errors(40, 1_000))]),
        ),
        (
            "huge-header",
            table(vec![
                ("task", long("t")),
                ("x-big", long(&"b".repeat(140_000))),
                ("x-small", long("s")),
            ]),
        ),
    ]
}

type Args = (String, u32, Vec<String>, Option<i64>);

fn args() -> Vec<(&'static str, Args)> {
    vec![
        ("args", ("a".into(), 1, vec![], None)),
        (
            "args-full",
            (
                "name é😀".into(),
                u32::MAX,
                vec!["x".into(), String::new(), "tag".into()],
                Some(i64::MIN),
            ),
        ),
    ]
}

fn json_args(args: &Args) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "name": args.0,
        "count": args.1,
        "tags": args.2,
        "limit": args.3,
    }))
    .unwrap()
}

/// The body of an error reply, as the framework writes it.
#[derive(Serialize)]
struct ErrorReply {
    error: ErrorBody,
}

#[derive(Serialize)]
struct ErrorBody {
    kind: String,
    #[serde(rename = "type")]
    type_name: String,
    message: String,
    args: Vec<String>,
    value: Option<Vec<Option<String>>>,
}

fn replies() -> Vec<(&'static str, ErrorReply)> {
    let reply = |kind: &str, type_name: &str, message: &str, value| ErrorReply {
        error: ErrorBody {
            kind: kind.into(),
            type_name: type_name.into(),
            message: message.into(),
            args: vec![message.into()],
            value,
        },
    };
    vec![
        ("reply", reply("task", "X", "m", None)),
        (
            "reply-value",
            reply(
                "task",
                "DivByZero",
                "division by zero",
                Some(vec![Some("a".into()), None]),
            ),
        ),
        (
            "reply-framework",
            reply("bad_payload", "BadPayload", "count: invalid type", None),
        ),
    ]
}

fn bincode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
}
