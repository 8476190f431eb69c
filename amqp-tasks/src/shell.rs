//! The `amqp-tasks` command: call any task from a shell, inspect task queues.
//!
//! ```text
//! amqp-tasks call <task> ['<json args>'] [--delay] [--timeout 5s] [--queue Q]
//! amqp-tasks queues <task>... [--json]
//! amqp-tasks events [--task NAME]
//! amqp-tasks inspect ping|registered|active|stats [--timeout 1s]
//! amqp-tasks revoke <task id>... [--terminate]
//! ```
//!
//! Both take `--url` (env `AMQP_URL`, default [`DEFAULT_URL`]) and `--namespace`
//! (env `AMQP_TASKS_NAMESPACE`). Installed with `cargo install amqp-tasks`; the binary is
//! `fn main() -> ExitCode { amqp_tasks::shell::main() }`.
//!
//! `call` sends the arguments (a JSON object keyed by parameter name, default `{}`) as a
//! [`DynamicCall`], so the worker checks them against the task's parameters and names any
//! argument at fault. It prints the result as one line of JSON on stdout, or with `--delay` the
//! task id once the broker confirmed the message; errors go to stderr. It also calls functions
//! registered with aio-pika's `JsonRPC` (the task name is the method name).
//!
//! `queues` prints, for each task queue (a task's queue is named after the task unless it sets
//! `queue = "..."`), the messages ready in it, its consumers and the messages in its `.dlq`,
//! through passive declares (no management plugin needed).
//!
//! `events` prints, live and one JSON object a line, the events of the workers started with
//! `--events` (`{"event", "task", "id", "attempt", "worker", "at_ms"}`, plus `error` where there
//! is one), until interrupted; `--task` keeps one task's events (the worker events are left
//! out then). It declares the events exchange (as the workers do) and a queue of its own,
//! deleted when it exits.
//!
//! `inspect` asks every live worker of the namespace, through the control exchange (fanout),
//! who it is (`ping`: its id `<host>:<pid>` and uptime), what it serves (`registered`), what it
//! runs now (`active`: task, id, for how long) or its counters (`stats`), and prints each
//! answer received within `--timeout` (default 1 s) as one JSON line. It exits 0 when at least
//! one worker answered, 3 when none did.
//!
//! `revoke` appends the ids to the namespace's revocations stream (declared with the workers'
//! arguments; kept 24 h), which every worker reads before it takes tasks: a revoked task that has
//! not started is not run, nor dead-lettered, and a `.call()` waiting for it gets
//! [`CallError::Revoked`]. With `--terminate` a run in progress is cancelled too. It exits 0 once
//! the broker confirmed the revocation.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the task ran and returned its error ([`CallError::Task`], or an error of another language's service: [`CallError::Remote`]) |
//! | 2 | usage: bad command line, arguments that are not a JSON object, invalid namespace |
//! | 3 | timeout: no answer before `--timeout` (with `--delay`: no publisher confirm in time) |
//! | 4 | the broker could not be reached, or the connection dropped |
//! | 5 | the call failed in the framework: no queue for the task (`no_route`), unknown task, arguments the worker could not decode, panic, time limit, rejected, undecodable reply; for `queues`: a queue does not exist |

use crate::client::{Client, DEFAULT_URL, DynamicCall};
use crate::error::{CallError, Error};
use crate::protocol::duration;
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the task returned its error.
pub const EXIT_TASK_ERROR: u8 = 1;
/// Exit code: bad command line or arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no answer (or confirm) in time.
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit code: the broker could not be reached or the connection dropped.
pub const EXIT_CONNECTION: u8 = 4;
/// Exit code: the framework refused or failed the call (no route, bad payload, ...).
pub const EXIT_FAILED: u8 = 5;

