//! The subscriber's reorder window: frames arrive on several group streams at once and leave
//! in `seq` order. Pure and sans-IO: the caller passes `now` in.
//!
//! Groups can overtake each other (one waits on a retransmission while the next arrives), so
//! a frame after a gap is held until it is due: [`Reorder::hold`] after it arrived. Then the
//! gap is skipped, and a frame of the gap that turns up later is dropped, since it is older
//! than one already released. A frame that has waited longer than `max_age` (its consumer
//! stopped taking frames) is dropped, and the window spans at most `capacity` frames of `seq`:
//! a consumer that comes back finds the newest frames rather than a backlog.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::wire::Frame;

/// What [`Reorder::pop`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pop {
    /// The next frame to release.
    Ready(Frame),
    /// Frames are waiting behind a gap; ask again at this time (or when one arrives).
    Wait(Instant),
    /// Nothing is waiting.
    Empty,
}

/// Frames waiting to be released in `seq` order.
#[derive(Debug)]
pub(crate) struct Reorder {
    /// The `seq` the next released frame should have; `None` before the first release.
    next: Option<u64>,
    /// Waiting frames by `seq`, with their arrival time.
    pending: BTreeMap<u64, (Frame, Instant)>,
    hold: Duration,
    max_age: Duration,
    capacity: u64,
}

impl Reorder {
    /// A window that waits at most `hold` for a gap, keeps a frame at most `max_age` and spans
    /// at most `capacity` frames.
    pub(crate) fn new(hold: Duration, max_age: Duration, capacity: u64) -> Self {
        Self {
            next: None,
            pending: BTreeMap::new(),
            hold,
            max_age,
            capacity: capacity.max(1),
        }
    }

    /// Drops the frames that arrived more than `max_age` before `now`, and every frame
    /// before them, since released frames stay in order.
    fn expire(&mut self, now: Instant) {
        let stale = self
            .pending
            .iter()
            .filter(|(_, (_, arrived))| now.saturating_duration_since(*arrived) > self.max_age)
            .map(|(seq, _)| *seq)
            .next_back();
        if let Some(last) = stale {
            let floor = last.saturating_add(1);
            self.pending = self.pending.split_off(&floor);
            self.next = Some(self.next.map_or(floor, |n| n.max(floor)));
        }
    }

    /// Takes in a frame that arrived at `now`. Returns false if it was dropped: older than a
    /// frame already released, or a duplicate.
    pub(crate) fn push(&mut self, frame: Frame, now: Instant) -> bool {
        if self.next.is_some_and(|n| frame.seq < n) || self.pending.contains_key(&frame.seq) {
            return false;
        }
        let seq = frame.seq;
        self.pending.insert(seq, (frame, now));
        self.expire(now);
        // Keep the span within capacity by giving up the oldest frames (and any gap among
        // them): they are what a consumer that fell behind can no longer use.
        let newest = self.pending.last_key_value().map_or(seq, |(s, _)| *s);
        let floor = newest.saturating_sub(self.capacity - 1);
        if self.next.is_none_or(|n| n < floor) {
            self.pending = self.pending.split_off(&floor);
            if self.next.is_some() {
                self.next = Some(floor);
            }
        }
        self.pending.contains_key(&seq)
    }

    /// The next frame to release at `now`, if any is due.
    pub(crate) fn pop(&mut self, now: Instant) -> Pop {
        self.expire(now);
        let Some((&seq, (_, arrived))) = self.pending.first_key_value() else {
            return Pop::Empty;
        };
        // In order, or after a gap (or before the first release, when the frames before it
        // may still be on their way) once it has waited its hold.
        let due = *arrived + self.hold;
        if self.next == Some(seq) || now >= due {
            self.next = Some(seq.saturating_add(1));
            return match self.pending.pop_first() {
                Some((_, (frame, _))) => Pop::Ready(frame),
                None => Pop::Empty,
            };
        }
        Pop::Wait(due)
    }

    /// True when no frame is waiting.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const HOLD: Duration = Duration::from_millis(100);
    const AGE: Duration = Duration::from_millis(300);

