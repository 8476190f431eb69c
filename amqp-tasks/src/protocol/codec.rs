//! Codecs: how arguments, results and errors become message bodies, chosen per message by its
//! `content_type`. Owns the formats and their `content_type`s; how a task's arguments map onto
//! them is the task layer's ([`Task`](crate::Task)), and nothing here does I/O.
//!
//! | codec | `content_type` | arguments |
//! |---|---|---|
//! | [`Codec::Bincode`] (default) | `application/x-bincode` | bincode 2, standard configuration, the arguments as a tuple |
//! | [`Codec::Json`] | `application/json` | an object keyed by parameter name |
//!
//! A worker accepts both and answers in the codec of the request.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest value bincode may decode: a guard against a corrupt length prefix.
const BINCODE_LIMIT: usize = 64 * 1024 * 1024;

/// How a message body is encoded; see the [module documentation](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// bincode 2 with its standard configuration (`application/x-bincode`).
    #[default]
    Bincode,
    /// JSON (`application/json`), readable by any language.
    Json,
}

/// A value could not be encoded or decoded; the message says which value and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

impl CodecError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        CodecError(message.into())
    }
}

/// One wire format. [`Codec`] dispatches to an implementation of it, so a future codec (bincode's
/// successor) is one more implementation, not a change to the runtime.
pub(crate) trait Format {
    /// The `content_type` property of the messages it encodes.
    const CONTENT_TYPE: &'static str;
    /// Encodes one value.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes one value, rejecting trailing bytes.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError>;
}

/// bincode 2, standard configuration.
#[derive(Debug)]
pub(crate) struct BincodeFormat;

impl Format for BincodeFormat {
    const CONTENT_TYPE: &'static str = "application/x-bincode";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| CodecError::new(format!("bincode: {e}")))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        let config = bincode::config::standard().with_limit::<BINCODE_LIMIT>();
        let (value, read) = bincode::serde::decode_from_slice(bytes, config)
            .map_err(|e| CodecError::new(format!("bincode: {e}")))?;
        if read != bytes.len() {
            return Err(CodecError::new(format!(
                "bincode: {} trailing bytes after the value",
                bytes.len() - read
            )));
        }
        Ok(value)
    }
}

/// JSON.
#[derive(Debug)]
pub(crate) struct JsonFormat;

impl Format for JsonFormat {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::new(format!("json: {e}")))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::new(format!("json: {e}")))
    }
}

impl Codec {
    /// The `content_type` property of messages in this codec.
    pub const fn content_type(self) -> &'static str {
        match self {
            Codec::Bincode => BincodeFormat::CONTENT_TYPE,
            Codec::Json => JsonFormat::CONTENT_TYPE,
        }
    }

    /// The codec of a `content_type` (parameters such as `; charset=utf-8` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<Codec> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(BincodeFormat::CONTENT_TYPE) {
            Some(Codec::Bincode)
        } else if essence.eq_ignore_ascii_case(JsonFormat::CONTENT_TYPE) {
            Some(Codec::Json)
        } else {
            None
        }
    }

    /// Encodes one value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Codec::Bincode => BincodeFormat::encode(value),
            Codec::Json => JsonFormat::encode(value),
        }
    }

    /// Decodes one value.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Codec::Bincode => BincodeFormat::decode(bytes),
            Codec::Json => JsonFormat::decode(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_round_trip() {
        for codec in [Codec::Bincode, Codec::Json] {
            assert_eq!(Codec::from_content_type(codec.content_type()), Some(codec));
        }
        assert_eq!(
            Codec::from_content_type("application/json; charset=utf-8"),
            Some(Codec::Json)
        );
        assert_eq!(Codec::from_content_type("text/plain"), None);
    }

    #[test]
    fn bincode_arguments_are_a_plain_tuple() {
        let bytes = Codec::Bincode.encode(&(1i64, "x".to_owned())).unwrap();
        // standard config: zig-zag varint 1 → 2, then length-prefixed string
        assert_eq!(bytes, vec![2, 1, b'x']);
        let back: (i64, String) = Codec::Bincode.decode(&bytes).unwrap();
        assert_eq!(back, (1, "x".to_owned()));
    }

    #[test]
    fn bincode_rejects_truncated_and_trailing_bytes() {
        let bytes = Codec::Bincode.encode(&(300i64, 7u8)).unwrap();
        let truncated = Codec::Bincode.decode::<(i64, u8)>(&bytes[..bytes.len() - 1]);
        assert!(truncated.is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        let error = Codec::Bincode.decode::<(i64, u8)>(&longer).unwrap_err();
        assert!(error.to_string().contains("trailing"), "{error}");
    }
}
