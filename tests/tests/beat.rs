//! Periodic tasks with one scheduler alive among three `--beat` workers: SIGKILLs of the active
//! one, and a rolling graceful restart. The task `beat_tick` (every second) prints its tick id
//! and when it ran; the tests read every worker's output, the killed ones' included.

use amqp_tasks_tests::harness::{
    PATIENCE, TestEnv, WorkerProcess, bounded, eventually, rabbitmqctl,
};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

const WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
const SHELL: &str = env!("CARGO_BIN_EXE_test-shell");
const LIMIT: Duration = Duration::from_secs(150);
const ACTIVE: &str = "this worker is the active scheduler";
/// How late a tick may run and still count as on time (the scheduler's `ON_TIME`, plus the
/// time from its publish to its run in a worker).
const ON_TIME_MS: u64 = 1_500;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn candidate(env: &TestEnv) -> WorkerProcess {
    env.worker(WORKER, &["--beat", "--tasks", "beat_tick"])
}

/// A tick as its run printed it.
#[derive(Debug, Clone, Copy)]
struct Tick {
    scheduled: u64,
    ran: u64,
}

/// Every tick run printed by these workers (`beat tick beat_tick@<ms> at <ms>`); fails on an id
/// that is not `<task name>@<a whole second>`.
fn ticks(workers: &[WorkerProcess]) -> Vec<Tick> {
    let mut ticks = Vec::new();
    for worker in workers {
        for line in worker.output().lines() {
            let Some(rest) = line.strip_prefix("beat tick ") else {
                continue;
            };
            let (id, ran) = rest.split_once(" at ").expect("`<id> at <ms>`");
            let scheduled = id
                .strip_prefix("beat_tick@")
                .and_then(|ms| ms.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("tick id `{id}` is not `beat_tick@<Unix ms>`"));
            assert_eq!(scheduled % 1000, 0, "tick `{id}` is not on a whole second");
            ticks.push(Tick {
                scheduled,
                ran: ran.parse().expect("run time"),
            });
        }
    }
    ticks.sort_by_key(|tick| (tick.scheduled, tick.ran));
    ticks
}

/// Waits until `count` more ticks ran than `after` had.
async fn more_ticks(workers: &[WorkerProcess], after: usize, count: usize) {
    eventually("ticks to run", PATIENCE, || {
        (ticks(workers).len() >= after + count).then_some(())
    })
    .await;
}

/// The live worker that says it is the active scheduler, other than those in `not`.
async fn active(workers: &mut [WorkerProcess], not: &[u32]) -> usize {
    eventually("a worker to become the active scheduler", PATIENCE, || {
        workers
            .iter_mut()
            .position(|w| !not.contains(&w.pid()) && !w.has_exited() && w.output().contains(ACTIVE))
    })
    .await
}

