//! The scenarios: each runs the framework and raw lapin against the same broker, interleaved
//! repetition by repetition (so that both sides see the same machine noise), in a queue namespace
//! of its own that is deleted afterwards.

use crate::chart::{Bar, Panel};
use crate::cpu::{self, PerTask};
use crate::procs::{self, Side, WorkerConfig, WorkerGroup};
use crate::raw::{self, Confirm, Dispatch, RawClient, Wire};
use crate::stats::{Better, Report, Stat, percentile_us};
use crate::tasks::{echo, sink};
use crate::{Error, Res};
use amqp_tasks::Client;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A scenario on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// `.delay()` throughput, publish to last task done.
    Delay,
    /// Sequential `.call()` round trips.
    #[value(name = "call-1")]
    Call1,
    /// `.call()` with 64 in flight.
    #[value(name = "call-64")]
    Call64,
    /// Worker RSS idle and after many tasks.
    Memory,
    /// 1, 2 and 4 worker processes on one queue.
    Scale,
    /// amqp-tasks and its peers (Celery 5, the Rust `celery` crate, aio-pika), one after the
    /// other on the same broker; not part of `all` (it installs and builds the peers).
    Peers,
    /// Everything, in this order.
    All,
}

impl Scenario {
    /// The scenarios `self` stands for.
    pub fn expand(self) -> Vec<Scenario> {
        match self {
            Scenario::All => vec![
                Scenario::Delay,
                Scenario::Call1,
                Scenario::Call64,
                Scenario::Memory,
                Scenario::Scale,
            ],
            one => vec![one],
        }
    }
}

/// Which sides to run (both, except when profiling one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// Only amqp-tasks.
    Framework,
    /// Only raw lapin.
    Raw,
}

/// Options of a run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Broker URL.
    pub url: String,
    /// Tasks or calls per repetition (default per scenario).
    pub n: Option<usize>,
    /// Repetitions.
    pub reps: usize,
    /// Tiny N, one repetition, no targets judged.
    pub smoke: bool,
    /// Publisher confirms in flight when sending many tasks.
    pub window: usize,
    /// Framework worker concurrency.
    pub concurrency: usize,
    /// Prefetch of both sides.
    pub prefetch: u16,
    /// How the raw worker runs deliveries.
    pub dispatch: Dispatch,
    /// What the raw side puts in messages.
    pub wire: Wire,
    /// When the confirmed raw RPC client looks at a request's confirm.
    pub confirm: Confirm,
    /// Run one side only (for profiling); no ratios then.
    pub only: Option<Only>,
    /// The peers of the `peers` scenario, in the order they run.
    pub peers: Vec<crate::peers::PeerKind>,
}

const PAYLOAD_BYTES: usize = 64;
const CALL_TIMEOUT: Duration = Duration::from_secs(61);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a run produced.
#[derive(Default)]
pub struct Outcome {
    /// One per scenario (scale: one per worker count).
    pub reports: Vec<Report>,
    /// What the chart shows.
    pub bars: Vec<Bar>,
    /// The `peers` scenario's rows.
    pub peers: Vec<crate::peers::PeerRow>,
}

