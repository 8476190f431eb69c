//! Schedules of periodic tasks (`#[task(every = "30s")]`, `#[task(cron = "...")]`) as pure
//! arithmetic: when a schedule ticks, the id of a tick, which tick a scheduler fires after a gap
//! (the catch-up rule), and the token the schedulers hand on, which carries the last tick fired
//! of each task. No clock of its own and no I/O: callers pass the time; electing and firing are
//! the worker's (`worker::beat`).
//!
//! - `every = d` ticks at the Unix times (in ms) divisible by `d`, so that any two schedulers
//!   compute the same ticks.
//! - `cron = "sec min hour dom month dow"` ticks where croner says (UTC, POSIX days of the week,
//!   Sunday = 0, the seconds field required).
//! - A tick's task id is `<task name>@<scheduled Unix ms>` (the name as written, without the
//!   namespace): a tick fired twice (across a failover) carries the same id both times.
//! - After a gap (no scheduler alive, a takeover, a slow step), `catch_up = "one"` fires the
//!   latest tick due, once; `"none"` fires it only if it is on time ([`ON_TIME`]). Earlier ticks
//!   of the gap are never fired. A task without a recorded tick starts with the latest tick due
//!   if it is on time, and otherwise with the next one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// How late a tick may be fired and still count as on time (not missed).
pub const ON_TIME: Duration = Duration::from_secs(1);

/// What a scheduler does with the ticks it missed (`catch_up = "..."`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Fire the latest missed tick once (the default).
    #[default]
    One,
    /// Fire no missed tick.
    None,
}

impl CatchUp {
    /// As written in the attribute.
    pub const fn as_str(self) -> &'static str {
        match self {
            CatchUp::One => "one",
            CatchUp::None => "none",
        }
    }
}

/// When a periodic task ticks, as `#[task]` wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    kind: Kind,
    catch_up: CatchUp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    EveryMs(u64),
    Cron(&'static str),
}

impl Schedule {
    /// Every `ms` milliseconds, at Unix times divisible by it (`#[task(every = ...)]`).
    pub const fn every(ms: u64, catch_up: CatchUp) -> Schedule {
        Schedule {
            kind: Kind::EveryMs(if ms == 0 { 1 } else { ms }),
            catch_up,
        }
    }

    /// On a six-field cron expression, UTC (`#[task(cron = ...)]`).
    pub const fn cron(expression: &'static str, catch_up: CatchUp) -> Schedule {
        Schedule {
            kind: Kind::Cron(expression),
            catch_up,
        }
    }

    /// What is done with missed ticks.
    pub fn catch_up(&self) -> CatchUp {
        self.catch_up
    }

    /// Checks the schedule (a cron expression the macro could only check for its shape) and
    /// prepares it for the arithmetic.
    pub fn plan(&self) -> Result<Plan, String> {
        let kind = match self.kind {
            Kind::EveryMs(ms) => PlanKind::Every(ms),
            Kind::Cron(expression) => PlanKind::Cron(Box::new(parse_cron(expression)?)),
        };
        Ok(Plan {
            kind,
            catch_up: self.catch_up,
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::EveryMs(ms) => write!(
                f,
                "every {}",
                super::duration::human(Duration::from_millis(ms))
            )?,
            Kind::Cron(expression) => write!(f, "cron \"{expression}\" (UTC)")?,
        }
        write!(f, ", catch_up {}", self.catch_up.as_str())
    }
}

/// croner with this crate's rules: six fields, seconds first, POSIX days of the week.
fn parse_cron(expression: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|error| format!("bad cron expression \"{expression}\": {error}"))
}

/// A checked schedule, ready for the arithmetic.
#[derive(Debug)]
pub struct Plan {
    kind: PlanKind,
    catch_up: CatchUp,
}

#[derive(Debug)]
enum PlanKind {
    Every(u64),
    Cron(Box<croner::Cron>),
}

/// What a scheduler does for one task at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The tick to fire now, if any.
    pub fire: Option<u64>,
    /// The tick to record as the last one (fired, or skipped as missed).
    pub record: Option<u64>,
}

