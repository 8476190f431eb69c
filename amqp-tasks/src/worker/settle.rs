//! Settle: the last stage of a delivery. Acknowledgements that do not serialise the consumer:
//! handlers report how each delivery ends ([`Settle`]) to one acker task per channel, which acks each contiguous finished run of delivery tags with a single
//! `multiple` ack, and a finished delivery stuck behind a slow one on its own (so that a slow task
//! does not hold the prefetch window shut).
//!
//! Acks are coalesced over a short window ([`ACK_WINDOW`]), or until half the prefetch is finished
//! and waiting ([`flush_threshold`]), so that a busy channel sends one `multiple` ack for a run of
//! deliveries instead of one per handful. An ack is still sent only for a delivery whose handler
//! finished and whose reply or dead letter was published: the window only delays it. Requeues are
//! not delayed.
//!
//! A multiple ack covers exactly the tags this channel delivered and saw finished: an acker never
//! outlives its channel, so no tag of an older channel can ack a newer channel's deliveries.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Processed (answered and, where due, dead-lettered): ack.
    Ack(u64),
    /// Not started (shutdown) or not safely finished: back to the queue.
    Requeue(u64),
    /// Acked already, by its handler.
    AckedAlone(u64),
    /// Given back as a copy: its own settlement was sent with it (nothing more to do).
    Given(u64),
}

/// Sends settlements to the channel's acker.
#[derive(Clone)]
pub(crate) struct AckSender(mpsc::UnboundedSender<Settle>);

impl AckSender {
    pub(crate) fn send(&self, settle: Settle) {
        // The acker ends only with its channel, whose deliveries the broker returns anyway.
        let _ = self.0.send(settle);
    }
}

/// How long a finished delivery may wait for others to share its ack. Short against any task, long
/// enough for a busy channel to finish a run of deliveries meanwhile.
pub(crate) const ACK_WINDOW: Duration = Duration::from_millis(2);

/// How many finished deliveries waiting for their ack send the acks at once: half the prefetch,
/// so that the broker keeps delivering while they wait (with a prefetch of 1, every ack at once).
pub(crate) fn flush_threshold(prefetch: u16) -> usize {
    usize::from(prefetch / 2).max(1)
}

/// Starts the acker of `channel` (consumed with `prefetch`); it ends once every [`AckSender`] is
/// dropped and everything sent is acked.
pub(crate) fn spawn(channel: Channel, prefetch: u16) -> (AckSender, JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let threshold = flush_threshold(prefetch);
    let task = tokio::spawn(async move {
        let mut window = AckWindow::default();
        let mut batch = Vec::new();
        let flush = tokio::time::sleep(ACK_WINDOW);
        tokio::pin!(flush);
        // Whether `flush` is armed: some finished deliveries wait for their ack.
        let mut armed = false;
        loop {
            let received = if armed {
                tokio::select! {
                    biased;
                    received = receiver.recv_many(&mut batch, 1024) => received,
                    () = &mut flush => {
                        armed = false;
                        send_acks(&channel, &mut window).await;
                        continue;
                    }
                }
            } else {
                receiver.recv_many(&mut batch, 1024).await
            };
            if received == 0 {
                // Every sender is gone (the consumer stopped): ack what finished, now.
                send_acks(&channel, &mut window).await;
                return;
            }
            for settle in batch.drain(..) {
                match settle {
                    Settle::Ack(tag) => window.finished(tag),
                    Settle::AckedAlone(tag) => window.settled_alone(tag),
                    Settle::Given(_) => {}
                    Settle::Requeue(tag) => {
                        // Sent before any multiple ack that covers it, so it is not acked by one.
                        let options = BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        };
                        if let Err(error) = channel.basic_nack(tag, options).await {
                            tracing::debug!(%error, tag, "requeue failed; the broker returns it with the channel");
                        }
                        window.settled_alone(tag);
                    }
                }
            }
            let waiting = window.waiting();
            if waiting >= threshold {
                armed = false;
                send_acks(&channel, &mut window).await;
            } else if waiting > 0 && !armed {
                armed = true;
                flush.as_mut().reset(Instant::now() + ACK_WINDOW);
            }
        }
    });
    (AckSender(sender), task)
}