/// Runs the scenarios, each in a namespace of its own that is deleted afterwards (also on error).
pub async fn run(options: &Options, scenarios: &[Scenario]) -> Res<Outcome> {
    let mut outcome = Outcome::default();
    let log_dir = std::env::temp_dir().join(format!(
        "amqp-tasks-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&log_dir)?;
    for &scenario in scenarios {
        let namespace = format!("bench.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let config = WorkerConfig {
            url: options.url.clone(),
            namespace: namespace.clone(),
            concurrency: options.concurrency,
            prefetch: options.prefetch,
            dispatch: options.dispatch,
            wire: options.wire,
            log_dir: log_dir.clone(),
        };
        println!(
            "\n=== {scenario:?} (namespace {namespace}, load average {})",
            load_average()
        );
        let bench = Bench {
            options: options.clone(),
            config,
            broker: cpu::broker_pid(),
        };
        // A task of its own, so that a panic still reaches the clean-up below.
        let result = tokio::spawn(async move {
            if scenario == Scenario::Peers {
                bench
                    .peers()
                    .await
                    .map(|rows| (Vec::new(), Vec::new(), rows))
            } else {
                let (reports, bars) = bench.scenario(scenario).await?;
                Ok((reports, bars, Vec::new()))
            }
        })
        .await;
        let cleaned = procs::clean_up(&options.url, &namespace).await;
        let (reports, bars, peers) = match result {
            Ok(Ok(done)) => done,
            Ok(Err(error)) => return Err(format!("{scenario:?}: {error}").into()),
            Err(panic) => return Err(format!("{scenario:?} panicked: {panic}").into()),
        };
        cleaned.map_err(|e| format!("cleaning up {namespace}: {e}"))?;
        for report in &reports {
            print_report(report);
        }
        outcome.reports.extend(reports);
        outcome.bars.extend(bars);
        outcome.peers.extend(peers);
    }
    let _ = std::fs::remove_dir_all(&log_dir);
    Ok(outcome)
}

pub(crate) struct Bench {
    pub(crate) options: Options,
    pub(crate) config: WorkerConfig,
    /// The broker's process, when it runs on this machine: its CPU time is reported.
    pub(crate) broker: Option<u32>,
}

/// CPU per task of each repetition of one side.
#[derive(Default)]
struct CpuFigures {
    producer: Vec<f64>,
    worker: Vec<f64>,
    broker: Vec<f64>,
}

impl CpuFigures {
    fn push(&mut self, per_task: PerTask) {
        self.producer.push(per_task.producer);
        self.worker.push(per_task.worker);
        self.broker.extend(per_task.broker);
    }

    /// `RESULT` fields, prefixed with the side.
    fn fields(&self, side: &str) -> Vec<(String, String)> {
        let mut fields = vec![
            (
                format!("{side}_producer_cpu_us_per_task"),
                format!("{:.1}", Stat::of(&self.producer).median),
            ),
            (
                format!("{side}_worker_cpu_us_per_task"),
                format!("{:.1}", Stat::of(&self.worker).median),
            ),
        ];
        if !self.broker.is_empty() {
            fields.push((
                format!("{side}_broker_cpu_us_per_task"),
                format!("{:.1}", Stat::of(&self.broker).median),
            ));
        }
        fields
    }
}

/// One side's producer.
enum Producer {
    Framework(Client),
    /// A raw client and the queue it sends to.
    Raw(Arc<RawClient>, String),
}

/// The workers and producers of a scenario.
pub(crate) struct Sides {
    framework: Option<(WorkerGroup, Client)>,
    raw: Option<(WorkerGroup, Arc<RawClient>)>,
    /// The batched-ack raw consumer; its producer is the raw side's client.
    raw_batched: Option<WorkerGroup>,
    /// The plain raw RPC client (no confirms); it calls the raw side's worker.
    raw_plain: Option<Arc<RawClient>>,
}

impl Sides {
    /// amqp-tasks alone (the `peers` scenario).
    pub(crate) fn framework_only(framework: (WorkerGroup, Client)) -> Sides {
        Sides {
            framework: Some(framework),
            raw: None,
            raw_batched: None,
            raw_plain: None,
        }
    }

    /// RSS of the (first) framework worker.
    pub(crate) fn framework_memory(&self) -> procs::Memory {
        self.framework
            .as_ref()
            .map(|(group, _)| group.memory()[0])
            .unwrap_or_default()
    }

    pub(crate) async fn close(self) -> Res<()> {
        let mut errors = Vec::new();
        if let Some((group, client)) = self.framework {
            client.close().await;
            errors.extend(group.stop().err());
        }
        if let Some(client) = self.raw_plain {
            client.close().await;
        }
        if let Some(group) = self.raw_batched {
            errors.extend(group.stop().err());
        }
        if let Some((group, client)) = self.raw {
            client.close().await;
            errors.extend(group.stop().err());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
                .into())
        }
    }
}

/// The baselines with fewer guarantees that a scenario runs besides raw lapin.
#[derive(Clone, Copy, Debug, Default)]
struct Extras {
    /// The batched-ack raw consumer (`delay`).
    batched: bool,
    /// The plain raw RPC client (calls).
    plain: bool,
}

/// Who makes the calls of a call round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// amqp-tasks: `in_flight` spawned tasks, each looping over `.call()`.
    Framework,
    /// amqp-tasks: every call driven from one task (`buffer_unordered(in_flight)`).
    FrameworkOneTask,
    /// Raw lapin with the same guarantees: `in_flight` spawned tasks.
    Raw,
    /// The plain raw lapin RPC client (no confirms): `in_flight` spawned tasks.
    RawPlain,
}

impl Caller {
    fn label(self) -> &'static str {
        match self {
            Caller::Framework => "amqp-tasks",
            Caller::FrameworkOneTask => "amqp-tasks, one task",
            Caller::Raw => "raw lapin",
            Caller::RawPlain => "raw plain",
        }
    }
}

/// The figures of one side over the repetitions of a delay scenario.
#[derive(Default)]
struct DelayFigures {
    rate: Vec<f64>,
    publish: Vec<f64>,
    cpu: CpuFigures,
}

/// The figures of one caller over the repetitions of a call scenario.
#[derive(Default)]
struct CallFigures {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: CpuFigures,
}

const PLAIN_SETTINGS: &str = "; baseline: the plain raw lapin RPC client: the same requests on a channel NOT in confirm mode (one publish, one reply), one exclusive client-named reply queue (no_ack), correlation ids; the same raw worker";

impl Bench {
    pub(crate) fn n(&self, default: usize, smoke: usize) -> usize {
        self.options
            .n
            .unwrap_or(if self.options.smoke { smoke } else { default })
            .max(1)
    }

    pub(crate) fn reps(&self) -> usize {
        if self.options.smoke {
            1
        } else {
            self.options.reps.max(1)
        }
    }

