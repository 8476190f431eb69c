//! The PostgreSQL result store: one table per namespace (`"<namespace>.amqp_tasks_results"`, or
//! `amqp_tasks_results`), created on first use; one row per task id, upserted a batch at a time
//! (one statement per kind of write, in one transaction) through a small deadpool pool; expired
//! rows are hidden from reads and deleted by the writer; a final state is announced with
//! `pg_notify` on `"<namespace>.amqp_tasks_done"`, which waiters `LISTEN` to.

use super::{Completion, Record, StoredReply, TaskState, TaskStatus, Write, from_unix_ms, unix_ms};
use deadpool_postgres::{Manager, Pool};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

/// PostgreSQL's longest identifier, in bytes.
const IDENTIFIER_MAX: usize = 63;
/// How long one operation may take before the store counts as unreachable.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct PgStore {
    config: tokio_postgres::Config,
    pool: Pool,
    /// The quoted table name.
    table: String,
    /// The notification channel (unquoted: `pg_notify` takes it as text).
    channel: String,
    /// When expired rows were last deleted.
    swept: Mutex<Option<std::time::Instant>>,
}

/// Double-quotes an identifier.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl PgStore {
    pub(super) async fn connect(url: &str, namespace: Option<&str>) -> Result<PgStore, String> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        let prefix = namespace.map_or_else(String::new, |ns| format!("{ns}."));
        let table = format!("{prefix}amqp_tasks_results");
        let channel = format!("{prefix}amqp_tasks_done");
        if channel.len().max(table.len()) > IDENTIFIER_MAX {
            return Err(format!(
                "the namespace `{}` is too long for PostgreSQL names ({IDENTIFIER_MAX} bytes at most for `{table}`)",
                namespace.unwrap_or_default()
            ));
        }
        let manager = Manager::new(config.clone(), NoTls);
        let pool = Pool::builder(manager)
            .max_size(4)
            .wait_timeout(Some(OPERATION_TIMEOUT))
            .create_timeout(Some(OPERATION_TIMEOUT))
            .recycle_timeout(Some(OPERATION_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| e.to_string())?;
        let store = PgStore {
            config,
            pool,
            table: quote(&table),
            channel,
            swept: Mutex::new(None),
        };
        store.create_table().await?;
        Ok(store)
    }

    /// Creates the table if it does not exist (several workers may race to: one wins).
    async fn create_table(&self) -> Result<(), String> {
        let table = &self.table;
        let index = quote(&format!(
            "{}_expires",
            &table[1..table.len() - 1]
                .chars()
                .take(IDENTIFIER_MAX - 8)
                .collect::<String>()
        ));
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id text PRIMARY KEY,
                task text NOT NULL,
                signature text,
                state text NOT NULL,
                attempt integer NOT NULL,
                progress real,
                message text,
                updated_at bigint NOT NULL,
                expires_at bigint NOT NULL,
                kind text,
                content_type text,
                body bytea
            );
            CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);"
        );
        let client = self.client().await?;
        let mut outcome = client.batch_execute(&sql).await;
        if outcome.is_err() {
            // Lost a race with another process creating it: it exists now.
            outcome = client.batch_execute(&sql).await;
        }
        outcome.map_err(|e| describe(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        self.pool.get().await.map_err(|e| e.to_string())
    }

    pub(super) async fn write(&self, batch: &[Write], ttl: Duration) -> Result<(), String> {
        tokio::time::timeout(OPERATION_TIMEOUT, self.write_now(batch, ttl))
            .await
            .map_err(|_| "no answer".to_owned())?
    }

    async fn write_now(&self, batch: &[Write], ttl: Duration) -> Result<(), String> {
        let now = SystemTime::now();
        let expires =
            unix_ms(now).saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let rows = merge(batch);
        let mut full = Columns::default();
        let mut progress_only = Columns::default();
        let mut finished = Vec::new();
        for row in rows.into_values() {
            if row.full && row.state.is_final() {
                finished.push(row.id.clone());
            }
            if row.full {
                &mut full
            } else {
                &mut progress_only
            }
            .push(row, expires);
        }
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(|e| describe(&e))?;
        let table = &self.table;
        let columns = "id, task, signature, state, attempt, progress, message, updated_at, expires_at, kind, content_type, body";
        let values = "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::float4[], $7::text[], $8::int8[], $9::int8[], $10::text[], $11::text[], $12::bytea[])";
        if !full.id.is_empty() {
            let sql = format!(
                "INSERT INTO {table} ({columns}) {values} ON CONFLICT (id) DO UPDATE SET
                    task = EXCLUDED.task, signature = EXCLUDED.signature, state = EXCLUDED.state,
                    attempt = EXCLUDED.attempt, progress = EXCLUDED.progress,
                    message = EXCLUDED.message, updated_at = EXCLUDED.updated_at,
                    expires_at = EXCLUDED.expires_at, kind = EXCLUDED.kind,
                    content_type = EXCLUDED.content_type, body = EXCLUDED.body"
            );
            transaction
                .execute(&sql, &full.params())
                .await
                .map_err(|e| describe(&e))?;
        }
        if !progress_only.id.is_empty() {
            let sql = format!(
                "INSERT INTO {table} ({columns}) {values} ON CONFLICT (id) DO UPDATE SET
                    progress = EXCLUDED.progress, message = EXCLUDED.message,
                    updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at"
            );
            transaction
                .execute(&sql, &progress_only.params())
                .await
                .map_err(|e| describe(&e))?;
        }
        if !finished.is_empty() {
            transaction
                .execute(
                    "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id",
                    &[&self.channel, &finished],
                )
                .await
                .map_err(|e| describe(&e))?;
        }
        let sweep = {
            let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
            let due = swept.is_none_or(|at| at.elapsed() >= ttl.min(Duration::from_secs(60)));
            if due {
                *swept = Some(std::time::Instant::now());
            }
            due
        };
        if sweep {
            transaction
                .execute(
                    &format!("DELETE FROM {table} WHERE expires_at <= $1"),
                    &[&unix_ms(now)],
                )
                .await
                .map_err(|e| describe(&e))?;
        }
        transaction.commit().await.map_err(|e| describe(&e))
    }

    pub(super) async fn read(&self, id: &str) -> Result<Option<Record>, String> {
        tokio::time::timeout(OPERATION_TIMEOUT, async {
            let client = self.client().await?;
            let sql = format!(
                "SELECT task, signature, state, attempt, progress, message, updated_at, kind, content_type, body
                 FROM {} WHERE id = $1 AND expires_at > $2",
                self.table
            );
            let row = client
                .query_opt(&sql, &[&id, &unix_ms(SystemTime::now())])
                .await
                .map_err(|e| describe(&e))?;
            Ok(row.map(|row| {
                let state: String = row.get(2);
                let attempt: i32 = row.get(3);
                let reply = match (row.get::<_, Option<String>>(7), row.get::<_, Option<String>>(8)) {
                    (Some(kind), Some(content_type)) => Some(StoredReply {
                        kind,
                        content_type,
                        body: row.get::<_, Option<Vec<u8>>>(9).unwrap_or_default(),
                    }),
                    _ => None,
                };
                Record {
                    status: TaskStatus {
                        state: TaskState::parse(&state).unwrap_or(TaskState::Started),
                        attempt: u32::try_from(attempt).unwrap_or(1),
                        progress: row.get(4),
                        message: row.get(5),
                        updated_at: from_unix_ms(row.get(6)),
                    },
                    task: row.get(0),
                    signature: row.get(1),
                    reply,
                }
            }))
        })
        .await
        .map_err(|_| "no answer".to_owned())?
    }

    pub(super) async fn subscribe(&self, id: &str) -> Result<Completion, String> {
        let (client, mut connection) =
            tokio::time::timeout(OPERATION_TIMEOUT, self.config.connect(NoTls))
                .await
                .map_err(|_| "no answer".to_owned())?
                .map_err(|e| describe(&e))?;
        let (signal, signals) = mpsc::channel(1);
        let id = id.to_owned();
        let driver = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(note))
                        if note.payload() == id =>
                    {
                        let _ = signal.try_send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let guard = Listener {
            _client: client,
            driver,
        };
        tokio::time::timeout(
            OPERATION_TIMEOUT,
            guard
                ._client
                .batch_execute(&format!("LISTEN {}", quote(&self.channel))),
        )
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| describe(&e))?;
        Ok(Completion::new(signals, Box::new(guard)))
    }
}

