//! Medians, spreads and percentiles, and the report of a scenario.

use std::fmt::Write;
use std::time::Duration;

/// The median and the spread (min..max) of one figure over the repetitions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stat {
    /// Median over the repetitions.
    pub median: f64,
    /// Smallest repetition.
    pub min: f64,
    /// Largest repetition.
    pub max: f64,
    /// How many repetitions.
    pub count: usize,
}

impl Stat {
    /// The median, min and max of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Stat {
        if values.is_empty() {
            return Stat::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        } else {
            sorted[middle]
        };
        Stat {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            count: sorted.len(),
        }
    }

    /// `median (min..max)` with `decimals` decimals; `–` when not measured.
    pub fn show(&self, decimals: usize) -> String {
        if self.count == 0 {
            "–".to_owned()
        } else if self.count > 1 {
            format!(
                "{:.d$} ({:.d$}..{:.d$})",
                self.median,
                self.min,
                self.max,
                d = decimals
            )
        } else {
            format!("{:.d$}", self.median, d = decimals)
        }
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of sorted durations, in microseconds.
pub fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Throughput.
    Higher,
    /// Latency, memory.
    Lower,
}

/// One scenario's outcome: the primary figure of both sides, and more key=value facts.
#[derive(Clone, Debug)]
pub struct Report {
    /// The scenario name in the `RESULT` line.
    pub scenario: String,
    /// What the primary figure is, for people ("end-to-end tasks/s").
    pub metric: String,
    /// Its unit, for machines.
    pub unit: &'static str,
    /// Which way it is better.
    pub better: Better,
    /// The framework's figure.
    pub framework: Stat,
    /// The raw lapin figure.
    pub baseline: Stat,
    /// framework / baseline per repetition (the two sides run interleaved, so a rep's pair saw
    /// the same machine noise), where there are repetitions.
    pub paired_ratio: Option<Stat>,
    /// More facts for the `RESULT` line.
    pub extra: Vec<(String, String)>,
    /// The target and whether it was met (`None` in smoke mode or where there is none).
    pub verdict: Option<(String, bool)>,
    /// The settings both sides ran with.
    pub settings: String,
}

impl Report {
    /// framework / baseline, of the medians (NaN when a side was not measured).
    pub fn ratio(&self) -> f64 {
        if self.baseline.count == 0 || self.framework.count == 0 || self.baseline.median == 0.0 {
            f64::NAN
        } else {
            self.framework.median / self.baseline.median
        }
    }

    /// The machine-readable line.
    pub fn result_line(&self) -> String {
        let mut line = format!(
            "RESULT scenario={} framework={} baseline={} ratio={:.3} unit={}",
            self.scenario,
            measured(&self.framework),
            measured(&self.baseline),
            self.ratio(),
            self.unit
        );
        if self.framework.count > 1 {
            let _ = write!(
                line,
                " framework_min={} framework_max={} baseline_min={} baseline_max={}",
                number(self.framework.min),
                number(self.framework.max),
                number(self.baseline.min),
                number(self.baseline.max)
            );
        }
        if let Some(paired) = &self.paired_ratio {
            let _ = write!(
                line,
                " paired_ratio_min={:.3} paired_ratio_max={:.3}",
                paired.min, paired.max
            );
        }
        for (key, value) in &self.extra {
            let _ = write!(line, " {key}={value}");
        }
        if let Some((_, met)) = &self.verdict {
            let _ = write!(line, " target_met={met}");
        }
        line
    }
}

/// A side's median for a `RESULT` line, `NaN` when it was not measured.
fn measured(stat: &Stat) -> String {
    if stat.count == 0 {
        "NaN".to_owned()
    } else {
        number(stat.median)
    }
}

/// A number for a `RESULT` line: integers without decimals, small values with some.
pub fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}
