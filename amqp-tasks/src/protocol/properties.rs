//! The AMQP properties of task messages: what a task carries ([`task_properties`]) and what a copy
//! of one keeps when a worker sends it on or dead-letters it ([`copy_properties`]). Pure.

use super::codec::Codec;
use super::{TYPE_CALL, short};
use lapin::BasicProperties;
use lapin::types::FieldTable;

/// A task's properties: its id as `message_id`, its codec as `content_type`, `type` = `call`,
/// and its headers. The sender adds persistence or `reply_to`/`expiration`.
pub(crate) fn task_properties(id: &str, codec: Codec, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(short(id))
        .with_content_type(codec.content_type().into())
        .with_type(TYPE_CALL.into())
        .with_headers(headers)
}

/// The properties a copy keeps: everything but `expiration`, `delivery_mode` and the headers,
/// which whoever makes the copy sets.
pub(crate) fn copy_properties(original: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.kind() {
        properties = properties.with_type(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = original.priority() {
        properties = properties.with_priority(*v);
    }
    properties
}
