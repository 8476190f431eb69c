//! Replies: the `error` reply body (encoded by workers, decoded by callers, read leniently from
//! other languages' services), the machine-readable [`ErrorKind`], and the one mapping from a
//! received reply to the caller's value or [`CallError`]. Pure: the transport delivers the bytes.

use super::TYPE_ERROR;
use super::codec::{Codec, CodecError};
use crate::error::CallError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Machine-readable kinds of error replies and dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task returned its own error.
    Task,
    /// No task of that name is served here.
    UnknownTask,
    /// The arguments could not be decoded.
    BadPayload,
    /// The sender's signature fingerprint differs from the worker's.
    SignatureMismatch,
    /// The handler panicked.
    Panicked,
    /// The handler ran past its time limit.
    TimeLimit,
    /// The deadline passed before the task could start.
    Deadline,
    /// The `content_type` is not a supported codec.
    UnsupportedContentType,
    /// The body is larger than the worker accepts.
    TooLarge,
    /// The task succeeded but its result could not be encoded.
    BadResult,
    /// The message was redelivered too often: it probably kills its worker.
    TooManyRedeliveries,
    /// The task was revoked: not run, or cancelled while running.
    Revoked,
}

impl ErrorKind {
    /// The name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Task => "task",
            ErrorKind::UnknownTask => "unknown_task",
            ErrorKind::BadPayload => "bad_payload",
            ErrorKind::SignatureMismatch => "signature_mismatch",
            ErrorKind::Panicked => "panicked",
            ErrorKind::TimeLimit => "time_limit",
            ErrorKind::Deadline => "deadline",
            ErrorKind::UnsupportedContentType => "unsupported_content_type",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::BadResult => "bad_result",
            ErrorKind::TooManyRedeliveries => "too_many_redeliveries",
            ErrorKind::Revoked => "revoked",
        }
    }

    /// The name as an exception type, for an error reply's `type`: `bad_payload` → `BadPayload`.
    pub fn type_name(self) -> String {
        self.as_str()
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect()
    }

    /// The kind of a wire name.
    pub fn parse(name: &str) -> Option<ErrorKind> {
        const ALL: [ErrorKind; 12] = [
            ErrorKind::Task,
            ErrorKind::UnknownTask,
            ErrorKind::BadPayload,
            ErrorKind::SignatureMismatch,
            ErrorKind::Panicked,
            ErrorKind::TimeLimit,
            ErrorKind::Deadline,
            ErrorKind::UnsupportedContentType,
            ErrorKind::TooLarge,
            ErrorKind::BadResult,
            ErrorKind::TooManyRedeliveries,
            ErrorKind::Revoked,
        ];
        ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// The body of an `error` reply (see [`crate::wire`]).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorReply<E> {
    pub(crate) error: ErrorBody<E>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody<E> {
    pub(crate) kind: String,
    #[serde(rename = "type")]
    pub(crate) type_name: String,
    pub(crate) message: String,
    pub(crate) args: Vec<String>,
    pub(crate) value: Option<E>,
}

impl<E: Serialize> ErrorReply<E> {
    pub(crate) fn new(kind: ErrorKind, type_name: &str, message: String, value: Option<E>) -> Self {
        ErrorReply {
            error: ErrorBody {
                kind: kind.as_str().to_owned(),
                type_name: type_name.to_owned(),
                args: vec![message.clone()],
                message,
                value,
            },
        }
    }
}

impl ErrorReply<()> {
    /// The body of a framework failure's `error` reply (no typed value), in `codec`; in JSON if
    /// `codec` cannot encode it, so that the caller is told something in any case.
    pub(crate) fn failure_body(codec: Codec, kind: ErrorKind, message: &str) -> Vec<u8> {
        let reply = ErrorReply::new(kind, &kind.type_name(), message.to_owned(), None::<()>);
        codec
            .encode(&reply)
            .or_else(|_| Codec::Json.encode(&reply))
            .unwrap_or_default()
    }
}

/// An error reply as received: what every sender provides, and the typed value when decodable.
#[derive(Debug)]
pub(crate) struct ReceivedError<E> {
    pub(crate) kind: Option<String>,
    pub(crate) type_name: String,
    pub(crate) message: String,
    pub(crate) value: Option<E>,
}

/// Decodes an `error` reply. JSON is read leniently (a reply from aio-pika has no `kind` and no
/// `value`, and its `args` may hold anything).
pub(crate) fn decode_error<E: DeserializeOwned>(
    codec: Codec,
    body: &[u8],
) -> Result<ReceivedError<E>, CodecError> {
    match codec {
        Codec::Bincode => {
            let reply: ErrorReply<E> = codec.decode(body)?;
            Ok(ReceivedError {
                kind: Some(reply.error.kind),
                type_name: reply.error.type_name,
                message: reply.error.message,
                value: reply.error.value,
            })
        }
        Codec::Json => {
            let mut root: serde_json::Value = codec.decode(body)?;
            let error = root
                .get_mut("error")
                .filter(|e| e.is_object())
                .ok_or_else(|| CodecError::new("an error reply without an `error` object"))?;
            let text = |e: &serde_json::Value, key: &str| {
                e.get(key).and_then(|v| v.as_str()).map(str::to_owned)
            };
            let value = match error.get_mut("value").map(serde_json::Value::take) {
                Some(serde_json::Value::Null) | None => None,
                Some(value) => serde_json::from_value(value).ok(),
            };
            Ok(ReceivedError {
                kind: text(error, "kind"),
                type_name: text(error, "type").unwrap_or_default(),
                message: text(error, "message").unwrap_or_default(),
                value,
            })
        }
    }
}

/// A reply as received: its `type`, its `content_type` and its body, decoded by the caller.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) kind: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Vec<u8>,
}

