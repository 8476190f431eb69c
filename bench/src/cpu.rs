//! CPU time spent by the producer (this process), the worker processes and the broker during a
//! measurement: on a shared machine CPU time per task varies much less than wall-clock rates, and
//! it says which process the framework's cost lands in.

use std::time::Duration;

/// Ticks per second of `/proc/<pid>/stat` times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU time of a process so far (all its threads, dead ones included).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / TICKS_PER_SECOND,
    ))
}

/// The RabbitMQ node's process (`beam.smp`) on this machine, if there is one we can see.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
}

/// CPU time of the three parties at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    producer: Duration,
    workers: Duration,
    broker: Option<Duration>,
}

impl Sample {
    /// Now, for this process, `workers` and `broker`.
    pub fn take(workers: &[u32], broker: Option<u32>) -> Sample {
        Sample {
            producer: process_cpu(std::process::id()).unwrap_or_default(),
            workers: workers.iter().filter_map(|pid| process_cpu(*pid)).sum(),
            broker: broker.and_then(process_cpu),
        }
    }

    /// Microseconds of CPU per task since `earlier`, for `tasks` tasks.
    pub fn per_task_since(&self, earlier: &Sample, tasks: usize) -> PerTask {
        let per = |later: Duration, before: Duration| {
            later.saturating_sub(before).as_secs_f64() * 1e6 / tasks.max(1) as f64
        };
        PerTask {
            producer: per(self.producer, earlier.producer),
            worker: per(self.workers, earlier.workers),
            broker: match (self.broker, earlier.broker) {
                (Some(later), Some(before)) => Some(per(later, before)),
                _ => None,
            },
        }
    }
}

/// CPU microseconds per task, per party.
#[derive(Clone, Copy, Debug, Default)]
pub struct PerTask {
    /// The producer (this process).
    pub producer: f64,
    /// All worker processes together.
    pub worker: f64,
    /// The RabbitMQ node (shared: includes whatever else it served meanwhile).
    pub broker: Option<f64>,
}

impl PerTask {
    /// `producer 12.3 + worker 4.5 + broker 30.1 µs/task`.
    pub fn show(&self) -> String {
        let broker = self
            .broker
            .map_or_else(String::new, |b| format!(" + broker {b:.1}"));
        format!(
            "cpu producer {:.1} + worker {:.1}{broker} µs/task",
            self.producer, self.worker
        )
    }
}