/// Calls amqp-tasks tasks (and aio-pika JsonRPC functions) from a shell.
#[derive(Parser, Debug)]
#[command(
    name = "amqp-tasks",
    version,
    about = "Calls amqp-tasks tasks (and aio-pika JsonRPC functions) from a shell",
    after_help = "Exit codes: 0 ok, 1 the task returned an error, 2 usage, 3 timeout, \
                  4 broker unreachable or connection lost, 5 other failure (no queue for the task, \
                  bad arguments, unknown task, panic, ...; for `queues`: a queue does not exist)."
)]
struct Cli {
    /// Broker URL (amqp://user:password@host:port/vhost).
    #[arg(long, global = true, env = "AMQP_URL", default_value = DEFAULT_URL, hide_default_value = true, hide_env_values = true)]
    url: String,
    /// Prefix of every queue name (`<namespace>.<queue>`).
    #[arg(long, global = true, env = "AMQP_TASKS_NAMESPACE", default_value = "")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Call a task and print its JSON result (or, with --delay, its task id).
    Call {
        /// The task name (for aio-pika JsonRPC: the method name).
        task: String,
        /// The arguments: a JSON object keyed by parameter name.
        #[arg(default_value = "{}")]
        args: String,
        /// Fire and forget: print the task id once the broker confirmed the message.
        #[arg(long)]
        delay: bool,
        /// How long to wait for the answer (with --delay: for the broker's confirm)
        /// [default: 61s for a call, 30s for a confirm].
        #[arg(long, value_parser = duration::parse)]
        timeout: Option<Duration>,
        /// The task's queue, when it is not named after the task (`#[task(queue = "...")]`).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Print the events of the workers started with --events, live, one JSON line each.
    Events {
        /// Only this task's events.
        #[arg(long)]
        task: Option<String>,
    },
    /// Ask every live worker: ping, registered, active or stats; one JSON line per answer.
    Inspect {
        /// ping | registered | active | stats
        #[arg(value_parser = parse_inspect)]
        what: crate::protocol::control::Inspect,
        /// How long to wait for answers.
        #[arg(long, default_value = "1s", value_parser = duration::parse)]
        timeout: Duration,
    },
    /// Revoke tasks by id: not run by any worker (kept 24 h); --terminate cancels running ones.
    Revoke {
        /// The task ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Also cancel the tasks where they run now.
        #[arg(long)]
        terminate: bool,
    },
    /// Print each task queue's ready messages, consumers and dead letters.
    Queues {
        /// Task names (or the queue names of tasks grouped with `queue = "..."`).
        #[arg(required = true)]
        tasks: Vec<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the `amqp-tasks` command line; see the [module documentation](self) for the commands
/// and the exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("amqp-tasks: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(run(cli));
    // lapin's I/O thread ends with its connection; do not wait on anything else left behind.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

async fn run(cli: Cli) -> u8 {
    let mut builder = Client::builder(cli.url.clone()).namespace(cli.namespace.clone());
    let arguments = match &cli.command {
        Command::Call {
            args,
            delay,
            timeout,
            ..
        } => {
            if let (true, Some(timeout)) = (delay, timeout) {
                builder = builder.confirm_timeout(*timeout);
            }
            match parse_arguments(args) {
                Ok(arguments) => Some(arguments),
                Err(message) => {
                    eprintln!("amqp-tasks: {message}");
                    return EXIT_USAGE;
                }
            }
        }
        Command::Queues { .. }
        | Command::Events { .. }
        | Command::Inspect { .. }
        | Command::Revoke { .. } => None,
    };
    let client = match builder.connect().await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("amqp-tasks: {error}");
            return match error {
                Error::Config(_) => EXIT_USAGE,
                _ => EXIT_CONNECTION,
            };
        }
    };
    let code = match cli.command {
        Command::Call {
            task,
            delay,
            timeout,
            queue,
            ..
        } => {
            let mut call = DynamicCall::new(task, arguments.unwrap_or_default());
            if let Some(queue) = queue {
                call = call.queue(queue);
            }
            if delay {
                report(call.delay(&client).await.map(|id| id.to_string()))
            } else {
                if let Some(timeout) = timeout {
                    call = call.timeout(timeout);
                }
                report(call.call(&client).await.map(|value| value.to_string()))
            }
        }
        Command::Queues { tasks, json } => queues(&client, &tasks, json).await,
        Command::Events { task } => events(&client, task.as_deref()).await,
        Command::Inspect { what, timeout } => inspect(&client, what, timeout).await,
        Command::Revoke { ids, terminate } => revoke(&client, ids, terminate).await,
    };
    client.close().await;
    code
}

/// Appends a revocation to the stream and waits for the broker's confirm.
async fn revoke(client: &Client, ids: Vec<String>, terminate: bool) -> u8 {
    use crate::protocol::control::Revocation;
    let queue = crate::protocol::topology::revocations_queue(client.namespace());
    let declared = async {
        let session = client.session().await.map_err(|e| e.to_string())?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        crate::transport::topology::declare_revocations(&channel, &queue)
            .await
            .map_err(|e| format!("declaring `{queue}`: {e}"))?;
        let _ = channel.close(200, "declared".into()).await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(30), declared).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            eprintln!("amqp-tasks: {error}");
            return EXIT_CONNECTION;
        }
        Err(_) => {
            eprintln!("amqp-tasks: the broker did not answer in time");
            return EXIT_TIMEOUT;
        }
    }
    let count = ids.len();
    let Ok(body) = serde_json::to_vec(&Revocation::Revoke { ids, terminate }) else {
        return EXIT_FAILED;
    };
    let properties = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let deadline = tokio::time::Instant::now() + client.confirm_timeout();
    match client
        .publish(&queue, &body, properties, None, deadline)
        .await
    {
        Ok(()) => {
            println!(
                "revoked {count} task(s){}",
                if terminate {
                    " (terminating running ones)"
                } else {
                    ""
                }
            );
            EXIT_OK
        }
        Err(error) => {
            eprintln!("amqp-tasks: {}: {error}", error.kind());
            exit_code(&error)
        }
    }
}