    fn wants(&self, side: Side) -> bool {
        matches!(
            (self.options.only, side),
            (None, _)
                | (Some(Only::Framework), Side::Framework)
                | (Some(Only::Raw), Side::Raw | Side::RawBatched)
        )
    }

    fn wants_caller(&self, caller: Caller) -> bool {
        self.wants(match caller {
            Caller::Framework | Caller::FrameworkOneTask => Side::Framework,
            Caller::Raw | Caller::RawPlain => Side::Raw,
        })
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.config.namespace
    }

    pub(crate) fn sink_queue(&self, side: Side) -> String {
        match side {
            Side::Framework => format!("{}.bench.sink", self.namespace()),
            Side::Raw => raw::sink_queue(self.namespace()),
            Side::RawBatched => raw::batched_queue(self.namespace()),
        }
    }

    pub(crate) fn echo_queue(&self, side: Side) -> String {
        match side {
            Side::Framework => format!("{}.bench.echo", self.namespace()),
            Side::Raw | Side::RawBatched => raw::echo_queue(self.namespace()),
        }
    }

    fn settings(&self, extra: &str) -> String {
        format!(
            "durable classic queue, publisher confirms, mandatory, 64-byte payload (bincode), \
             prefetch {}, manual acks: contiguous runs with one multiple=true ack (acker task per \
             channel); framework concurrency {}; raw worker dispatch {}, raw wire format {}{extra}",
            self.options.prefetch,
            self.options.concurrency,
            self.options.dispatch.as_str(),
            self.options.wire.as_str()
        )
    }

    /// Starts `count` framework worker processes and a client; returns once the workers consume
    /// every queue in `ready`.
    pub(crate) async fn start_framework(
        &self,
        count: usize,
        ready: &[String],
    ) -> Res<(WorkerGroup, Client)> {
        let limit = Duration::from_secs(60);
        let group = WorkerGroup::start(Side::Framework, count, &self.config)?;
        for queue in ready {
            group.wait_ready(&self.config.url, queue, limit).await?;
        }
        let client = Client::builder(self.config.url.clone())
            .namespace(self.namespace())
            .connection_name("amqp-tasks-bench")
            .confirm_timeout(CONFIRM_TIMEOUT)
            .connect()
            .await?;
        Ok((group, client))
    }

    /// Starts `count` worker processes per wanted side and a producer per side, and the extra
    /// baselines asked for.
    async fn start(
        &self,
        count: usize,
        ready_queue: fn(&Bench, Side) -> String,
        extras: Extras,
    ) -> Res<Sides> {
        let mut sides = Sides {
            framework: None,
            raw: None,
            raw_batched: None,
            raw_plain: None,
        };
        let limit = Duration::from_secs(60);
        if self.wants(Side::Framework) {
            sides.framework = Some(
                self.start_framework(count, &[ready_queue(self, Side::Framework)])
                    .await?,
            );
        }
        if self.wants(Side::Raw) {
            let group = WorkerGroup::start(Side::Raw, count, &self.config)?;
            group
                .wait_ready(&self.config.url, &ready_queue(self, Side::Raw), limit)
                .await?;
            let client = RawClient::connect(
                &self.config.url,
                self.namespace(),
                self.options.wire,
                self.options.confirm,
            )
            .await?;
            sides.raw = Some((group, Arc::new(client)));
            if extras.batched {
                let group = WorkerGroup::start(Side::RawBatched, count, &self.config)?;
                group
                    .wait_ready(&self.config.url, &self.sink_queue(Side::RawBatched), limit)
                    .await?;
                sides.raw_batched = Some(group);
            }
            if extras.plain {
                let client =
                    RawClient::connect_plain(&self.config.url, self.namespace(), self.options.wire)
                        .await?;
                sides.raw_plain = Some(Arc::new(client));
            }
        }
        Ok(sides)
    }

    async fn scenario(&self, scenario: Scenario) -> Res<(Vec<Report>, Vec<Bar>)> {
        match scenario {
            Scenario::Delay => {
                let n = self.n(20_000, 300);
                let extras = Extras {
                    batched: true,
                    ..Extras::default()
                };
                let sides = self.start(1, Bench::sink_queue, extras).await?;
                let result = self.throughput(&sides, "delay", n).await;
                sides.close().await?;
                result
            }
            Scenario::Call1 => self.calls("call-1", 1, self.n(5_000, 50)).await,
            Scenario::Call64 => self.calls("call-64", 64, self.n(20_000, 256)).await,
            Scenario::Memory => self.memory(self.n(100_000, 2_000)).await,
            Scenario::Scale => {
                let n = self.n(20_000, 300);
                let mut reports = Vec::new();
                let mut bars = Vec::new();
                for workers in [1, 2, 4] {
                    println!("--- {workers} worker process(es) per side");
                    let sides = self
                        .start(workers, Bench::sink_queue, Extras::default())
                        .await?;
                    let result = self
                        .throughput(&sides, &format!("scale-{workers}"), n)
                        .await;
                    sides.close().await?;
                    let (report, bar) = result?;
                    reports.extend(report);
                    bars.extend(bar);
                }
                Ok((reports, bars))
            }
            Scenario::Peers => unreachable!("run on its own"),
            Scenario::All => unreachable!("expanded before"),
        }
    }