/// A waiter's own connection, listening.
struct Listener {
    _client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The server's message where there is one (tokio-postgres' `Display` says only "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{error}: {}", db.message()),
        None => error.to_string(),
    }
}

/// One row to upsert: `full` rows replace everything, the others only their progress.
struct Row {
    id: String,
    full: bool,
    task: String,
    signature: Option<String>,
    state: TaskState,
    attempt: i32,
    progress: Option<f32>,
    message: Option<String>,
    at: i64,
    reply: Option<StoredReply>,
}

/// A batch as one row per id (an upsert may touch a row once), in the order they were written.
fn merge(batch: &[Write]) -> HashMap<String, Row> {
    let mut rows: HashMap<String, Row> = HashMap::new();
    for write in batch {
        match write {
            Write::State {
                id,
                task,
                signature,
                state,
                attempt,
                message,
                reply,
                at,
            } => {
                rows.insert(
                    id.clone(),
                    Row {
                        id: id.clone(),
                        full: true,
                        task: task.clone(),
                        signature: signature.clone(),
                        state: *state,
                        attempt: i32::try_from(*attempt).unwrap_or(i32::MAX),
                        progress: None,
                        message: message.clone(),
                        at: unix_ms(*at),
                        reply: reply.clone(),
                    },
                );
            }
            Write::Progress {
                id,
                fraction,
                message,
                at,
            } => {
                let row = rows.entry(id.clone()).or_insert_with(|| Row {
                    id: id.clone(),
                    full: false,
                    task: String::new(),
                    signature: None,
                    state: TaskState::Started,
                    attempt: 1,
                    progress: None,
                    message: None,
                    at: 0,
                    reply: None,
                });
                row.progress = Some(*fraction);
                row.message = Some(message.clone());
                row.at = unix_ms(*at);
            }
        }
    }
    rows
}