impl Plan {
    /// The first tick strictly after `after_ms`.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        match &self.kind {
            PlanKind::Every(every) => (after_ms / every + 1).checked_mul(*every),
            PlanKind::Cron(cron) => {
                // croner works in whole seconds: from the start of this second, exclusive.
                let second = i64::try_from(after_ms / 1000).ok()?;
                let start = chrono::DateTime::from_timestamp(second, 0)?;
                let next = cron.find_next_occurrence(&start, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The latest tick at or before `now_ms`.
    pub fn latest_until(&self, now_ms: u64) -> Option<u64> {
        match &self.kind {
            PlanKind::Every(every) => Some(now_ms - now_ms % every),
            PlanKind::Cron(cron) => {
                let second = i64::try_from(now_ms / 1000).ok()?;
                let start = chrono::DateTime::from_timestamp(second, 0)?;
                let previous = cron.find_previous_occurrence(&start, true).ok()?;
                u64::try_from(previous.timestamp_millis()).ok()
            }
        }
    }

    /// What to do at `now_ms`, the last tick recorded being `last`: fire the latest tick due if
    /// it is after `last` and on time, or late under `catch_up = "one"`; record it either way.
    pub fn step(&self, last: Option<u64>, now_ms: u64) -> Step {
        let nothing = Step {
            fire: None,
            record: None,
        };
        let Some(latest) = self.latest_until(now_ms) else {
            return nothing;
        };
        if last.is_some_and(|last| latest <= last) {
            return nothing;
        }
        let on_time = now_ms - latest <= ON_TIME.as_millis() as u64;
        // Late after a recorded tick: missed. Without one, the task starts now: a late tick
        // was never this scheduler's to fire.
        let fire = on_time || (last.is_some() && self.catch_up == CatchUp::One);
        Step {
            fire: fire.then_some(latest),
            record: Some(latest),
        }
    }
}

/// The task id of a tick: `<task name>@<scheduled Unix ms>`.
pub fn tick_id(task: &str, scheduled_ms: u64) -> String {
    format!("{task}@{scheduled_ms}")
}

/// The scheduler's token: the last tick recorded (fired, or skipped as missed) of each periodic
/// task, by task name, and who published it when. JSON on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The last tick recorded of each task, in Unix ms.
    #[serde(default)]
    pub last: BTreeMap<String, u64>,
    /// The scheduler that published it.
    #[serde(default)]
    pub by: String,
    /// When, in Unix ms.
    #[serde(default)]
    pub at_ms: u64,
}

impl Token {
    /// Reads a token; anything else (a stray message in the election queue) is `None`.
    pub fn decode(body: &[u8]) -> Option<Token> {
        serde_json::from_slice(body).ok()
    }