    /// Sends `n` tasks and waits until the workers ran them all; tasks per second.
    pub(crate) async fn one_delay_round(
        &self,
        sides: &Sides,
        side: Side,
        n: usize,
    ) -> Res<(f64, f64, PerTask)> {
        let payload = vec![0xA5u8; PAYLOAD_BYTES];
        let (group, producer) = match side {
            Side::Framework => {
                let (group, client) = sides.framework.as_ref().expect("framework side");
                (group, Producer::Framework(client.clone()))
            }
            Side::Raw => {
                let (group, client) = sides.raw.as_ref().expect("raw side");
                (group, Producer::Raw(client.clone(), self.sink_queue(side)))
            }
            Side::RawBatched => {
                let group = sides.raw_batched.as_ref().expect("batched side");
                let (_, client) = sides.raw.as_ref().expect("raw side");
                (group, Producer::Raw(client.clone(), self.sink_queue(side)))
            }
        };
        let target = group.total() + n as u64;
        let limit = Duration::from_secs(60) + Duration::from_millis(n as u64);
        let pids = group.pids();
        let before = cpu::Sample::take(&pids, self.broker);
        let start = Instant::now();
        match producer {
            Producer::Framework(client) => {
                delay_framework(&client, n, self.options.window, &payload).await?;
            }
            Producer::Raw(client, queue) => {
                client
                    .delay_many(&queue, n, self.options.window, &payload, CONFIRM_TIMEOUT)
                    .await?;
            }
        }
        let published = start.elapsed();
        group.wait_total(target, limit).await?;
        let elapsed = start.elapsed();
        let per_task = cpu::Sample::take(&pids, self.broker).per_task_since(&before, n);
        Ok((
            n as f64 / elapsed.as_secs_f64(),
            n as f64 / published.as_secs_f64(),
            per_task,
        ))
    }

    /// The delay rounds of every side present, interleaved; a report (and a bar) for amqp-tasks
    /// against raw lapin, and one against the batched-ack consumer when it runs.
    async fn throughput(
        &self,
        sides: &Sides,
        name: &str,
        n: usize,
    ) -> Res<(Vec<Report>, Vec<Bar>)> {
        let mut present = Vec::new();
        if sides.framework.is_some() {
            present.push(Side::Framework);
        }
        if sides.raw.is_some() {
            present.push(Side::Raw);
        }
        if sides.raw_batched.is_some() {
            present.push(Side::RawBatched);
        }
        let warm_up = (n / 5).clamp(1, 2_000);
        for &side in &present {
            self.one_delay_round(sides, side, warm_up).await?;
        }
        let mut figures: [DelayFigures; 3] = Default::default();
        let index = |side: Side| match side {
            Side::Framework => 0,
            Side::Raw => 1,
            Side::RawBatched => 2,
        };
        for rep in 0..self.reps() {
            let mut line = format!("rep {}:", rep + 1);
            for &side in &present {
                let (rate, publish_rate, per_task) = self.one_delay_round(sides, side, n).await?;
                line.push_str(&format!(
                    "\n  {:<11} {rate:>6.0} tasks/s (all confirmed at {publish_rate:.0}/s); {}",
                    side.label(),
                    per_task.show()
                ));
                let figures = &mut figures[index(side)];
                figures.rate.push(rate);
                figures.publish.push(publish_rate);
                figures.cpu.push(per_task);
            }
            println!("{line}");
        }
        let workers = sides.framework.as_ref().map_or_else(
            || sides.raw.as_ref().map_or(0, |s| s.0.pids().len()),
            |s| s.0.pids().len(),
        );
        let [framework, baseline, batched] = &figures;
        let report = |scenario: &str, metric: String, baseline: &DelayFigures, extra: &str| {
            let mut fields = vec![
                ("n".into(), n.to_string()),
                ("reps".into(), self.reps().to_string()),
                ("workers".into(), workers.to_string()),
                ("window".into(), self.options.window.to_string()),
                (
                    "framework_send_rate".into(),
                    crate::stats::number(Stat::of(&framework.publish).median),
                ),
                (
                    "baseline_send_rate".into(),
                    crate::stats::number(Stat::of(&baseline.publish).median),
                ),
            ];
            fields.extend(framework.cpu.fields("framework"));
            fields.extend(baseline.cpu.fields("baseline"));
            Report {
                scenario: scenario.to_owned(),
                metric,
                unit: "tasks/s",
                better: Better::Higher,
                framework: Stat::of(&framework.rate),
                baseline: Stat::of(&baseline.rate),
                paired_ratio: paired(&framework.rate, &baseline.rate),
                extra: fields,
                verdict: None,
                settings: self.settings(&format!(
                    "; persistent (delivery_mode 2); {} confirms in flight; end = the worker(s) \
                     reported the n-th finished task{extra}",
                    self.options.window
                )),
            }
        };
        let main = report(
            name,
            format!("end-to-end tasks/s ({n} tasks, {workers} worker process(es) per side)"),
            baseline,
            "",
        );
        let main = self.judge(main, |r| {
            (name == "delay").then(|| ("framework ≥ 1.0× raw".to_owned(), r.ratio() >= 1.0))
        });
        let mut bars = vec![Bar {
            panel: Panel::Throughput,
            label: name.to_owned(),
            framework: main.framework,
            baseline: main.baseline,
        }];
        let mut reports = vec![main];
        if sides.raw_batched.is_some() {
            let scenario = format!("{name}-batched-ack");
            let batched = report(
                &scenario,
                format!(
                    "end-to-end tasks/s ({n} tasks) vs raw lapin acking every {} deliveries \
                     (multiple=true)",
                    raw::BATCH_ACK
                ),
                batched,
                &format!(
                    "; baseline: the batched-ack raw consumer: deliveries run inline, one \
                     basic.ack multiple=true every {} deliveries and after {} ms without one \
                     (the ceiling with full guarantees)",
                    raw::BATCH_ACK,
                    raw::BATCH_IDLE.as_millis()
                ),
            );
            let batched = self.judge(batched, |r| {
                Some((
                    format!("framework ≥ 0.85× raw acking every {}", raw::BATCH_ACK),
                    r.ratio() >= 0.85,
                ))
            });
            bars.push(Bar {
                panel: Panel::Throughput,
                label: scenario,
                framework: batched.framework,
                baseline: batched.baseline,
            });
            reports.push(batched);
        }
        Ok((reports, bars))
    }

