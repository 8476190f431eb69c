//! Presence: which tasks some live worker serves. Each worker consumes one presence queue per task
//! it serves (`<namespace>.amqp-tasks.serves.<task>`, auto-delete: it exists while a worker
//! consumes it), so that a worker given a message for a task it does not serve (a queue shared by
//! tasks that workers serve in part, a rolling deploy where old and new workers know different
//! tasks) can pass it on to one that does, instead of dead-lettering work another worker could do.

use crate::client::Client;
use crate::protocol::SHORT_MAX;
use crate::protocol::topology::presence_queue;
use crate::transport::probe::Entity;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long an answer is reused: a flood of messages for one task costs one probe per second.
const FRESH: Duration = Duration::from_secs(1);
/// At most this many task names are remembered (a flood of distinct names forgets them all).
const REMEMBERED: usize = 1_024;

/// What this worker knows of other workers' tasks.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    known: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Presence {
    /// Whether a live worker consumes the presence queue of `task` (a recent answer, or a probe).
    pub(crate) async fn served(&self, client: &Client, task: &str) -> bool {
        if let Some((at, served)) = self.lock().get(task).copied()
            && at.elapsed() < FRESH
        {
            return served;
        }
        let queue = presence_queue(client.namespace(), task);
        if queue.len() > SHORT_MAX {
            // No worker can consume a presence queue whose name AMQP cannot carry.
            return false;
        }
        let served = match client.session().await {
            Ok(session) => session
                .probe(&queue, Entity::Queue)
                .await
                .ok()
                .flatten()
                .is_some_and(|counts| counts.consumers > 0),
            Err(_) => false,
        };
        let mut known = self.lock();
        if known.len() >= REMEMBERED {
            known.clear();
        }
        known.insert(task.to_owned(), (Instant::now(), served));
        served
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, bool)>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}