    /// The token as JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Takes in what another token knows: for each task, the later of the two ticks. Merging
    /// is how duplicate tokens collapse into one without forgetting a tick.
    pub fn merge(&mut self, other: &Token) {
        for (task, tick) in &other.last {
            let mine = self.last.entry(task.clone()).or_insert(*tick);
            *mine = (*mine).max(*tick);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(schedule: Schedule) -> Plan {
        schedule.plan().unwrap()
    }

    #[test]
    fn every_ticks_at_multiples_of_its_interval() {
        let every = plan(Schedule::every(30_000, CatchUp::One));
        assert_eq!(every.next_after(0), Some(30_000));
        assert_eq!(every.next_after(29_999), Some(30_000));
        assert_eq!(every.next_after(30_000), Some(60_000));
        assert_eq!(every.latest_until(59_999), Some(30_000));
        assert_eq!(every.latest_until(60_000), Some(60_000));
        assert_eq!(every.next_after(u64::MAX - 1), None);
    }

    #[test]
    fn cron_ticks_in_utc_with_posix_days() {
        // 2026-11-29 is a Sunday; 1_796_083_200_000 ms is 2026-12-01T00:00:00Z, a Tuesday.
        let tuesday_midnight: u64 = 1_796_083_200_000;
        let sundays = plan(Schedule::cron("0 0 12 * * 0", CatchUp::One));
        let next = sundays.next_after(tuesday_midnight).unwrap();
        let next = chrono::DateTime::from_timestamp_millis(next as i64).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-12-06T12:00:00+00:00");
        assert_eq!(next.format("%A").to_string(), "Sunday");

        let five_minutes = plan(Schedule::cron("0 */5 * * * *", CatchUp::One));
        assert_eq!(
            five_minutes.next_after(tuesday_midnight),
            Some(tuesday_midnight + 300_000)
        );
        // Strictly after, within the same second too.
        assert_eq!(
            five_minutes.next_after(tuesday_midnight + 300_500),
            Some(tuesday_midnight + 600_000)
        );
        assert_eq!(
            five_minutes.latest_until(tuesday_midnight + 599_999),
            Some(tuesday_midnight + 300_000)
        );
        assert_eq!(
            five_minutes.latest_until(tuesday_midnight + 600_000),
            Some(tuesday_midnight + 600_000)
        );
    }

    #[test]
    fn cron_requires_six_valid_fields() {
        assert!(Schedule::cron("*/5 * * * *", CatchUp::One).plan().is_err());
        assert!(
            Schedule::cron("0 0 25 * * *", CatchUp::One)
                .plan()
                .unwrap_err()
                .contains("bad cron expression \"0 0 25 * * *\"")
        );
        assert!(Schedule::cron("0 0 0 30 2 *", CatchUp::One).plan().is_ok());
    }

    #[test]
    fn an_on_time_tick_fires_once() {
        let every = plan(Schedule::every(1_000, CatchUp::One));
        let step = every.step(Some(9_000), 10_020);
        assert_eq!(
            step,
            Step {
                fire: Some(10_000),
                record: Some(10_000)
            }
        );
        // Recorded: not again.
        assert_eq!(every.step(Some(10_000), 10_900).fire, None);
        assert_eq!(every.step(Some(10_000), 10_900).record, None);
    }

    #[test]
    fn catch_up_one_fires_only_the_latest_missed_tick() {
        let every = plan(Schedule::every(1_000, CatchUp::One));
        // Last fired at 10 s, back at 15.3 s (late, or on time): only 15 s fires.
        assert_eq!(every.step(Some(10_000), 15_300).fire, Some(15_000));
        // Back at 17.5 s: 17 s is 1.5 s late, fired all the same.
        let step = every.step(Some(10_000), 17_500);
        assert_eq!((step.fire, step.record), (Some(17_000), Some(17_000)));
    }

    #[test]
    fn catch_up_none_fires_no_missed_tick() {
        let every = plan(Schedule::every(10_000, CatchUp::None));
        // 30 s is on time: fired; the missed 20 s is not.
        assert_eq!(every.step(Some(10_000), 30_400).fire, Some(30_000));
        // 30 s is 5 s late: missed, recorded, not fired.
        let step = every.step(Some(10_000), 35_000);
        assert_eq!((step.fire, step.record), (None, Some(30_000)));
    }

    #[test]
    fn a_task_without_a_recorded_tick_starts_now() {
        let every = plan(Schedule::every(30_000, CatchUp::One));
        assert_eq!(every.step(None, 60_200).fire, Some(60_000));
        let step = every.step(None, 75_000);
        assert_eq!((step.fire, step.record), (None, Some(60_000)));
    }

    #[test]
    fn tick_ids_and_tokens() {
        assert_eq!(
            tick_id("reports.daily", 1_796_169_600_000),
            "reports.daily@1796169600000"
        );
        let mut token = Token {
            last: BTreeMap::from([("a".to_owned(), 5), ("b".to_owned(), 9)]),
            by: "w1".to_owned(),
            at_ms: 1,
        };
        let other = Token {
            last: BTreeMap::from([("a".to_owned(), 7), ("c".to_owned(), 1)]),
            ..Token::default()
        };
        token.merge(&other);
        assert_eq!(
            token.last,
            BTreeMap::from([
                ("a".to_owned(), 7),
                ("b".to_owned(), 9),
                ("c".to_owned(), 1)
            ])
        );
        assert_eq!(Token::decode(&token.encode()), Some(token));
        assert_eq!(Token::decode(b"not a token"), None);
    }

    #[test]
    fn schedules_describe_themselves() {
        assert_eq!(
            Schedule::every(30_000, CatchUp::One).to_string(),
            "every 30s, catch_up one"
        );
        assert_eq!(
            Schedule::cron("0 */5 * * * *", CatchUp::None).to_string(),
            "cron \"0 */5 * * * *\" (UTC), catch_up none"
        );
    }
}