    async fn calls(&self, name: &str, in_flight: usize, n: usize) -> Res<(Vec<Report>, Vec<Bar>)> {
        let extras = Extras {
            plain: true,
            ..Extras::default()
        };
        let sides = self.start(1, Bench::echo_queue, extras).await?;
        let result = self.call_reps(&sides, name, in_flight, n).await;
        sides.close().await?;
        result
    }

    /// `n` calls by `caller` with `in_flight` of them at once: calls per second, the sorted
    /// latencies and the CPU per call.
    pub(crate) async fn one_call_round(
        &self,
        sides: &Sides,
        caller: Caller,
        in_flight: usize,
        n: usize,
    ) -> Res<(f64, Vec<std::time::Duration>, PerTask)> {
        let payload = vec![0xA5u8; PAYLOAD_BYTES];
        let mut loops = JoinSet::new();
        let pids = match caller {
            Caller::Framework | Caller::FrameworkOneTask => {
                sides.framework.as_ref().expect("framework").0.pids()
            }
            Caller::Raw | Caller::RawPlain => sides.raw.as_ref().expect("raw").0.pids(),
        };
        let before = cpu::Sample::take(&pids, self.broker);
        let start = Instant::now();
        let mut latencies = Vec::with_capacity(n);
        if caller == Caller::FrameworkOneTask {
            // All calls from this one task: no spawn per caller loop.
            use futures_util::{StreamExt, TryStreamExt};
            let client = &sides.framework.as_ref().expect("framework").1;
            latencies = futures_util::stream::iter(0..n)
                .map(|_| {
                    let payload = payload.clone();
                    async move {
                        let began = Instant::now();
                        let length = echo::new(payload).call(client).await?;
                        assert_eq!(length, PAYLOAD_BYTES as u64);
                        Ok::<_, Error>(began.elapsed())
                    }
                })
                .buffer_unordered(in_flight.max(1))
                .try_collect()
                .await?;
        }
        for index in 0..in_flight {
            let count = n / in_flight + usize::from(index < n % in_flight);
            let payload = payload.clone();
            match caller {
                Caller::FrameworkOneTask => break,
                Caller::Framework => {
                    let client = sides.framework.as_ref().expect("framework").1.clone();
                    loops.spawn(async move {
                        let mut latencies = Vec::with_capacity(count);
                        for _ in 0..count {
                            let began = Instant::now();
                            let length = echo::new(payload.clone()).call(&client).await?;
                            latencies.push(began.elapsed());
                            assert_eq!(length, PAYLOAD_BYTES as u64);
                        }
                        Ok::<_, Error>(latencies)
                    });
                }
                Caller::Raw | Caller::RawPlain => {
                    let client = if caller == Caller::Raw {
                        sides.raw.as_ref().expect("raw").1.clone()
                    } else {
                        sides.raw_plain.clone().expect("plain raw client")
                    };
                    let queue = self.echo_queue(Side::Raw);
                    loops.spawn(async move {
                        let mut latencies = Vec::with_capacity(count);
                        for _ in 0..count {
                            let began = Instant::now();
                            let length = client.call(&queue, &payload, CALL_TIMEOUT).await?;
                            latencies.push(began.elapsed());
                            assert_eq!(length, PAYLOAD_BYTES as u64);
                        }
                        Ok::<_, Error>(latencies)
                    });
                }
            }
        }
        while let Some(result) = loops.join_next().await {
            latencies.extend(result??);
        }
        let elapsed = start.elapsed();
        let per_task = cpu::Sample::take(&pids, self.broker).per_task_since(&before, n);
        latencies.sort();
        Ok((n as f64 / elapsed.as_secs_f64(), latencies, per_task))
    }