fn parse_inspect(text: &str) -> Result<crate::protocol::control::Inspect, String> {
    crate::protocol::control::Inspect::parse(text)
        .ok_or_else(|| format!("`{text}`: ask ping, registered, active or stats"))
}

/// Sends one inspect request to every worker; prints the answers that come within `timeout`.
async fn inspect(
    client: &Client,
    what: crate::protocol::control::Inspect,
    timeout: Duration,
) -> u8 {
    use crate::protocol::control::Request;
    use lapin::options::BasicPublishOptions;
    let exchange = crate::protocol::topology::control_exchange(client.namespace());
    let asked = async {
        let session = client.session().await.map_err(|e| e.to_string())?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        crate::transport::topology::declare_control(&channel, &exchange)
            .await
            .map_err(|e| format!("declaring `{exchange}`: {e}"))?;
        let answers = format!("{exchange}.answers");
        let queue = crate::transport::topology::declare_private_queue(&channel, &answers)
            .await
            .map_err(|e| format!("declaring `{answers}.*`: {e}"))?;
        let consumer = crate::transport::consume_no_ack(&channel, &queue)
            .await
            .map_err(|e| format!("consuming `{queue}`: {e}"))?;
        let body = serde_json::to_vec(&Request { inspect: what }).map_err(|e| e.to_string())?;
        channel
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_reply_to(queue.as_str().into()),
            )
            .await
            .map_err(|e| format!("publishing to `{exchange}`: {e}"))?;
        Ok::<_, String>((channel, consumer))
    };
    let (channel, mut consumer) = match tokio::time::timeout(Duration::from_secs(30), asked).await {
        Ok(Ok(asked)) => asked,
        Ok(Err(error)) => {
            eprintln!("amqp-tasks: {error}");
            return EXIT_CONNECTION;
        }
        Err(_) => {
            eprintln!("amqp-tasks: the broker did not answer in time");
            return EXIT_TIMEOUT;
        }
    };
    let mut answers = 0;
    let until = tokio::time::Instant::now() + timeout;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout_at(until, crate::transport::next(&mut consumer)).await
    {
        answers += 1;
        println!("{}", String::from_utf8_lossy(&delivery.data));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "done".into())).await;
    if answers == 0 {
        eprintln!("amqp-tasks: no worker answered within {timeout:?}");
        EXIT_TIMEOUT
    } else {
        EXIT_OK
    }
}

/// Prints events until interrupted (0) or the connection drops (4).
async fn events(client: &Client, task: Option<&str>) -> u8 {
    use lapin::options::QueueBindOptions;
    use lapin::types::FieldTable;
    let exchange = crate::protocol::topology::events_exchange(client.namespace());
    let listening = async {
        let session = client.session().await.map_err(|e| e.to_string())?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        crate::transport::topology::declare_events(&channel, &exchange)
            .await
            .map_err(|e| format!("declaring `{exchange}`: {e}"))?;
        let listener = format!("{exchange}.listener");
        let queue = crate::transport::topology::declare_private_queue(&channel, &listener)
            .await
            .map_err(|e| format!("declaring `{listener}.*`: {e}"))?;
        let keys = match task {
            // A task name may contain dots: `*` is the event, the rest the name.
            Some(task) => vec![format!("task.*.{task}")],
            None => vec!["task.#".to_owned(), "worker.#".to_owned()],
        };
        for key in keys {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("binding `{queue}`: {e}"))?;
        }
        let consumer = crate::transport::consume_no_ack(&channel, &queue)
            .await
            .map_err(|e| format!("consuming `{queue}`: {e}"))?;
        Ok::<_, String>((channel, consumer))
    };
    let (channel, mut consumer) =
        match tokio::time::timeout(Duration::from_secs(30), listening).await {
            Ok(Ok(listening)) => listening,
            Ok(Err(error)) => {
                eprintln!("amqp-tasks: {error}");
                return EXIT_CONNECTION;
            }
            Err(_) => {
                eprintln!("amqp-tasks: the broker did not answer in time");
                return EXIT_TIMEOUT;
            }
        };
    eprintln!("amqp-tasks: listening for events on `{exchange}` (Ctrl-C to stop)");
    let code = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break EXIT_OK,
            delivery = crate::transport::next(&mut consumer) => match delivery {
                Some(Ok(delivery)) => println!("{}", String::from_utf8_lossy(&delivery.data)),
                _ => {
                    eprintln!("amqp-tasks: the connection to the broker was lost");
                    break EXIT_CONNECTION;
                }
            },
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "done".into())).await;
    code
}