/// Sends the acks the window has ready.
async fn send_acks(channel: &Channel, window: &mut AckWindow) {
    for ack in window.take_acks() {
        let (tag, multiple) = match ack {
            Ack::Through(tag) => (tag, true),
            Ack::One(tag) => (tag, false),
        };
        if let Err(error) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
            tracing::debug!(%error, tag, "ack failed; the broker redelivers with the channel");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ack {
    /// `basic.ack(tag, multiple = true)`.
    Through(u64),
    /// `basic.ack(tag, multiple = false)`.
    One(u64),
}

/// The pure bookkeeping of the acker. Delivery tags of a channel start at 1 and increase by 1.
///
/// Its memory is bounded by the gaps, not by the traffic: deliveries settled on their own are
/// kept as ranges, so one task blocked for a minute while thousands of others are acked around
/// it costs one range, not one entry each.
#[derive(Debug, Default)]
pub(crate) struct AckWindow {
    /// Every tag up to this one is settled.
    settled_through: u64,
    /// Finished, not acked yet (emptied by every `take_acks`).
    finished: BTreeSet<u64>,
    /// Settled on their own (acked alone or requeued), above `settled_through`.
    alone: Ranges,
}

impl AckWindow {
    pub(crate) fn finished(&mut self, tag: u64) {
        if tag > self.settled_through {
            self.finished.insert(tag);
        }
    }

    pub(crate) fn settled_alone(&mut self, tag: u64) {
        if tag > self.settled_through {
            self.finished.remove(&tag);
            self.alone.insert(tag);
        }
    }

    /// Finished deliveries not acked yet.
    pub(crate) fn waiting(&self) -> usize {
        self.finished.len()
    }

    /// The acks to send now: one multiple ack for the contiguous run (ending at its last tag not
    /// yet settled alone), then each finished tag beyond a gap on its own.
    pub(crate) fn take_acks(&mut self) -> Vec<Ack> {
        let mut acks = Vec::new();
        let mut through = None;
        loop {
            let next = self.settled_through + 1;
            if self.finished.remove(&next) {
                through = Some(next);
                self.settled_through = next;
            } else if let Some(end) = self.alone.take_from(next) {
                self.settled_through = end;
            } else {
                break;
            }
        }
        acks.extend(through.map(Ack::Through));
        for tag in std::mem::take(&mut self.finished) {
            acks.push(Ack::One(tag));
            self.alone.insert(tag);
        }
        acks
    }

    /// How many ranges of tags settled alone it keeps (for tests of its memory).
    #[cfg(test)]
    fn ranges(&self) -> usize {
        self.alone.0.len()
    }
}

/// A set of tags as disjoint, non-adjacent ranges: start → end, inclusive.
#[derive(Debug, Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, tag: u64) {
        let below = self.0.range(..=tag).next_back().map(|(s, e)| (*s, *e));
        let above = self.0.get(&(tag + 1)).copied().map(|end| (tag + 1, end));
        match (below, above) {
            (Some((_, end)), _) if end >= tag => {}
            (Some((start, end)), Some((next, next_end))) if end + 1 == tag => {
                self.0.remove(&next);
                self.0.insert(start, next_end);
            }
            (Some((start, end)), None) if end + 1 == tag => {
                self.0.insert(start, tag);
            }
            (_, Some((next, next_end))) => {
                self.0.remove(&next);
                self.0.insert(tag, next_end);
            }
            _ => {
                self.0.insert(tag, tag);
            }
        }
    }

    /// Removes the range that starts at `tag`, returning its end.
    fn take_from(&mut self, tag: u64) -> Option<u64> {
        match self.0.first_key_value() {
            Some((&start, &end)) if start == tag => {
                self.0.remove(&start);
                Some(end)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Takes the window's acks as the broker would apply them, checking each: a multiple ack
    /// may only reach tags that are settled (finished, or settled alone), and a finished tag is
    /// acked once.
    fn apply(
        window: &mut AckWindow,
        finished: &BTreeSet<u64>,
        alone: &BTreeSet<u64>,
        acked: &mut BTreeSet<u64>,
    ) -> Result<(), TestCaseError> {
        for ack in window.take_acks() {
            let covered: Vec<u64> = match ack {
                Ack::Through(tag) => {
                    for t in 1..=tag {
                        prop_assert!(
                            finished.contains(&t) || alone.contains(&t),
                            "a multiple ack through {} covers {}, which has not finished",
                            tag,
                            t
                        );
                    }
                    (1..=tag)
                        .filter(|t| finished.contains(t) && !acked.contains(t))
                        .collect()
                }
                Ack::One(tag) => {
                    prop_assert!(finished.contains(&tag), "{} acked unfinished", tag);
                    prop_assert!(!acked.contains(&tag), "{} acked twice", tag);
                    vec![tag]
                }
            };
            acked.extend(covered);
        }
        Ok(())
    }

    proptest! {
        /// Coalescing takes the acks at arbitrary moments (a full window, the timer, the end):
        /// whenever they are taken, they cover only settled deliveries, and once everything is
        /// settled every finished delivery has been acked.
        #[test]
        fn acks_taken_at_any_moment_cover_only_what_finished(
            order in Just((1..=64u64).collect::<Vec<_>>()).prop_shuffle(),
            settled_alone in proptest::collection::vec(any::<bool>(), 64),
            flushes in proptest::collection::vec(any::<bool>(), 64),
        ) {
            let mut window = AckWindow::default();
            let (mut finished, mut alone, mut acked) = Default::default();
            for (i, &tag) in order.iter().enumerate() {
                if settled_alone[i] {
                    window.settled_alone(tag);
                    BTreeSet::insert(&mut alone, tag);
                } else {
                    window.finished(tag);
                    BTreeSet::insert(&mut finished, tag);
                }
                if flushes[i] {
                    apply(&mut window, &finished, &alone, &mut acked)?;
                }
            }
            apply(&mut window, &finished, &alone, &mut acked)?;
            prop_assert_eq!(&acked, &finished);
            prop_assert_eq!(window.waiting(), 0);
        }
    }

    #[test]
    fn the_flush_threshold_is_half_the_prefetch_and_at_least_one() {
        assert_eq!(flush_threshold(64), 32);
        assert_eq!(flush_threshold(3), 1);
        assert_eq!(flush_threshold(1), 1);
        assert_eq!(flush_threshold(0), 1);
    }

    #[test]
    fn a_blocked_task_costs_one_range_however_many_pass_it() {
        let mut window = AckWindow::default();
        // Tag 1 blocks; 100,000 others finish and are acked alone around it.
        for tag in 2..=100_001 {
            window.finished(tag);
            let acks = window.take_acks();
            assert_eq!(acks, vec![Ack::One(tag)]);
        }
        assert_eq!(window.ranges(), 1);
        window.finished(1);
        assert_eq!(window.take_acks(), vec![Ack::Through(1)]);
        assert_eq!(window.ranges(), 0, "all settled: nothing kept");
        window.finished(100_002);
        assert_eq!(window.take_acks(), vec![Ack::Through(100_002)]);
    }

    #[test]
    fn ranges_merge_and_split_correctly() {
        let mut ranges = Ranges::default();
        for tag in [5, 7, 6, 10, 9, 1] {
            ranges.insert(tag);
        }
        assert_eq!(
            ranges.0.iter().map(|(s, e)| (*s, *e)).collect::<Vec<_>>(),
            [(1, 1), (5, 7), (9, 10)]
        );
        ranges.insert(8);
        assert_eq!(
            ranges.0.iter().map(|(s, e)| (*s, *e)).collect::<Vec<_>>(),
            [(1, 1), (5, 10)]
        );
        assert_eq!(ranges.take_from(1), Some(1));
        assert_eq!(ranges.take_from(2), None);
        assert_eq!(ranges.take_from(5), Some(10));
    }

    #[test]
    fn contiguous_run_is_one_multiple_ack() {
        let mut window = AckWindow::default();
        for tag in [2, 1, 3] {
            window.finished(tag);
        }
        assert_eq!(window.take_acks(), vec![Ack::Through(3)]);
        assert_eq!(window.take_acks(), vec![]);
    }

    #[test]
    fn finished_behind_a_gap_is_acked_alone_and_never_again() {
        let mut window = AckWindow::default();
        window.finished(1);
        window.finished(3);
        window.finished(4);
        assert_eq!(
            window.take_acks(),
            vec![Ack::Through(1), Ack::One(3), Ack::One(4)]
        );
        window.finished(2);
        // 3 and 4 were acked alone: the multiple ack ends at 2, which covers only 2.
        assert_eq!(window.take_acks(), vec![Ack::Through(2)]);
        window.finished(5);
        assert_eq!(window.take_acks(), vec![Ack::Through(5)]);
    }

    #[test]
    fn requeued_tags_are_skipped_not_acked() {
        let mut window = AckWindow::default();
        window.settled_alone(1);
        window.finished(2);
        assert_eq!(window.take_acks(), vec![Ack::Through(2)]);
        window.settled_alone(3);
        assert_eq!(window.take_acks(), vec![]);
        window.finished(4);
        assert_eq!(window.take_acks(), vec![Ack::Through(4)]);
    }

    #[test]
    fn a_run_ending_in_a_tag_settled_alone_acks_up_to_the_last_finished_one() {
        let mut window = AckWindow::default();
        window.finished(2);
        window.settled_alone(3);
        assert_eq!(window.take_acks(), vec![Ack::One(2)]);
        window.finished(1);
        assert_eq!(window.take_acks(), vec![Ack::Through(1)]);
    }
}