    async fn call_reps(
        &self,
        sides: &Sides,
        name: &str,
        in_flight: usize,
        n: usize,
    ) -> Res<(Vec<Report>, Vec<Bar>)> {
        let mut callers = vec![Caller::Framework];
        if in_flight > 1 {
            callers.push(Caller::FrameworkOneTask);
        }
        callers.push(Caller::Raw);
        if sides.raw_plain.is_some() {
            callers.push(Caller::RawPlain);
        }
        callers.retain(|caller| self.wants_caller(*caller));
        let warm_up = (n / 10).clamp(in_flight, 1_000);
        for &caller in &callers {
            self.one_call_round(sides, caller, in_flight, warm_up)
                .await?;
        }
        let mut figures: [CallFigures; 4] = Default::default();
        let index = |caller: Caller| match caller {
            Caller::Framework => 0,
            Caller::FrameworkOneTask => 1,
            Caller::Raw => 2,
            Caller::RawPlain => 3,
        };
        for rep in 0..self.reps() {
            let mut line = format!("rep {}:", rep + 1);
            for &caller in &callers {
                let (rate, latencies, per_task) =
                    self.one_call_round(sides, caller, in_flight, n).await?;
                let (p50, p99) = (
                    percentile_us(&latencies, 50.0),
                    percentile_us(&latencies, 99.0),
                );
                line.push_str(&format!(
                    "\n  {:<20} {rate:>6.0} calls/s p50 {p50:.0} µs p99 {p99:.0} µs; {}",
                    caller.label(),
                    per_task.show()
                ));
                let figures = &mut figures[index(caller)];
                figures.rate.push(rate);
                figures.p50.push(p50);
                figures.p99.push(p99);
                figures.cpu.push(per_task);
            }
            println!("{line}");
        }
        let [framework, one_task, baseline, plain] = &figures;
        let same = format!(
            "; requests transient with expiration, published with confirms (amqp-tasks races the reply against its confirm, the raw side {}); one exclusive client-named reply queue per client (no_ack)",
            match self.options.confirm {
                Confirm::Await => "awaits the confirm first",
                Confirm::Race => "races them too (--raw-confirm race)",
            }
        );
        let mut reports = Vec::new();
        let mut bars = Vec::new();
        let (report, bar) = self.call_report(name, in_flight, n, framework, baseline, &same);
        let report = if in_flight == 1 {
            self.judge(report, |r| {
                Some(("framework p50 ≤ 1.15× raw".to_owned(), r.ratio() <= 1.15))
            })
        } else {
            self.judge(report, |r| {
                Some(("framework ≥ 0.9× raw".to_owned(), r.ratio() >= 0.9))
            })
        };
        reports.push(report);
        bars.extend(bar);
        if sides.raw_plain.is_some() {
            let plain_name = format!("{name}-plain");
            let (report, bar) =
                self.call_report(&plain_name, in_flight, n, framework, plain, PLAIN_SETTINGS);
            let report = if in_flight == 1 {
                self.judge(report, |r| {
                    Some((
                        "framework p50 ≤ 1.1× the plain raw RPC client".to_owned(),
                        r.ratio() <= 1.1,
                    ))
                })
            } else {
                self.judge(report, |r| {
                    Some((
                        "framework ≥ 0.9× the plain raw RPC client".to_owned(),
                        r.ratio() >= 0.9,
                    ))
                })
            };
            reports.push(report);
            bars.extend(bar);
            if in_flight > 1 {
                let one_name = format!("{name}-one-task");
                let settings = format!(
                    "; framework: all {in_flight} calls in flight driven from ONE task \
                     (futures buffer_unordered({in_flight})){PLAIN_SETTINGS}"
                );
                let (report, bar) =
                    self.call_report(&one_name, in_flight, n, one_task, plain, &settings);
                let report = self.judge(report, |r| {
                    Some((
                        "framework from one task ≥ 0.9× the plain raw RPC client".to_owned(),
                        r.ratio() >= 0.9,
                    ))
                });
                reports.push(report);
                bars.extend(bar);
            }
        }
        Ok((reports, bars))
    }