/// Each answer of `inspect ping` (one JSON object a line): the worker and its scheduler role.
fn scheduler_roles(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .map(|line| {
            let answer: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            (
                answer["worker"].as_str().unwrap_or_default().to_owned(),
                answer["scheduler"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// How many times each second ran, from the first tick to the last.
fn runs_per_second(ticks: &[Tick]) -> BTreeMap<u64, Vec<Tick>> {
    let mut runs: BTreeMap<u64, Vec<Tick>> = BTreeMap::new();
    let (first, last) = (ticks[0].scheduled, ticks[ticks.len() - 1].scheduled);
    for second in (first..=last).step_by(1000) {
        runs.insert(second, Vec::new());
    }
    for tick in ticks {
        runs.entry(tick.scheduled).or_default().push(*tick);
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_the_schedule_and_the_next_tick() {
    let env = TestEnv::new("beat-list");
    bounded(LIMIT, async {
        let mut lister = env.worker(WORKER, &["--list"]);
        assert!(lister.exit(PATIENCE).await.success());
        let output = lister.output();
        let line = output
            .lines()
            .skip_while(|line| !line.starts_with("beat_tick("))
            .find(|line| line.contains("schedule:"))
            .unwrap_or_else(|| panic!("no schedule listed for beat_tick:\n{output}"));
        assert!(
            line.contains("schedule: every 1s, catch_up one  next: "),
            "{line}"
        );
        assert!(
            line.ends_with(".000Z"),
            "the next tick is a whole second: {line}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_connection_asks_for_a_short_heartbeat() {
    let env = TestEnv::new("beat-heartbeat");
    env.track("amqp-tasks.beat");
    bounded(LIMIT, async {
        // The environment variable makes a candidate too.
        let mut worker = env.worker_with_env(
            WORKER,
            &["--tasks", "beat_tick"],
            &[("AMQP_TASKS_BEAT", "true")],
        );
        worker.wait_for(ACTIVE).await;
        let listing = rabbitmqctl(&[
            "list_connections",
            "client_properties",
            "timeout",
            "-q",
            "--no-table-headers",
        ])
        .await;
        let timeout_of = |suffix: &str| {
            listing
                .lines()
                .find(|line| line.contains(&format!("pid {}{suffix}\"}}", worker.pid())))
                .and_then(|line| line.rsplit('\t').next())
                .map(|timeout| timeout.trim().to_owned())
                .unwrap_or_else(|| {
                    panic!("no connection `pid {}{suffix}`:\n{listing}", worker.pid())
                })
        };
        assert_eq!(timeout_of(" (scheduler)"), "5", "the scheduler's heartbeat");
        assert_eq!(
            timeout_of(""),
            "60",
            "the worker's own connection keeps the broker's"
        );
        worker.signal("TERM");
        assert!(worker.exit(PATIENCE).await.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_scheduler_killed_twice_each_tick_runs_once_outside_the_takeovers() {
    let env = TestEnv::new("beat-kill");
    env.track("amqp-tasks.beat");
    bounded(LIMIT, async {
        let mut workers: Vec<WorkerProcess> = (0..3).map(|_| candidate(&env)).collect();
        for worker in &workers {
            worker.wait_for("scheduler candidate waiting for the token").await;
        }
        let mut killed = Vec::new();
        let mut windows = Vec::new();
        for round in 0..2 {
            let before = ticks(&workers).len();
            more_ticks(&workers, before, 10).await;
            let victim = active(&mut workers, &killed).await;
            let pid = workers[victim].pid();
            let (killed_at, killed_ms) = (Instant::now(), now_ms());
            workers[victim].signal("KILL");
            workers[victim].exit(PATIENCE).await;
            killed.push(pid);
            let successor = active(&mut workers, &killed).await;
            let takeover = killed_at.elapsed();
            eprintln!(
                "takeover {}: worker {} active {} ms after the SIGKILL of {pid}",
                round + 1,
                workers[successor].pid(),
                takeover.as_millis()
            );
            // A takeover window: from a second before the kill until a second after the
            // successor said it was active.
            windows.push((
                killed_ms.saturating_sub(1000),
                killed_ms + takeover.as_millis() as u64 + 1000,
            ));
        }
        let before = ticks(&workers).len();
        more_ticks(&workers, before, 10).await;

        let ticks = ticks(&workers);
        let in_window = |second: u64| windows.iter().any(|(from, to)| (*from..=*to).contains(&second));
        let mut late_in_window = vec![0; windows.len()];
        for (second, runs) in runs_per_second(&ticks) {
            if !in_window(second) {
                assert_eq!(
                    runs.len(),
                    1,
                    "outside the takeovers {windows:?}, tick {second} ran {} times: {ticks:?}",
                    runs.len()
                );
                assert!(
                    runs[0].ran - second <= ON_TIME_MS,
                    "tick {second} ran late outside a takeover: {runs:?}"
                );
                continue;
            }
            // Inside a takeover window: missed ticks are not fired, except the latest one,
            // once late; a tick fired twice carries the same id (it is counted here by id).
            let window = windows
                .iter()
                .position(|(from, to)| (*from..=*to).contains(&second))
                .unwrap();
            if runs.iter().any(|run| run.ran - second > ON_TIME_MS) {
                late_in_window[window] += 1;
            }
        }
        for (window, late) in windows.iter().zip(&late_in_window) {
            assert!(
                *late <= 1,
                "more than the latest missed tick fired late in the takeover {window:?}: {ticks:?}"
            );
        }
        for worker in &workers {
            let elections = worker.output();
            let elections = elections
                .lines()
                .filter(|l| l.contains("beat:") && !l.contains("tick sent"));
            for line in elections {
                eprintln!("{}: {line}", worker.pid());
            }
        }
        eprintln!(
            "{} ticks over {} s, takeover windows {windows:?}, late ticks fired in them {late_in_window:?}",
            ticks.len(),
            (ticks[ticks.len() - 1].scheduled - ticks[0].scheduled) / 1000 + 1
        );
        for worker in &mut workers {
            if !worker.has_exited() {
                worker.signal("TERM");
                worker.exit(PATIENCE).await;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_neither_repeats_nor_skips_a_tick() {
    let env = TestEnv::new("beat-rolling");
    env.track("amqp-tasks.beat");
    bounded(LIMIT, async {
        let mut workers: Vec<WorkerProcess> = (0..3).map(|_| candidate(&env)).collect();
        for worker in &workers {
            worker
                .wait_for("scheduler candidate waiting for the token")
                .await;
        }
        let mut stopped = Vec::new();
        let mut handovers = 0;
        for round in 0..3 {
            let before = ticks(&workers).len();
            more_ticks(&workers, before, 3).await;
            let was_active = active(&mut workers, &stopped).await;
            // Restart the worker of this round; when it is the active one, the token moves.
            let old = round;
            let stopping_at = Instant::now();
            workers[old].signal("TERM");
            let status = workers[old].exit(PATIENCE).await;
            assert!(status.success(), "graceful exit: {}", workers[old].output());
            stopped.push(workers[old].pid());
            if old == was_active {
                handovers += 1;
                let successor = active(&mut workers, &stopped).await;
                eprintln!(
                    "rolling restart {}: worker {} active {} ms after SIGTERM to the active one",
                    round + 1,
                    workers[successor].pid(),
                    stopping_at.elapsed().as_millis()
                );
            }
            let replacement = candidate(&env);
            replacement
                .wait_for("scheduler candidate waiting for the token")
                .await;
            workers.push(replacement);
        }
        let before = ticks(&workers).len();
        more_ticks(&workers, before, 4).await;

        // The three workers that started are all gone: the token moved at least once.
        assert!(handovers >= 1, "the active scheduler was never restarted");
        let ticks = ticks(&workers);
        for (second, runs) in runs_per_second(&ticks) {
            assert_eq!(
                runs.len(),
                1,
                "across a rolling restart, tick {second} ran {} times: {ticks:?}",
                runs.len()
            );
        }
        eprintln!(
            "rolling restart: {} ticks over {} s, each once",
            ticks.len(),
            (ticks[ticks.len() - 1].scheduled - ticks[0].scheduled) / 1000 + 1
        );
        for worker in &mut workers {
            if !worker.has_exited() {
                worker.signal("TERM");
                worker.exit(PATIENCE).await;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_names_the_one_active_scheduler() {
    let env = TestEnv::new("beat-inspect");
    env.track("amqp-tasks.beat");
    bounded(LIMIT, async {
        let mut workers: Vec<WorkerProcess> = (0..2).map(|_| candidate(&env)).collect();
        for worker in &workers {
            worker.wait_for("answering inspect requests").await;
        }
        let leader = active(&mut workers, &[]).await;
        let (leader, other) = (workers[leader].pid(), workers[1 - leader].pid());
        let (code, stdout, stderr) = env
            .run(SHELL, &["inspect", "ping", "--timeout", "3s"])
            .await;
        assert_eq!(code, 0, "{stderr}");
        let mut roles = scheduler_roles(&stdout);
        roles.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(roles.len(), 2, "{stdout}");
        assert_eq!(roles[0].1, "active", "{stdout}");
        assert!(roles[0].0.ends_with(&format!(":{leader}")), "{stdout}");
        assert_eq!(roles[1].1, "candidate", "{stdout}");
        assert!(roles[1].0.ends_with(&format!(":{other}")), "{stdout}");
    })
    .await;
}

/// A `--beat` worker is a scheduler candidate from its first answer to `inspect` on: it answers
/// before its consumers are open, and its scheduler starts only then, but it never says `none`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beat_worker_is_a_candidate_from_its_first_inspect_answer() {
    let env = TestEnv::new("beat-first-answer");
    env.track("amqp-tasks.beat");
    bounded(LIMIT, async {
        let worker = candidate(&env);
        let pid = format!(":{}", worker.pid());
        let deadline = Instant::now() + PATIENCE;
        // Asked again and again from the moment it starts; the inspect timeout paces the loop.
        let first = loop {
            let (_, stdout, _) = env
                .run(SHELL, &["inspect", "ping", "--timeout", "150ms"])
                .await;
            let mine = scheduler_roles(&stdout)
                .into_iter()
                .find_map(|(worker, role)| worker.ends_with(&pid).then_some(role));
            if let Some(role) = mine {
                break role;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not answer inspect ping within {PATIENCE:?}"
            );
        };
        assert!(
            first == "candidate" || first == "active",
            "a --beat worker answered its first inspect ping with scheduler `{first}`"
        );
    })
    .await;
}