fn parse_arguments(text: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(text) {
        Ok(object @ serde_json::Value::Object(_)) => Ok(object),
        Ok(_) => Err(format!(
            "the arguments must be a JSON object keyed by parameter name, like '{{\"a\": 1}}', not `{text}`"
        )),
        Err(error) => Err(format!(
            "the arguments are not valid JSON ({error}): `{text}`"
        )),
    }
}

/// Prints the outcome and returns the exit code.
fn report<E: serde::Serialize + std::fmt::Display>(outcome: Result<String, CallError<E>>) -> u8 {
    let error = match outcome {
        Ok(text) => {
            println!("{text}");
            return EXIT_OK;
        }
        Err(error) => error,
    };
    let code = exit_code(&error);
    match &error {
        CallError::Task(failure) => eprintln!("amqp-tasks: the task failed: {failure}"),
        CallError::Remote { kind, message } => {
            eprintln!("amqp-tasks: the task failed: {kind}: {message}")
        }
        other => eprintln!("amqp-tasks: {}: {other}", other.kind()),
    }
    code
}

fn exit_code<E>(error: &CallError<E>) -> u8 {
    match error {
        CallError::Task(_) | CallError::Remote { .. } => EXIT_TASK_ERROR,
        CallError::Timeout => EXIT_TIMEOUT,
        CallError::ConnectionLost(_) => EXIT_CONNECTION,
        _ => EXIT_FAILED,
    }
}

async fn queues(client: &Client, tasks: &[String], json: bool) -> u8 {
    let mut rows = Vec::new();
    let mut code = EXIT_OK;
    for task in tasks {
        match client.queue_status(task).await {
            Ok(status) => {
                if status.is_none() {
                    code = EXIT_FAILED;
                }
                rows.push((client.queue_name(task), status));
            }
            Err(error) => {
                eprintln!("amqp-tasks: {error}");
                return match error {
                    Error::Connect { .. } => EXIT_CONNECTION,
                    _ => EXIT_FAILED,
                };
            }
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|(queue, status)| match status {
                Some(s) => serde_json::json!({"queue": queue, "exists": true, "ready": s.ready,
                    "consumers": s.consumers, "dead_letters": s.dead_letters}),
                None => serde_json::json!({"queue": queue, "exists": false}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        let width = rows
            .iter()
            .map(|(queue, _)| queue.len())
            .max()
            .unwrap_or(0)
            .max("QUEUE".len());
        println!(
            "{:<width$}  {:>9}  {:>9}  {:>12}",
            "QUEUE", "READY", "CONSUMERS", "DEAD LETTERS"
        );
        for (queue, status) in &rows {
            match status {
                Some(s) => println!(
                    "{queue:<width$}  {:>9}  {:>9}  {:>12}",
                    s.ready,
                    s.consumers,
                    s.dead_letters
                        .map_or_else(|| "-".to_owned(), |n| n.to_string())
                ),
                None => println!("{queue:<width$}  (no such queue)"),
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn arguments_must_be_a_json_object() {
        assert_eq!(
            parse_arguments(r#"{"a": 1}"#),
            Ok(serde_json::json!({"a": 1}))
        );
        assert!(
            parse_arguments("[1, 2]")
                .unwrap_err()
                .contains("JSON object")
        );
        assert!(
            parse_arguments("{a: 1}")
                .unwrap_err()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn exit_codes_tell_failures_apart() {
        let codes: Vec<u8> = [
            CallError::Task(serde_json::json!("ByZero")),
            CallError::Remote {
                kind: "ValueError".into(),
                message: "ValueError('x')".into(),
            },
            CallError::Timeout,
            CallError::ConnectionLost("gone".into()),
            CallError::NoRoute { queue: "q".into() },
            CallError::BadPayload("json: missing argument `b`".into()),
        ]
        .iter()
        .map(exit_code)
        .collect();
        assert_eq!(codes, [1, 1, 3, 4, 5, 5]);
    }
}
