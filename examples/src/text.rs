//! Text tasks, grouped on one queue.

use amqp_tasks::task;

/// Upper-cases a text.
#[task(queue = "text")]
pub async fn shout(text: String) -> String {
    text.to_uppercase()
}

/// Counts the words of a text.
#[task(queue = "text")]
pub async fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}