/// Rows as the arrays of an `unnest`.
#[derive(Default)]
struct Columns {
    id: Vec<String>,
    task: Vec<String>,
    signature: Vec<Option<String>>,
    state: Vec<String>,
    attempt: Vec<i32>,
    progress: Vec<Option<f32>>,
    message: Vec<Option<String>>,
    at: Vec<i64>,
    expires: Vec<i64>,
    kind: Vec<Option<String>>,
    content_type: Vec<Option<String>>,
    body: Vec<Option<Vec<u8>>>,
}

impl Columns {
    fn push(&mut self, row: Row, expires: i64) {
        self.id.push(row.id);
        self.task.push(row.task);
        self.signature.push(row.signature);
        self.state.push(row.state.as_str().to_owned());
        self.attempt.push(row.attempt);
        self.progress.push(row.progress);
        self.message.push(row.message);
        self.at.push(row.at);
        self.expires.push(expires);
        let (kind, content_type, body) = match row.reply {
            Some(reply) => (Some(reply.kind), Some(reply.content_type), Some(reply.body)),
            None => (None, None, None),
        };
        self.kind.push(kind);
        self.content_type.push(content_type);
        self.body.push(body);
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 12] {
        [
            &self.id,
            &self.task,
            &self.signature,
            &self.state,
            &self.attempt,
            &self.progress,
            &self.message,
            &self.at,
            &self.expires,
            &self.kind,
            &self.content_type,
            &self.body,
        ]
    }
}