    /// The report and bars of one framework caller against one baseline caller.
    fn call_report(
        &self,
        name: &str,
        in_flight: usize,
        n: usize,
        framework: &CallFigures,
        baseline: &CallFigures,
        settings: &str,
    ) -> (Report, Vec<Bar>) {
        let rate = (Stat::of(&framework.rate), Stat::of(&baseline.rate));
        let p50 = (Stat::of(&framework.p50), Stat::of(&baseline.p50));
        let p99 = (Stat::of(&framework.p99), Stat::of(&baseline.p99));
        let number = crate::stats::number;
        let mut extra = vec![
            ("n".into(), n.to_string()),
            ("reps".into(), self.reps().to_string()),
            ("in_flight".into(), in_flight.to_string()),
        ];
        extra.extend(framework.cpu.fields("framework"));
        extra.extend(baseline.cpu.fields("baseline"));
        if in_flight == 1 {
            extra.extend([
                ("framework_rps".into(), number(rate.0.median)),
                ("baseline_rps".into(), number(rate.1.median)),
                ("framework_p99_us".into(), number(p99.0.median)),
                ("baseline_p99_us".into(), number(p99.1.median)),
            ]);
            let report = Report {
                scenario: name.to_owned(),
                metric: format!("p50 round trip, µs ({n} sequential calls)"),
                unit: "us_p50",
                better: Better::Lower,
                framework: p50.0,
                baseline: p50.1,
                paired_ratio: paired(&framework.p50, &baseline.p50),
                extra,
                verdict: None,
                settings: self.settings(settings),
            };
            let bars = vec![
                Bar {
                    panel: Panel::Latency,
                    label: format!("{name} p50"),
                    framework: p50.0,
                    baseline: p50.1,
                },
                Bar {
                    panel: Panel::Latency,
                    label: format!("{name} p99"),
                    framework: p99.0,
                    baseline: p99.1,
                },
            ];
            (report, bars)
        } else {
            extra.extend([
                ("framework_p50_us".into(), number(p50.0.median)),
                ("baseline_p50_us".into(), number(p50.1.median)),
                ("framework_p99_us".into(), number(p99.0.median)),
                ("baseline_p99_us".into(), number(p99.1.median)),
            ]);
            let report = Report {
                scenario: name.to_owned(),
                metric: format!("calls/s ({n} calls, {in_flight} in flight)"),
                unit: "calls/s",
                better: Better::Higher,
                framework: rate.0,
                baseline: rate.1,
                paired_ratio: paired(&framework.rate, &baseline.rate),
                extra,
                verdict: None,
                settings: self.settings(settings),
            };
            let bars = vec![Bar {
                panel: Panel::Throughput,
                label: name.to_owned(),
                framework: rate.0,
                baseline: rate.1,
            }];
            (report, bars)
        }
    }

    async fn memory(&self, n: usize) -> Res<(Vec<Report>, Vec<Bar>)> {
        let sides = self.start(1, Bench::sink_queue, Extras::default()).await?;
        let result = self.memory_of(&sides, n).await;
        sides.close().await?;
        result
    }

    async fn memory_of(&self, sides: &Sides, n: usize) -> Res<(Vec<Report>, Vec<Bar>)> {
        const MIB: f64 = 1024.0;
        // Idle: connected, consuming, nothing received yet.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut idle = [0.0; 2];
        let mut after = [0.0; 2];
        let mut peak = [0.0; 2];
        let mut growth = [0.0; 2];
        let mut grown_kib = [0.0; 2];
        for (index, side) in [Side::Framework, Side::Raw].into_iter().enumerate() {
            if !self.wants(side) {
                continue;
            }
            let group = match side {
                Side::Framework => &sides.framework.as_ref().expect("framework").0,
                Side::Raw | Side::RawBatched => &sides.raw.as_ref().expect("raw").0,
            };
            let memory = group.memory()[0];
            idle[index] = memory.rss_kib as f64 / MIB;
            let quarter = (n / 4).max(1);
            // Warm-up, not counted, as long as the run: the worker's RSS rises over its first
            // ~150,000 tasks (allocator arenas, tokio's and lapin's pools), then stays flat.
            self.one_delay_round(sides, side, n).await?;
            let mut checkpoints = vec![(0usize, group.memory()[0].rss_kib)];
            for step in 1..=4 {
                self.one_delay_round(sides, side, quarter).await?;
                checkpoints.push((quarter * step, group.memory()[0].rss_kib));
            }
            let last = group.memory()[0];
            after[index] = last.rss_kib as f64 / MIB;
            peak[index] = last.hwm_kib as f64 / MIB;
            // Per task, between the first quarter (warm: pools and buffers at their size) and
            // the end.
            let (first_n, first_kib) = checkpoints[1];
            let (last_n, last_kib) = checkpoints[4];
            growth[index] =
                (last_kib as f64 - first_kib as f64) * 1024.0 / (last_n - first_n).max(1) as f64;
            grown_kib[index] = last_kib as f64 - first_kib as f64;
            println!(
                "{}: RSS idle {:.1} MiB; after a warm-up of {n} tasks, then {} tasks: {}; peak {:.1} MiB; growth after the first quarter {:.2} bytes/task",
                side.label(),
                idle[index],
                n,
                checkpoints
                    .iter()
                    .map(|(done, kib)| format!("{done}: {:.1}", *kib as f64 / MIB))
                    .collect::<Vec<_>>()
                    .join(", "),
                peak[index],
                growth[index]
            );
        }
        let number = crate::stats::number;
        let report = Report {
            scenario: "memory".into(),
            metric: format!("worker RSS after a warm-up and {n} tasks, MiB"),
            unit: "MiB",
            better: Better::Lower,
            framework: self.one(Side::Framework, after[0]),
            baseline: self.one(Side::Raw, after[1]),
            paired_ratio: None,
            extra: vec![
                ("n".into(), n.to_string()),
                ("framework_idle_mib".into(), number(idle[0])),
                ("baseline_idle_mib".into(), number(idle[1])),
                ("framework_peak_mib".into(), number(peak[0])),
                ("baseline_peak_mib".into(), number(peak[1])),
                ("framework_growth_bytes_per_task".into(), number(growth[0])),
                ("framework_growth_kib".into(), number(grown_kib[0])),
                ("baseline_growth_kib".into(), number(grown_kib[1])),
                ("baseline_growth_bytes_per_task".into(), number(growth[1])),
            ],
            verdict: None,
            settings: self.settings(&format!(
                "; one worker process per side, VmRSS/VmHWM from /proc; {} confirms in flight",
                self.options.window
            )),
        };
        let report = self.judge(report, |_| {
            Some((
                "framework idle RSS < 15 MiB; flat: ≤ 512 KiB growth from the first quarter to \
                 the end"
                    .to_owned(),
                idle[0] < 15.0 && grown_kib[0] <= 512.0,
            ))
        });
        let bars = vec![
            Bar {
                panel: Panel::Memory,
                label: "idle".into(),
                framework: self.one(Side::Framework, idle[0]),
                baseline: self.one(Side::Raw, idle[1]),
            },
            Bar {
                panel: Panel::Memory,
                label: format!("after {}k tasks", n / 1000),
                framework: self.one(Side::Framework, after[0]),
                baseline: self.one(Side::Raw, after[1]),
            },
            Bar {
                panel: Panel::Memory,
                label: "peak".into(),
                framework: self.one(Side::Framework, peak[0]),
                baseline: self.one(Side::Raw, peak[1]),
            },
        ];
        Ok((vec![report], bars))
    }

