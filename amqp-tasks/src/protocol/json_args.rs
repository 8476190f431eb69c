//! JSON arguments: a task's arguments as a JSON object keyed by parameter name, with every error
//! naming the key at fault. Used by the code `#[task]` generates (through `__private`); pure.

use super::codec::CodecError;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes arguments as a JSON object, one key per parameter (used by generated code).
#[derive(Debug, Default)]
pub struct JsonArgsWriter {
    buf: Vec<u8>,
}

impl JsonArgsWriter {
    /// Appends `"key": value`.
    pub fn arg<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), CodecError> {
        self.buf.push(if self.buf.is_empty() { b'{' } else { b',' });
        serde_json::to_writer(&mut self.buf, key)
            .map_err(|e| CodecError::new(format!("json: {e}")))?;
        self.buf.push(b':');
        serde_json::to_writer(&mut self.buf, value)
            .map_err(|e| CodecError::new(format!("json: argument `{key}`: {e}")))
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.buf.push(b'{');
        }
        self.buf.push(b'}');
        self.buf
    }
}

/// Reads arguments from a JSON object, naming the key in every error (used by generated code).
#[derive(Debug)]
pub struct JsonArgsReader {
    object: serde_json::Map<String, serde_json::Value>,
}

impl JsonArgsReader {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, CodecError> {
        match serde_json::from_slice(bytes) {
            Ok(serde_json::Value::Object(object)) => Ok(JsonArgsReader { object }),
            Ok(_) => Err(CodecError::new(
                "json: the arguments must be an object keyed by parameter name",
            )),
            Err(e) => Err(CodecError::new(format!("json: {e}"))),
        }
    }

    /// Takes the argument `key`; a missing key is an error unless the type accepts `null`
    /// (an `Option`).
    pub fn arg<T: DeserializeOwned>(&mut self, key: &str) -> Result<T, CodecError> {
        match self.object.remove(key) {
            Some(value) => serde_json::from_value(value)
                .map_err(|e| CodecError::new(format!("json: argument `{key}`: {e}"))),
            None => serde_json::from_value(serde_json::Value::Null)
                .map_err(|_| CodecError::new(format!("json: missing argument `{key}`"))),
        }
    }

    pub(crate) fn finish<'a>(
        self,
        expected: impl Iterator<Item = &'a str>,
    ) -> Result<(), CodecError> {
        match self.object.keys().next() {
            None => Ok(()),
            Some(key) => Err(CodecError::new(format!(
                "json: unknown argument `{key}` (the task takes: {})",
                expected.collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_reader_names_keys() {
        let mut reader = JsonArgsReader::parse(br#"{"a": 1, "b": "two", "c": 3}"#).unwrap();
        assert_eq!(reader.arg::<i64>("a").unwrap(), 1);
        let wrong = reader.arg::<i64>("b").unwrap_err().to_string();
        assert!(wrong.contains("argument `b`"), "{wrong}");
        let missing = reader.arg::<i64>("d").unwrap_err().to_string();
        assert!(missing.contains("missing argument `d`"), "{missing}");
        assert_eq!(reader.arg::<Option<i64>>("e").unwrap(), None);
        let unknown = reader
            .finish(["a", "b"].into_iter())
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("unknown argument `c`") && unknown.contains("a, b"),
            "{unknown}"
        );
    }

    #[test]
    fn json_writer_builds_an_object() {
        let mut writer = JsonArgsWriter::default();
        writer.arg("a", &1).unwrap();
        writer.arg("s", "x\"y").unwrap();
        assert_eq!(writer.finish(), br#"{"a":1,"s":"x\"y"}"#.to_vec());
        assert_eq!(JsonArgsWriter::default().finish(), b"{}".to_vec());
    }

    #[test]
    fn json_arguments_must_be_an_object() {
        assert!(
            JsonArgsReader::parse(b"[1, 2]")
                .unwrap_err()
                .to_string()
                .contains("object")
        );
        assert!(JsonArgsReader::parse(b"{").is_err());
    }
}
