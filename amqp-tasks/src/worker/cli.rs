//! The `worker` binary's command line: `fn main() -> ExitCode { amqp_tasks::worker::main() }`.

use super::Worker;
use crate::client::{Client, DEFAULT_URL};
use crate::registry;
use crate::topology::QueueType;
use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

/// Serves the amqp-tasks tasks linked into this binary.
#[derive(Parser, Debug)]
#[command(version, about = "Serves the amqp-tasks tasks linked into this binary", long_about = None)]
struct Cli {
    /// Broker URL (amqp://user:password@host:port/vhost).
    #[arg(long, global = true, env = "AMQP_URL", default_value = DEFAULT_URL, hide_default_value = true, hide_env_values = true)]
    url: String,
    /// Prefix of every queue name (`<namespace>.<queue>`), to keep environments apart.
    #[arg(long, global = true, env = "AMQP_TASKS_NAMESPACE", default_value = "")]
    namespace: String,
    /// Tasks running at once in the whole process, across all queues.
    #[arg(long, short = 'c', env = "AMQP_TASKS_CONCURRENCY", default_value_t = super::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Unacked deliveries per queue consumer [default: concurrency, at most 256].
    #[arg(long, env = "AMQP_TASKS_PREFETCH")]
    prefetch: Option<u16>,
    /// Serve only these tasks (comma-separated names) [default: all].
    #[arg(long, env = "AMQP_TASKS_TASKS", value_delimiter = ',')]
    tasks: Option<Vec<String>>,
    /// How long tasks in flight may take to finish after SIGINT/SIGTERM.
    #[arg(long, env = "AMQP_TASKS_GRACE", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// Queue type of the task queues it declares: classic or quorum.
    #[arg(long, env = "AMQP_TASKS_QUEUE_TYPE", default_value = "classic")]
    queue_type: QueueType,
    /// Larger message bodies are refused and dead-lettered (bytes).
    #[arg(long, env = "AMQP_TASKS_MAX_BODY_SIZE", default_value_t = super::DEFAULT_MAX_BODY)]
    max_body_size: usize,
    /// Redeliveries of a message (its worker died running it) before it is dead-lettered.
    #[arg(long, env = "AMQP_TASKS_MAX_REDELIVERIES", default_value_t = super::DEFAULT_MAX_REDELIVERIES)]
    max_redeliveries: u32,
    /// Worker threads of the runtime [default: one per core].
    #[arg(long, env = "AMQP_TASKS_THREADS")]
    threads: Option<usize>,
    /// Print every task of this binary with its arguments and queue, then exit.
    #[arg(long)]
    list: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Dead letters of a task: list them, replay them.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Declare the queues of the served tasks (and the delay queues), then exit.
    Declare,
}

#[derive(clap::Subcommand, Debug)]
enum DlqAction {
    /// List a task's dead-lettered messages with their reasons (they stay where they are).
    List {
        /// The task name.
        task: String,
        /// List at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move a task's dead letters back into its queue: same task id, attempt count reset, no
    /// reply expected.
    Replay {
        /// The task name.
        task: String,
        /// Replay only the message with this task id.
        #[arg(long)]
        id: Option<String>,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

/// Runs the worker binary: parses the command line (and `AMQP_*` environment variables), logs
/// through `tracing` (`RUST_LOG`, default `info`) to stderr, serves until SIGINT or SIGTERM, and
/// drains. Exit codes: 0 after a clean drain, 1 on a configuration or broker error, 2 on a
/// command-line error, 3 when the grace period ran out, 130 on a second signal.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    if cli.list {
        print_list(&cli);
        return ExitCode::SUCCESS;
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("worker: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(command) = &cli.command {
        let result = runtime.block_on(admin(&cli, command));
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("worker: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(async {
        // Duplicate names, no tasks and a bad filter are reported before connecting.
        let filter: Option<Vec<String>> = cli
            .tasks
            .as_ref()
            .map(|tasks| tasks.iter().filter(|t| !t.is_empty()).cloned().collect());
        registry::select(&registry::tasks(), filter.as_deref())?;
        let client = Client::builder(cli.url.clone())
            .namespace(cli.namespace.clone())
            .connect()
            .await?;
        let mut builder = Worker::builder(client.clone())
            .concurrency(cli.concurrency)
            .grace_period(cli.grace)
            .queue_type(cli.queue_type)
            .max_body_size(cli.max_body_size)
            .max_redeliveries(cli.max_redeliveries);
        if let Some(prefetch) = cli.prefetch {
            builder = builder.prefetch(prefetch);
        }
        if let Some(filter) = filter {
            builder = builder.tasks(filter);
        }
        let served = builder.serve(shutdown_signal()).await;
        client.close().await;
        served
    });
    // lapin's I/O thread ends with its connection; do not wait on anything else left behind.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ crate::Error::GraceExpired(..)) => {
            eprintln!("worker: {error}");
            ExitCode::from(3)
        }
        Err(error) => {
            eprintln!("worker: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that administer rather than serve.
async fn admin(cli: &Cli, command: &Command) -> Result<(), crate::Error> {
    let client = Client::builder(cli.url.clone())
        .namespace(cli.namespace.clone())
        .connect()
        .await?;
    let queue_of = |name: &str| -> Result<String, crate::Error> {
        let task = registry::tasks()
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                crate::Error::Config(format!("no task named `{name}` in this binary"))
            })?;
        Ok(client.queue_name(task.queue()))
    };
    let result = match command {
        Command::Dlq {
            action: DlqAction::List { task, limit },
        } => {
            let queue = queue_of(task)?;
            let letters = super::dead_letters::list(&client, &queue, *limit).await?;
            println!(
                "{} dead letter(s) in {}",
                letters.len(),
                crate::topology::dead_letter_queue(&queue)
            );
            for letter in letters {
                println!("{letter}");
            }
            Ok(())
        }
        Command::Dlq {
            action: DlqAction::Replay { task, id, limit },
        } => {
            let queue = queue_of(task)?;
            let replayed =
                super::dead_letters::replay(&client, &queue, id.as_deref(), *limit).await?;
            println!("replayed {replayed} message(s) into {queue}");
            Ok(())
        }
        Command::Declare => {
            let tasks = registry::select(&registry::tasks(), cli.tasks.as_deref())?;
            let queues = super::declare(&client, &tasks, cli.queue_type).await?;
            for queue in queues {
                println!(
                    "declared {queue} and {}",
                    crate::topology::dead_letter_queue(&queue)
                );
            }
            println!("declared the delay queues of namespace `{}`", cli.namespace);
            Ok(())
        }
    };
    client.close().await;
    result
}

fn print_list(cli: &Cli) {
    let tasks = registry::tasks();
    if tasks.is_empty() {
        println!("no tasks are linked into this binary");
        return;
    }
    let namespace = (!cli.namespace.is_empty()).then_some(cli.namespace.as_str());
    for task in tasks {
        println!("{}", task.describe());
        println!(
            "    queue: {}  timeout: {}  retries: {}  signature: {}",
            crate::topology::queue_name(namespace, task.queue()),
            crate::handler::human(task.timeout()),
            task.retries(),
            task.signature().fingerprint()
        );
        println!("    defined in {}", task.location());
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once (130).
pub(crate) async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown requested: draining (signal again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("worker: second signal; exiting without draining");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 30s, 2m or 1h"))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" | "min" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => None,
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is not a duration such as 500ms, 30s, 2m or 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
