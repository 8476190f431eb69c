//! Run with: cargo run --release -p amqp-tasks-bench -- all
//!
//! amqp-tasks against raw lapin, side by side in one run against the broker at `AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`): `delay`, `call-1`, `call-64`, `memory`,
//! `scale` or `all`; `--smoke` for a quick check that it still works (tiny N, one repetition, no
//! targets). `peers` (not part of `all`) runs amqp-tasks next to Celery 5, the Rust `celery`
//! crate and aio-pika, which it installs or builds on first use. See BENCHMARKS.md.

use amqp_tasks_bench::peers::{self, PeerKind};
use amqp_tasks_bench::raw::{self, Confirm, Dispatch, Wire};
use amqp_tasks_bench::scenarios::{self, Only, Options, Scenario};
use amqp_tasks_bench::{ROLE_ENV, chart};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// amqp-tasks against raw lapin, side by side in one run.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Cli {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Tasks (or calls) per repetition [default: 20000 for delay and scale, 5000 for call-1,
    /// 20000 for call-64, 100000 for memory; peers: 10000 fire-and-forget tasks, N/10
    /// sequential calls, N/2 calls with 64 in flight].
    #[arg(long)]
    n: Option<usize>,
    /// Repetitions; the two sides alternate, medians and min..max are reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Tiny N, one repetition, no targets judged: checks that the bench still works.
    #[arg(long)]
    smoke: bool,
    /// Publisher confirms in flight when sending many tasks (both sides).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// The framework worker's --concurrency.
    #[arg(long, default_value_t = amqp_tasks::worker::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Prefetch of both sides' consumers (the framework's default is its concurrency).
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// How the raw worker runs a delivery: a task each (as amqp-tasks does) or inline.
    #[arg(long, value_enum, default_value_t = Dispatch::Spawn)]
    raw_dispatch: Dispatch,
    /// What the raw side sends besides the body: what it needs (minimal), or amqp-tasks'
    /// properties and headers too (framework), to tell the wire format's cost from the code's.
    #[arg(long, value_enum, default_value_t = Wire::Minimal)]
    raw_wire: Wire,
    /// When the confirmed raw RPC client looks at a request's confirm: before awaiting the reply
    /// (await), or racing the reply against it as amqp-tasks does (race).
    #[arg(long, value_enum, default_value_t = Confirm::Await)]
    raw_confirm: Confirm,
    /// Run one side only (for profiling it).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// The peers of `peers`, in the order they run in each repetition (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PeerKind::ALL)]
    peers: Vec<PeerKind>,
    /// A note for the chart's subtitle and the run's first line (e.g. "preliminary: a loaded
    /// machine").
    #[arg(long)]
    note: Option<String>,
    /// Write the chart of the run to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Broker URL.
    #[arg(long, env = "AMQP_URL", default_value = amqp_tasks::DEFAULT_URL, hide_env_values = true)]
    url: String,
}

fn main() -> ExitCode {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("worker") => return amqp_tasks::worker::main(),
        Ok("raw-worker") => return raw::worker_main(),
        _ => {}
    }
    let cli = Cli::parse();
    let options = Options {
        url: cli.url.clone(),
        n: cli.n,
        reps: cli.reps,
        smoke: cli.smoke,
        window: cli.window.max(1),
        concurrency: cli.concurrency.max(1),
        prefetch: cli.prefetch.max(1),
        dispatch: cli.raw_dispatch,
        wire: cli.raw_wire,
        confirm: cli.raw_confirm,
        only: cli.only,
        peers: cli.peers.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let load_at_start = scenarios::load_average();
    println!(
        "amqp-tasks-bench {}: {:?}{}; machine {}; load average {load_at_start}; reps {}{}",
        env!("CARGO_PKG_VERSION"),
        cli.scenario,
        if cli.smoke { " (smoke)" } else { "" },
        scenarios::machine(),
        if cli.smoke { 1 } else { cli.reps },
        cli.note
            .as_ref()
            .map_or_else(String::new, |note| format!("; {note}"))
    );
    if cfg!(debug_assertions) && !cli.smoke {
        println!("warning: a debug build; measure with --release");
    }
    let outcome = runtime.block_on(scenarios::run(&options, &cli.scenario.expand()));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            eprintln!("bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "\n=== summary (load average now {})\n",
        scenarios::load_average()
    );
    if !outcome.reports.is_empty() {
        print!("{}", scenarios::table(&outcome.reports));
    }
    for report in &outcome.reports {
        println!("{}", report.result_line());
    }
    if !outcome.peers.is_empty() {
        print!("{}", peers::table(&outcome.peers));
    }
    for row in &outcome.peers {
        println!("{}", row.result_line());
    }
    if let Some(path) = &cli.svg {
        let subtitle = format!(
            "{}{}, RabbitMQ on loopback; medians of {} reps, whiskers min..max\nload average {load_at_start} at the start, {} at the end",
            cli.note
                .as_ref()
                .map_or_else(String::new, |note| format!("{note}\n")),
            scenarios::machine(),
            if cli.smoke { 1 } else { cli.reps },
            scenarios::load_average()
        );
        let svg = if outcome.peers.is_empty() {
            chart::svg(
                "amqp-tasks vs raw lapin, same run",
                &subtitle,
                &outcome.bars,
            )
        } else {
            let labels: Vec<String> = outcome.peers.iter().map(|row| row.kind.legend()).collect();
            let series: Vec<&str> = labels.iter().map(String::as_str).collect();
            chart::grouped_svg(
                "amqp-tasks and its peers, same run (guarantees differ: see BENCHMARKS.md)",
                &subtitle,
                &series,
                &peers::chart_groups(&outcome.peers),
            )
        };
        if let Err(error) = std::fs::write(path, svg) {
            eprintln!("bench: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("chart written to {}", path.display());
    }
    ExitCode::SUCCESS
}
