//! Tasks as types: the [`Task`] trait that `#[task]` implements for each stub (its name, queue,
//! limits, argument and result types, signature), [`TaskId`], and how a task's arguments map onto
//! each codec. Calling a task is the client's ([`TaskCall`](crate::TaskCall)); serving one is the
//! worker's.

use crate::protocol::codec::{Codec, CodecError};
use crate::protocol::json_args::{JsonArgsReader, JsonArgsWriter};
use crate::protocol::signature::Signature;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::Duration;

/// A task's time limit and call deadline when it sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The first retry delay when a task sets no `backoff`.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);

/// A task's identity and types. `#[task]` implements it for the stub type it generates; you do
/// not implement it by hand.
pub trait Task: Send + Sync + 'static {
    /// The arguments, as a tuple in parameter order (the `Context` and `State` parameters
    /// excluded).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What a call returns on success: `T` for a task written `-> T` or `-> Result<T, E>`.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The task's own error: `E` for `-> Result<T, E>`, [`Never`](crate::Never) otherwise.
    type Error: Serialize + DeserializeOwned + Send + 'static;
    /// The task name (`name = "..."`, or the function's name).
    const NAME: &'static str;
    /// The queue it is sent to (`queue = "..."`, or the name), before any namespace prefix.
    const QUEUE: &'static str;
    /// The handler's time limit and the default deadline of calls (`timeout = ...`).
    const TIMEOUT: Duration;
    /// How many times a failed run is retried (`retries = ...`).
    const RETRIES: u32;
    /// The first retry delay, doubled for each further attempt (`backoff = ...`).
    const BACKOFF: Duration;
    /// Whether a panic is retried like an error (`retry_on_panic = true`).
    const RETRY_ON_PANIC: bool;
    /// Whether a worker with a result store writes this task's states and results
    /// (`store_result = false` opts out).
    const STORE_RESULT: bool = true;
    /// The codec of calls made through the stub (`codec = "..."`).
    const CODEC: Codec;
    /// The parameters, for listings and JSON keys.
    const PARAMS: &'static [Param];
    /// The return type as written.
    const OUTPUT: &'static str;
    /// The signature fingerprint sent with every call.
    fn signature() -> &'static Signature;
    /// Writes the arguments as a JSON object (generated per task).
    fn write_json(args: &Self::Args, writer: &mut JsonArgsWriter) -> Result<(), CodecError>;
    /// Reads the arguments from a JSON object (generated per task).
    fn read_json(reader: &mut JsonArgsReader) -> Result<Self::Args, CodecError>;
    /// A human message for the task's error: its `Display`, else its `Debug`, else its type
    /// name (generated per task, where the error type is concrete).
    #[doc(hidden)]
    fn error_message(error: &Self::Error) -> String;
    /// Whether this error is worth another attempt: what [`Retryable`](crate::Retryable) says
    /// where the error type implements it, yes otherwise (generated per task).
    #[doc(hidden)]
    fn should_retry(error: &Self::Error) -> bool;
}

/// A parameter of a task: its name (the JSON key) and its type as written.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// The parameter name.
    pub name: &'static str,
    /// The type as written in the source.
    pub ty: &'static str,
}

/// A task id: a UUID, the `message_id` of the task's messages; stable across retries and replays,
/// so that handlers can be idempotent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    /// A new random id.
    pub fn new() -> TaskId {
        TaskId(crate::protocol::trace::random_uuid().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        TaskId::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for TaskId {
    fn from(id: String) -> Self {
        TaskId(id)
    }
}

impl From<&str> for TaskId {
    fn from(id: &str) -> Self {
        TaskId(id.to_owned())
    }
}

/// Encodes a task's arguments: a tuple in bincode, an object keyed by parameter name in JSON.
pub(crate) fn encode_args<T: Task>(codec: Codec, args: &T::Args) -> Result<Vec<u8>, CodecError> {
    match codec {
        Codec::Bincode => codec.encode(args),
        Codec::Json => {
            let mut writer = JsonArgsWriter::default();
            T::write_json(args, &mut writer)?;
            Ok(writer.finish())
        }
    }
}

/// Decodes a task's arguments; JSON errors name the argument at fault.
pub(crate) fn decode_args<T: Task>(codec: Codec, bytes: &[u8]) -> Result<T::Args, CodecError> {
    match codec {
        Codec::Bincode => codec.decode(bytes),
        Codec::Json => {
            let mut reader = JsonArgsReader::parse(bytes)?;
            let args = T::read_json(&mut reader)?;
            reader.finish(T::PARAMS.iter().map(|p| p.name))?;
            Ok(args)
        }
    }
}