/// Decodes a reply into the task's value or its error.
pub(crate) fn decode_reply<O: DeserializeOwned, E: DeserializeOwned>(
    reply: Reply,
    request_codec: Codec,
) -> Result<O, CallError<E>> {
    decode_reply_with(reply, request_codec, |value: E, _, _| value)
}

/// [`decode_reply`], building the task error from its value, type name and message.
pub(crate) fn decode_reply_with<O: DeserializeOwned, V: DeserializeOwned, E>(
    reply: Reply,
    request_codec: Codec,
    task_error: impl FnOnce(V, String, String) -> E,
) -> Result<O, CallError<E>> {
    let codec = reply
        .content_type
        .as_deref()
        .and_then(Codec::from_content_type)
        .unwrap_or(request_codec);
    match reply.kind.as_deref() {
        Some(TYPE_ERROR) => {
            let error = decode_error::<V>(codec, &reply.body)
                .map_err(|e| CallError::BadReply(format!("error reply: {e}")))?;
            Err(into_call_error(error, task_error))
        }
        _ => codec
            .decode::<O>(&reply.body)
            .map_err(|e| CallError::BadReply(e.to_string())),
    }
}

fn into_call_error<V, E>(
    error: ReceivedError<V>,
    task_error: impl FnOnce(V, String, String) -> E,
) -> CallError<E> {
    let message = error.message;
    match error.kind.as_deref().and_then(ErrorKind::parse) {
        Some(ErrorKind::Task) => match error.value {
            Some(value) => CallError::Task(task_error(value, error.type_name, message)),
            None => CallError::Remote {
                kind: error.type_name,
                message,
            },
        },
        Some(ErrorKind::UnknownTask) => CallError::UnknownTask(message),
        Some(ErrorKind::BadPayload) => CallError::BadPayload(message),
        Some(ErrorKind::SignatureMismatch) => CallError::SignatureMismatch(message),
        Some(ErrorKind::Panicked) => CallError::Panicked(message),
        Some(ErrorKind::TimeLimit) => CallError::TimeLimit(message),
        Some(ErrorKind::Deadline) => CallError::Timeout,
        Some(
            ErrorKind::UnsupportedContentType
            | ErrorKind::TooLarge
            | ErrorKind::TooManyRedeliveries,
        ) => CallError::Rejected(message),
        Some(ErrorKind::BadResult) => CallError::BadReply(message),
        Some(ErrorKind::Revoked) => CallError::Revoked,
        None => CallError::Remote {
            kind: if error.type_name.is_empty() {
                error.kind.unwrap_or_else(|| "error".to_owned())
            } else {
                error.type_name
            },
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TYPE_ERROR;

    #[test]
    fn error_reply_json_shape_matches_aio_pika() {
        let reply = ErrorReply::new(
            ErrorKind::Task,
            "DivError",
            "division by zero".into(),
            Some("ByZero"),
        );
        let json: serde_json::Value =
            serde_json::from_slice(&Codec::Json.encode(&reply).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"kind": "task", "type": "DivError", "message": "division by zero",
                "args": ["division by zero"], "value": "ByZero"}})
        );
    }

    #[test]
    fn error_reply_decodes_in_both_codecs() {
        for codec in [Codec::Bincode, Codec::Json] {
            let reply = ErrorReply::new(ErrorKind::Panicked, "", "boom".into(), None::<()>);
            let received: ReceivedError<String> =
                decode_error(codec, &codec.encode(&reply).unwrap()).unwrap();
            assert_eq!(received.kind.as_deref(), Some("panicked"));
            assert_eq!(received.message, "boom");
            assert!(received.value.is_none());
        }
        let python = br#"{"error": {"type": "ZeroDivisionError", "message": "division by zero", "args": [1, null]}}"#;
        let received: ReceivedError<String> = decode_error(Codec::Json, python).unwrap();
        assert_eq!(
            (received.kind, received.type_name.as_str()),
            (None, "ZeroDivisionError")
        );
    }

    #[test]
    fn error_kinds_round_trip() {
        for name in [
            "task",
            "unknown_task",
            "bad_payload",
            "signature_mismatch",
            "panicked",
            "time_limit",
            "deadline",
            "unsupported_content_type",
            "too_large",
            "bad_result",
            "too_many_redeliveries",
            "revoked",
        ] {
            assert_eq!(ErrorKind::parse(name).unwrap().as_str(), name);
            assert!(!ErrorKind::parse(name).unwrap().type_name().contains('_'));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
        assert_eq!(ErrorKind::BadPayload.type_name(), "BadPayload");
    }

    fn reply(codec: Codec, kind: ErrorKind) -> Reply {
        let body = ErrorReply::new(kind, &kind.type_name(), "why".to_owned(), None::<()>);
        Reply {
            kind: Some(TYPE_ERROR.to_owned()),
            content_type: Some(codec.content_type().to_owned()),
            body: codec.encode(&body).unwrap(),
        }
    }

    #[test]
    fn error_replies_of_either_codec_become_their_call_errors() {
        let why = || "why".to_owned();
        let cases: [(ErrorKind, CallError<String>); 12] = [
            (ErrorKind::UnknownTask, CallError::UnknownTask(why())),
            (ErrorKind::BadPayload, CallError::BadPayload(why())),
            (
                ErrorKind::SignatureMismatch,
                CallError::SignatureMismatch(why()),
            ),
            (ErrorKind::Panicked, CallError::Panicked(why())),
            (ErrorKind::TimeLimit, CallError::TimeLimit(why())),
            (ErrorKind::Deadline, CallError::Timeout),
            (
                ErrorKind::UnsupportedContentType,
                CallError::Rejected(why()),
            ),
            (ErrorKind::TooLarge, CallError::Rejected(why())),
            (ErrorKind::TooManyRedeliveries, CallError::Rejected(why())),
            (ErrorKind::BadResult, CallError::BadReply(why())),
            (ErrorKind::Revoked, CallError::Revoked),
            // A task error without its value (another language's service) is remote.
            (
                ErrorKind::Task,
                CallError::Remote {
                    kind: "Task".to_owned(),
                    message: why(),
                },
            ),
        ];
        for codec in [Codec::Bincode, Codec::Json] {
            for (kind, expected) in &cases {
                let decoded = decode_reply::<i64, String>(reply(codec, *kind), codec);
                assert_eq!(decoded.as_ref(), Err(expected), "{codec:?} {kind:?}");
            }
        }
    }

    #[test]
    fn a_typed_task_error_arrives_intact_in_bincode() {
        let body = ErrorReply::new(
            ErrorKind::Task,
            "DivError",
            "division by zero".to_owned(),
            Some("ByZero".to_owned()),
        );
        let reply = Reply {
            kind: Some(TYPE_ERROR.to_owned()),
            content_type: Some(Codec::Bincode.content_type().to_owned()),
            body: Codec::Bincode.encode(&body).unwrap(),
        };
        assert_eq!(
            decode_reply::<i64, String>(reply, Codec::Bincode),
            Err(CallError::Task("ByZero".to_owned()))
        );
    }
}
