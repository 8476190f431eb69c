//! Property tests of everything that reads bytes or headers from the wire: no input makes it
//! panic, and what is written reads back.

use crate::protocol::codec::Codec;
use crate::protocol::headers::TaskHeaders;
use crate::protocol::reply::{ErrorKind, decode_error};
use crate::protocol::trace::TraceParent;
use crate::protocol::{WIRE_VERSION, short};
use crate::task::{Task, decode_args, encode_args};
use crate::worker::settle::{Ack, AckWindow};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use proptest::prelude::*;
use std::collections::BTreeSet;

#[crate::task]
async fn sample(name: String, count: u32, tags: Vec<String>, limit: Option<i64>) -> Vec<u8> {
    let _ = (name, count, tags, limit);
    Vec::new()
}

fn value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        any::<f64>().prop_map(AMQPValue::Double),
        ".{0,40}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        "[a-z]{0,20}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        proptest::collection::vec(inner, 0..4).prop_map(|v| AMQPValue::FieldArray(v.into()))
    })
}

fn table() -> impl Strategy<Value = FieldTable> {
    let keys = prop_oneof![
        Just("task".to_owned()),
        Just("attempt".to_owned()),
        Just("deadline".to_owned()),
        Just("eta".to_owned()),
        Just("errors".to_owned()),
        Just("redeliveries".to_owned()),
        Just("x-delivery-count".to_owned()),
        Just("traceparent".to_owned()),
        Just("signature".to_owned()),
        Just("wire".to_owned()),
        Just("root_id".to_owned()),
        Just("parent_id".to_owned()),
        "[a-z_-]{1,12}",
    ];
    proptest::collection::vec((keys, value()), 0..12).prop_map(|entries| {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(key.as_str().into(), value);
        }
        table
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn headers_never_panic_and_rewrite_stably(table in table()) {
        let headers = TaskHeaders::from_table(Some(&table));
        prop_assert!(headers.attempt >= 1);
        let rewritten = headers.write_into(table.clone());
        let mut again = TaskHeaders::from_table(Some(&rewritten));
        // An absent `wire` header means the current version: not written, read as absent.
        if headers.wire == Some(WIRE_VERSION) {
            prop_assert_eq!(again.wire, None);
            again.wire = headers.wire;
        }
        // Every field reads back as it was read (attempt, deadline, eta, ids, trace, errors,
        // redeliveries, ...), but the broker's delivery count, which no copy carries.
        let mut expected = headers.clone();
        expected.delivery_count = None;
        prop_assert_eq!(again, expected);
    }

    #[test]
    fn argument_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        for codec in [Codec::Bincode, Codec::Json] {
            let _ = decode_args::<sample>(codec, &bytes);
            let _ = decode_error::<String>(codec, &bytes);
            let _ = codec.decode::<Vec<Option<String>>>(&bytes);
        }
    }

    #[test]
    fn json_that_is_almost_right_is_refused_with_the_key(
        name in ".{0,10}", count in any::<u32>(), extra in "[a-z]{1,8}", drop_key in 0usize..4,
    ) {
        let mut object = serde_json::json!({"name": name, "count": count, "tags": [], "limit": null});
        let keys = ["name", "count", "tags", "limit"];
        object.as_object_mut().unwrap().remove(keys[drop_key]);
        object.as_object_mut().unwrap().insert(format!("zz{extra}"), serde_json::json!(1));
        let error = decode_args::<sample>(Codec::Json, &serde_json::to_vec(&object).unwrap()).unwrap_err().to_string();
        if keys[drop_key] == "limit" {
            // An Option may be left out: the unknown key is what is wrong.
            prop_assert!(error.contains(&format!("unknown argument `zz{extra}`")), "{}", error);
        } else {
            prop_assert!(error.contains(&format!("missing argument `{}`", keys[drop_key])), "{}", error);
        }
    }

    #[test]
    fn arguments_round_trip_in_both_codecs(
        name in ".{0,20}", count in any::<u32>(), tags in proptest::collection::vec(".{0,5}", 0..4), limit in any::<Option<i64>>(),
    ) {
        let args = (name, count, tags, limit);
        for codec in [Codec::Bincode, Codec::Json] {
            let bytes = encode_args::<sample>(codec, &args).unwrap();
            prop_assert_eq!(&decode_args::<sample>(codec, &bytes).unwrap(), &args);
            if codec == Codec::Bincode && !bytes.is_empty() {
                // A truncated body is an error, never a wrong value.
                prop_assert!(decode_args::<sample>(codec, &bytes[..bytes.len() - 1]).is_err());
            }
        }
    }

    #[test]
    fn text_fields_never_panic(text in ".{0,80}") {
        let _ = TraceParent::parse(&text);
        let _ = Codec::from_content_type(&text);
        let _ = ErrorKind::parse(&text);
        let _ = short(&text.repeat(8));
    }

    /// Whatever order handlers finish in, and whatever is requeued, every ack the acker sends
    /// is right at the moment it is sent: a single ack names a finished delivery not settled
    /// before, a multiple ack covers only deliveries that have finished (never one still
    /// running behind a gap), and in the end each finished delivery is acked exactly once.
    #[test]
    fn the_acker_acks_exactly_the_finished_deliveries(
        order in Just((1..=60u64).collect::<Vec<_>>()).prop_shuffle(),
        requeued in proptest::collection::btree_set(1..=60u64, 0..10),
        batch in 1usize..8,
    ) {
        let mut window = AckWindow::default();
        // Reported finished by a handler, not acked yet.
        let mut finished = BTreeSet::new();
        // Settled as the broker sees it: acked, or requeued (nacked).
        let mut settled = BTreeSet::new();
        for chunk in order.chunks(batch) {
            for tag in chunk {
                if requeued.contains(tag) {
                    window.settled_alone(*tag);
                    settled.insert(*tag);
                } else {
                    window.finished(*tag);
                    finished.insert(*tag);
                }
            }
            for ack in window.take_acks() {
                let covered: Vec<u64> = match ack {
                    Ack::One(tag) => {
                        prop_assert!(!settled.contains(&tag), "{:?}: settled twice", ack);
                        vec![tag]
                    }
                    // A multiple ack settles every delivery up to its tag not settled before.
                    Ack::Through(tag) => (1..=tag).filter(|t| !settled.contains(t)).collect(),
                };
                for tag in covered {
                    prop_assert!(
                        finished.remove(&tag),
                        "{:?} acks delivery {} before its handler finished", ack, tag
                    );
                    settled.insert(tag);
                }
            }
        }
        prop_assert!(finished.is_empty(), "finished, never acked: {:?}", finished);
        prop_assert_eq!(settled.len(), 60);
    }
}

#[test]
fn the_sample_task_is_what_the_properties_use() {
    assert_eq!(<sample as Task>::PARAMS.len(), 4);
}