    /// A single measurement of `side`, or nothing when that side did not run.
    fn one(&self, side: Side, value: f64) -> Stat {
        if self.wants(side) {
            Stat::of(&[value])
        } else {
            Stat::default()
        }
    }

    /// Sets the verdict, unless in smoke mode or with one side only.
    fn judge(
        &self,
        mut report: Report,
        verdict: impl FnOnce(&Report) -> Option<(String, bool)>,
    ) -> Report {
        if !self.options.smoke && self.options.only.is_none() {
            report.verdict = verdict(&report);
        }
        report
    }
}

/// `.delay()`s `n` tasks with `window` of them in flight, as a user of the framework would.
async fn delay_framework(client: &Client, n: usize, window: usize, payload: &[u8]) -> Res<()> {
    let mut in_flight = JoinSet::new();
    for _ in 0..n {
        if in_flight.len() >= window.max(1)
            && let Some(done) = in_flight.join_next().await
        {
            done??;
        }
        let client = client.clone();
        let payload = payload.to_vec();
        in_flight.spawn(async move { sink::new(payload).delay(&client).await });
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    Ok(())
}

fn paired(framework: &[f64], baseline: &[f64]) -> Option<Stat> {
    if framework.len() < 2 || framework.len() != baseline.len() {
        return None;
    }
    let ratios: Vec<f64> = framework
        .iter()
        .zip(baseline)
        .map(|(f, b)| if *b == 0.0 { 0.0 } else { f / b })
        .collect();
    Some(Stat::of(&ratios))
}

fn print_report(report: &Report) {
    let decimals = if report.unit == "MiB" { 1 } else { 0 };
    println!("{}: {}", report.scenario, report.metric);
    println!("  amqp-tasks {}", report.framework.show(decimals));
    println!("  raw lapin  {}", report.baseline.show(decimals));
    match &report.paired_ratio {
        Some(paired) => println!(
            "  ratio {:.3} (per repetition {:.3}..{:.3})",
            report.ratio(),
            paired.min,
            paired.max
        ),
        None => println!("  ratio {:.3}", report.ratio()),
    }
    if let Some((target, met)) = &report.verdict {
        println!("  target {target}: {}", if *met { "met" } else { "MISSED" });
    }
    println!("  settings: {}", report.settings);
    println!("{}", report.result_line());
}

/// The 1-minute load average, as a hint of how busy the machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A description of the machine: CPU model and count.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} × {model}")
}

/// The summary table, in Markdown.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| scenario | metric | amqp-tasks | raw lapin | ratio | target |\n|---|---|---|---|---|---|\n",
    );
    for report in reports {
        let decimals = if report.unit == "MiB" { 1 } else { 0 };
        let ratio = match &report.paired_ratio {
            Some(paired) => format!(
                "{:.2} ({:.2}..{:.2})",
                report.ratio(),
                paired.min,
                paired.max
            ),
            None => format!("{:.2}", report.ratio()),
        };
        let target = match &report.verdict {
            Some((target, true)) => format!("{target}: met"),
            Some((target, false)) => format!("{target}: **missed**"),
            None => "–".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {ratio} | {target} |\n",
            report.scenario,
            report.metric,
            report.framework.show(decimals),
            report.baseline.show(decimals)
        ));
    }
    out
}