    fn f(seq: u64) -> Frame {
        Frame {
            seq,
            timestamp: seq.wrapping_mul(960),
            capture_time_us: seq.wrapping_mul(20_000),
            payload: Bytes::from_static(b"x"),
        }
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    /// Pops everything ready at `now`.
    fn drain(w: &mut Reorder, now: Instant) -> (Vec<u64>, Pop) {
        let mut out = Vec::new();
        loop {
            match w.pop(now) {
                Pop::Ready(fr) => out.push(fr.seq),
                other => return (out, other),
            }
        }
    }

    #[test]
    fn in_order_frames_leave_at_once_after_the_first() {
        let t0 = Instant::now();
        let mut w = Reorder::new(HOLD, AGE, 16);
        assert!(w.push(f(10), t0));
        // The first frame waits: an earlier group may still be on its way.
        assert_eq!(w.pop(t0), Pop::Wait(ms(t0, 100)));
        assert!(w.push(f(9), ms(t0, 5)));
        assert_eq!(drain(&mut w, ms(t0, 105)), (vec![9, 10], Pop::Empty));
        for s in 11..20 {
            assert!(w.push(f(s), ms(t0, 200)));
            assert_eq!(drain(&mut w, ms(t0, 200)), (vec![s], Pop::Empty));
        }
    }

    #[test]
    fn a_gap_waits_its_hold_then_is_skipped_and_late_frames_are_dropped() {
        let t0 = Instant::now();
        let mut w = Reorder::new(HOLD, AGE, 16);
        w.push(f(0), t0);
        assert_eq!(drain(&mut w, ms(t0, 100)).0, vec![0]);
        // 1 and 2 are held up; 3 and 4 overtake them.
        w.push(f(3), ms(t0, 110));
        w.push(f(4), ms(t0, 130));
        assert_eq!(drain(&mut w, ms(t0, 150)), (vec![], Pop::Wait(ms(t0, 210))));
        // 1 arrives in time: released, and 2 is still awaited on 3's clock.
        w.push(f(1), ms(t0, 160));
        assert_eq!(
            drain(&mut w, ms(t0, 160)),
            (vec![1], Pop::Wait(ms(t0, 210)))
        );
        // 2 does not: 3 and 4 leave once 3 is due, and 2 is refused when it turns up.
        assert_eq!(drain(&mut w, ms(t0, 210)), (vec![3, 4], Pop::Empty));
        assert!(!w.push(f(2), ms(t0, 220)));
        assert!(!w.push(f(4), ms(t0, 220)), "already released");
        assert!(w.push(f(5), ms(t0, 220)));
        assert_eq!(drain(&mut w, ms(t0, 220)).0, vec![5]);
    }

    #[test]
    fn duplicates_are_refused() {
        let t0 = Instant::now();
        let mut w = Reorder::new(HOLD, AGE, 16);
        assert!(w.push(f(7), t0));
        assert!(!w.push(f(7), t0));
        assert_eq!(drain(&mut w, ms(t0, 100)).0, vec![7]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_consumer_that_stops_taking_frames_finds_only_the_newest() {
        let t0 = Instant::now();
        let mut w = Reorder::new(HOLD, AGE, 16);
        w.push(f(0), t0);
        assert_eq!(drain(&mut w, ms(t0, 100)).0, vec![0]);
        // Three seconds of frames arrive while nobody pops; what is left is what arrived in
        // the last 300 ms, and never more than the capacity of 16.
        for s in 1..=150 {
            w.push(f(s), ms(t0, 100 + s * 20));
            assert!(w.pending.len() <= 16);
        }
        let (got, rest) = drain(&mut w, ms(t0, 3100));
        assert_eq!(rest, Pop::Empty);
        assert_eq!(got, (135..=150).collect::<Vec<_>>());
        for s in 151..=200 {
            w.push(f(s), ms(t0, 100 + s * 20));
        }
        // Taken 10 s later, they are all too old.
        assert_eq!(drain(&mut w, ms(t0, 14_000)), (vec![], Pop::Empty));
        assert!(w.push(f(201), ms(t0, 14_000)));
        assert_eq!(drain(&mut w, ms(t0, 14_000)).0, vec![201]);
        // Older ones that straggle in are refused.
        assert!(!w.push(f(100), ms(t0, 3200)));
    }

    #[test]
    fn a_burst_read_at_once_is_kept_whole_but_an_old_one_is_not() {
        let t0 = Instant::now();
        let mut w = Reorder::new(HOLD, AGE, 64);
        for s in 0..50 {
            w.push(f(s), t0);
        }
        assert_eq!(drain(&mut w, ms(t0, 100)).0, (0..50).collect::<Vec<_>>());
        for s in 50..100 {
            w.push(f(s), ms(t0, 200));
        }
        assert_eq!(drain(&mut w, ms(t0, 501)), (vec![], Pop::Empty));
    }

    #[test]
    fn capacity_also_bounds_a_wait_on_a_gap() {
        let t0 = Instant::now();
        let mut w = Reorder::new(HOLD, AGE * 100, 4);
        w.push(f(0), t0);
        assert_eq!(drain(&mut w, ms(t0, 100)).0, vec![0]);
        // 1 is missing; 2..=6 span five frames, one over capacity: 2 is given up as well.
        for s in 2..=6 {
            w.push(f(s), ms(t0, 100));
        }
        assert_eq!(drain(&mut w, ms(t0, 100)).0, vec![3, 4, 5, 6]);
    }

    #[test]
    fn any_arrival_order_leaves_sorted_without_panicking() {
        let t0 = Instant::now();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200 {
            let mut w = Reorder::new(HOLD, AGE, 1 + round % 20);
            let mut out: Vec<u64> = Vec::new();
            let mut t = 0;
            for _ in 0..100 {
                t += next() % 30;
                let seq = next() % 64 + if round % 2 == 0 { 0 } else { u64::MAX - 64 };
                w.push(f(seq), ms(t0, t));
                while let Pop::Ready(fr) = w.pop(ms(t0, t)) {
                    out.push(fr.seq);
                }
            }
            assert!(out.windows(2).all(|p| p[0] < p[1]), "{out:?}");
        }
    }
}
