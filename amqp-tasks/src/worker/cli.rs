//! The `worker` binary's command line: `fn main() -> ExitCode { amqp_tasks::worker::main() }`
//! (behind the default feature `cli`).

use super::{Worker, WorkerBuilder, registry};
use crate::client::{Client, DEFAULT_URL};
use crate::protocol::duration::{self, human};
use crate::protocol::topology::{self, QueueType};
use clap::Parser;
use std::future::Future;
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
    /// Result store for task states and results (redis://host:port/db, postgres://user@host/db).
    #[arg(
        long,
        global = true,
        env = "AMQP_TASKS_RESULTS",
        hide_env_values = true
    )]
    results: Option<String>,
    /// How long task states and results are kept in the result store.
    #[arg(long, env = "AMQP_TASKS_RESULT_TTL", default_value = "24h", value_parser = parse_duration)]
    result_ttl: Duration,
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
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464) [default: off].
    #[cfg(feature = "metrics")]
    #[arg(long, env = "AMQP_TASKS_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Publish task and worker events (JSON) to the topic exchange `amqp-tasks.events`.
    #[arg(long, env = "AMQP_TASKS_EVENTS")]
    events: bool,
    /// Worker threads of the runtime [default: one per core].
    #[arg(long, env = "AMQP_TASKS_THREADS")]
    threads: Option<usize>,
    /// Be a candidate scheduler of the periodic tasks served (one active among all candidates).
    #[arg(long, env = "AMQP_TASKS_BEAT", value_parser = clap::builder::FalseyValueParser::new())]
    beat: bool,
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
///
/// For tasks that take `State` parameters, use [`main_with`].
pub fn main() -> ExitCode {
    main_with(|worker| async move { Ok(worker) })
}

/// What the set-up closure of [`main_with`] returns.
pub type SetupResult = Result<WorkerBuilder, Box<dyn std::error::Error + Send + Sync>>;

/// [`main`] with an async set-up: it receives the worker's builder, configured from the command
/// line and connected, and returns it with what the tasks need (their
/// [`state`](WorkerBuilder::state)s). Same flags and environment as `main`; `--help`, `--list`
/// and the administrative commands (`dlq`, `declare`) do not run it. An error it returns is
/// printed, and the process exits with 1.
///
/// ```no_run
/// # struct Db; impl Db { async fn connect() -> Result<Db, std::io::Error> { Ok(Db) } }
/// fn main() -> std::process::ExitCode {
///     amqp_tasks::worker::main_with(|worker| async move {
///         Ok(worker.state(Db::connect().await?))
///     })
/// }
/// ```
pub fn main_with<F, Fut>(setup: F) -> ExitCode
where
    F: FnOnce(WorkerBuilder) -> Fut,
    Fut: Future<Output = SetupResult>,
{
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
            .results(cli.results.clone().unwrap_or_default())
            .result_ttl(cli.result_ttl)
            .connect()
            .await?;
        let mut builder = Worker::builder(client.clone())
            .concurrency(cli.concurrency)
            .grace_period(cli.grace)
            .queue_type(cli.queue_type)
            .max_body_size(cli.max_body_size)
            .max_redeliveries(cli.max_redeliveries)
            .beat(cli.beat)
            .events(cli.events);
        if let Some(prefetch) = cli.prefetch {
            builder = builder.prefetch(prefetch);
        }
        #[cfg(feature = "metrics")]
        if let Some(addr) = cli.metrics_addr {
            builder = builder.metrics_addr(addr);
        }
        if let Some(filter) = filter {
            builder = builder.tasks(filter);
        }
        let builder = match setup(builder).await {
            Ok(builder) => builder,
            Err(error) => {
                client.close().await;
                return Err(crate::Error::Setup(error));
            }
        };
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
    // With `--results`, connecting creates the store's table (PostgreSQL) if it does not exist.
    let client = Client::builder(cli.url.clone())
        .namespace(cli.namespace.clone())
        .results(cli.results.clone().unwrap_or_default())
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
            let letters = super::dlq::list(&client, &queue, *limit).await?;
            println!(
                "{} dead letter(s) in {}",
                letters.len(),
                topology::dead_letter_queue(&queue)
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
            let replayed = super::dlq::replay(&client, &queue, id.as_deref(), *limit).await?;
            println!("replayed {replayed} message(s) into {queue}");
            Ok(())
        }
        Command::Declare => {
            let mut builder = Worker::builder(client.clone()).queue_type(cli.queue_type);
            if let Some(tasks) = &cli.tasks {
                builder = builder.tasks(tasks.iter().filter(|t| !t.is_empty()).cloned());
            }
            let queues = builder.build_for_declare()?.declare().await?;
            for queue in queues {
                println!(
                    "declared {queue} and {}",
                    topology::dead_letter_queue(&queue)
                );
            }
            println!("declared the delay queues of namespace `{}`", cli.namespace);
            if let Some(results) = client.results() {
                println!("result store {} ready", results.url());
            }
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
            topology::queue_name(namespace, task.queue()),
            human(task.timeout()),
            task.retries(),
            task.signature().fingerprint()
        );
        if !task.states().is_empty() {
            let states: Vec<String> = task
                .states()
                .iter()
                .map(|state| format!("State<{}>", state.name))
                .collect();
            println!("    takes: {}", states.join(", "));
        }
        if let Some(schedule) = task.schedule() {
            println!("    schedule: {schedule}  next: {}", next_due(&schedule));
        }
        println!("    defined in {}", task.location());
    }
}

/// When a schedule next ticks, in UTC, or why it cannot.
fn next_due(schedule: &crate::schedule::Schedule) -> String {
    let now = crate::protocol::unix_ms(std::time::SystemTime::now());
    match schedule.plan() {
        Ok(plan) => plan
            .next_after(now)
            .and_then(|ms| chrono::DateTime::from_timestamp_millis(i64::try_from(ms).ok()?))
            .map_or_else(
                || "never".to_owned(),
                |at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
        Err(error) => format!("none ({error})"),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .fmt_fields(super::log_fields::LogFields)
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

/// A command-line duration: `500ms`, `30s`, `2m`, `1h 30m`, or a bare number of seconds (the
/// syntax of `#[task(timeout = ...)]` too).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    duration::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
