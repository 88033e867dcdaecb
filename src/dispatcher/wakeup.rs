//! When the claim loop claims, pauses, arms the doorbell and sleeps: a state machine
//! without I/O, fed with what the loop's statements and pauses returned, answering
//! what to do next.
//!
//! The doorbell protocol it drives (`sql/0002_notify.sql`, `sql/0004_doorbell_gate.sql`,
//! the statements in `claim.rs`): a loop that finds no work arms the doorbell, looks
//! again at once and a few more times over ~100 ms (a producer's commit may land just
//! after the arm), then sleeps until a notification, the next due retry, or the poll
//! tick. The first insert that finds the bell armed disarms it and notifies; the loop it
//! wakes closes the doorbell's gate with its next claim, so that while it is awake
//! inserts do not call the ring function. A polling loop (no LISTEN) never arms, and
//! closes the gate at most once per poll tick.

use std::time::Duration;

use tokio::time::Instant;

/// After a claim that came back short but not empty: wait this long (or for a wake-up)
/// before claiming again, so a steady trickle is claimed in batches rather than one
/// round trip per event.
pub(super) const SHORT_CLAIM_PAUSE: Duration = Duration::from_millis(2);
/// After arming the doorbell and finding nothing: look again after each of these
/// pauses before sleeping. A producer whose INSERT read the doorbell before it was armed
/// but whose COMMIT (a WAL flush, a few ms, more under load) lands after the last look
/// would otherwise wait for the poll tick; a schedule of cheap empty claims catches
/// commits up to ~100 ms late at a small latency cost, and costs producers nothing.
pub(super) const RECHECKS: [Duration; 5] = [
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(60),
];
/// The pause after a first failure; it doubles with each failure that follows.
pub(super) const FIRST_ERROR_DELAY: Duration = Duration::from_millis(100);
/// The longest pause after failures.
pub(super) const MAX_ERROR_DELAY: Duration = Duration::from_secs(5);

/// What ended a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Its own timer.
    Timer,
    /// The wake-up signal: a notification (a producer rang the doorbell), the
    /// listener's (re)connect, or the settler scheduling a retry.
    Woken,
    /// Shutdown.
    Shutdown,
}

/// What the claim loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Claim now, and report [`Wakeup::claimed`] or [`Wakeup::failed`].
    Claim,
    /// Arm the doorbell, and report [`Wakeup::armed`] or [`Wakeup::failed`].
    Arm,
    /// Read when the next known work falls due, and report [`Wakeup::next_due`] or
    /// [`Wakeup::failed`].
    ReadNextDue,
    /// Wait this long (a breather after a short claim, or a recheck after arming) or
    /// until woken; report [`Wakeup::woke`].
    Pause(Duration),
    /// Sleep this long or until woken; report [`Wakeup::woke`]. `poll_tick`: the sleep
    /// lasts a whole poll interval, so its timer is the poll tick.
    Sleep { duration: Duration, poll_tick: bool },
    /// Wait this long after a failure, or until woken; report [`Wakeup::woke`].
    Backoff(Duration),
    /// Stop: shutdown.
    Stop,
}

/// What follows a successful claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AfterClaim {
    /// Close the doorbell's gate now, beside the claimed deliveries.
    pub close_gate: bool,
    /// Then this.
    pub next: Action,
}

/// The loop's belief about the doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bell {
    /// Not armed by this loop since it last slept or woke.
    Unarmed,
    /// Armed by this loop, which has since looked again `rechecks` times.
    Armed { rechecks: usize },
}

/// The claim loop's decisions. Start with [`Action::Claim`].
#[derive(Debug)]
pub(super) struct Wakeup {
    listen: bool,
    poll_interval: Duration,
    bell: Bell,
    /// Woken (in push mode): the doorbell's gate is open for nothing (a producer rang
    /// the bell), so it is closed with the next claim that succeeds.
    close_gate: bool,
    /// When a polling loop last closed the gate.
    gate_closed_at: Option<Instant>,
    /// The pause after the next failure.
    error_delay: Duration,
    /// A failure's pause is under way.
    backing_off: bool,
}

impl Wakeup {
    /// Decisions for a loop that listens for the doorbell (`listen`) or only polls, with
    /// the poll tick `poll_interval`.
    pub(super) fn new(listen: bool, poll_interval: Duration) -> Self {
        Self {
            listen,
            poll_interval,
            bell: Bell::Unarmed,
            close_gate: false,
            gate_closed_at: None,
            error_delay: FIRST_ERROR_DELAY,
            backing_off: false,
        }
    }

    /// A claim made at `at` asked for `want` deliveries and took `got`; `more`: it fanned
    /// out as many events as it could take, so more are probably waiting.
    pub(super) fn claimed(&mut self, got: usize, want: u32, more: bool, at: Instant) -> AfterClaim {
        let close_gate = if self.listen {
            std::mem::take(&mut self.close_gate)
        } else {
            // Polling, nothing opens the gate, but a fresh database starts with it open,
            // and the ring function would run for every insert statement. Close it (a
            // read once it is closed) at most once per tick; an armed bell (a push-mode
            // dispatcher asleep beside this one) keeps it open.
            let due = self
                .gate_closed_at
                .is_none_or(|closed| at.saturating_duration_since(closed) >= self.poll_interval);
            if due {
                self.gate_closed_at = Some(at);
            }
            due
        };
        self.error_delay = FIRST_ERROR_DELAY;
        // A full batch (or a full fan-out of events) means more is probably waiting:
        // claim again at once, whatever the mode.
        let next = if got as u64 >= u64::from(want) || more {
            Action::Claim
        } else if got > 0 {
            // Fresh activity: a later sleep gets the full recheck schedule again.
            if let Bell::Armed { rechecks } = &mut self.bell {
                *rechecks = 0;
            }
            Action::Pause(SHORT_CLAIM_PAUSE)
        } else if !self.listen {
            Action::ReadNextDue
        } else {
            match self.bell {
                // About to sleep: arm the doorbell, then look again at once so nothing
                // committed before the arm is left waiting for the poll tick.
                Bell::Unarmed => Action::Arm,
                Bell::Armed { rechecks } if rechecks < RECHECKS.len() => {
                    self.bell = Bell::Armed {
                        rechecks: rechecks + 1,
                    };
                    Action::Pause(RECHECKS[rechecks])
                }
                Bell::Armed { .. } => Action::ReadNextDue,
            }
        };
        AfterClaim { close_gate, next }
    }

    /// The doorbell is armed.
    pub(super) fn armed(&mut self) -> Action {
        self.bell = Bell::Armed { rechecks: 0 };
        Action::Claim
    }

    /// The next known work falls due in `due` (`None`: nothing is waiting): sleep until
    /// then, the poll tick or a wake-up, whichever comes first.
    pub(super) fn next_due(&mut self, due: Option<Duration>) -> Action {
        self.bell = Bell::Unarmed;
        let duration = due.map_or(self.poll_interval, |due| {
            due.min(self.poll_interval).max(Duration::from_millis(1))
        });
        Action::Sleep {
            duration,
            poll_tick: duration >= self.poll_interval,
        }
    }

    /// A claim failed.
    pub(super) fn failed(&mut self) -> Action {
        let delay = self.error_delay;
        self.error_delay = (delay * 2).min(MAX_ERROR_DELAY);
        self.backing_off = true;
        Action::Backoff(delay)
    }

    /// A pause or sleep ended.
    pub(super) fn woke(&mut self, wake: Wake) -> Action {
        let backing_off = std::mem::take(&mut self.backing_off);
        match wake {
            Wake::Shutdown => Action::Stop,
            Wake::Timer => Action::Claim,
            Wake::Woken if backing_off => Action::Claim,
            // A notification means a producer rang, and so disarmed, the doorbell: it
            // must be armed again before the next sleep, or that sleep would last until
            // the poll tick.
            Wake::Woken => {
                self.bell = Bell::Unarmed;
                self.close_gate = self.listen;
                Action::Claim
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_secs(1);

    fn push() -> Wakeup {
        Wakeup::new(true, POLL)
    }

    fn poll() -> Wakeup {
        Wakeup::new(false, POLL)
    }

    /// A claim (of a batch of 100) that took `got`, now.
    fn claimed(w: &mut Wakeup, got: usize) -> AfterClaim {
        w.claimed(got, 100, false, Instant::now())
    }

    /// An empty claim.
    fn empty(w: &mut Wakeup) -> Action {
        claimed(w, 0).next
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// Drives an idle push-mode loop from an empty claim to its sleep: arm, look again
    /// at once, then after each recheck pause, then read the next due time.
    fn arm_and_recheck(w: &mut Wakeup) {
        assert_eq!(empty(w), Action::Arm);
        assert_eq!(w.armed(), Action::Claim);
        for pause in RECHECKS {
            assert_eq!(empty(w), Action::Pause(pause));
            assert_eq!(w.woke(Wake::Timer), Action::Claim);
        }
        assert_eq!(empty(w), Action::ReadNextDue);
    }

    #[test]
    fn idle_push_loop_arms_rechecks_then_sleeps_until_the_poll_tick() {
        let mut w = push();
        arm_and_recheck(&mut w);
        assert_eq!(
            w.next_due(None),
            Action::Sleep {
                duration: POLL,
                poll_tick: true
            }
        );
        // The tick: the bell may have been rung and not heard (a notification is a
        // hint), so the loop arms it again before the next sleep.
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        arm_and_recheck(&mut w);
    }

    #[test]
    fn sleep_ends_when_the_next_work_falls_due() {
        let mut w = push();
        arm_and_recheck(&mut w);
        assert_eq!(
            w.next_due(Some(ms(300))),
            Action::Sleep {
                duration: ms(300),
                poll_tick: false
            }
        );
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        arm_and_recheck(&mut w);
        // Due already: a short sleep, never a busy loop; due after the tick: the tick.
        assert_eq!(
            w.next_due(Some(Duration::ZERO)),
            Action::Sleep {
                duration: ms(1),
                poll_tick: false
            }
        );
        w.woke(Wake::Timer);
        arm_and_recheck(&mut w);
        assert_eq!(
            w.next_due(Some(POLL * 5)),
            Action::Sleep {
                duration: POLL,
                poll_tick: true
            }
        );
    }

    #[test]
    fn full_claims_claim_again_at_once() {
        for mut w in [push(), poll()] {
            assert_eq!(claimed(&mut w, 100).next, Action::Claim);
            // Fewer deliveries than asked, but as many events as could be fanned out.
            assert_eq!(w.claimed(3, 100, true, Instant::now()).next, Action::Claim);
            assert_eq!(w.claimed(0, 100, true, Instant::now()).next, Action::Claim);
        }
    }

    #[test]
    fn a_short_claim_pauses_briefly_and_restarts_the_rechecks() {
        let mut w = push();
        assert_eq!(claimed(&mut w, 3).next, Action::Pause(SHORT_CLAIM_PAUSE));
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        assert_eq!(empty(&mut w), Action::Arm);
        assert_eq!(w.armed(), Action::Claim);
        assert_eq!(empty(&mut w), Action::Pause(RECHECKS[0]));
        w.woke(Wake::Timer);
        assert_eq!(empty(&mut w), Action::Pause(RECHECKS[1]));
        w.woke(Wake::Timer);
        // A recheck found work: still armed, and the whole schedule again.
        assert_eq!(claimed(&mut w, 1).next, Action::Pause(SHORT_CLAIM_PAUSE));
        w.woke(Wake::Timer);
        for pause in RECHECKS {
            assert_eq!(empty(&mut w), Action::Pause(pause));
            w.woke(Wake::Timer);
        }
        assert_eq!(empty(&mut w), Action::ReadNextDue);
    }

    #[test]
    fn a_notification_disarms_and_closes_the_gate_once() {
        let mut w = push();
        arm_and_recheck(&mut w);
        w.next_due(None);
        // A producer rang: the bell is disarmed, so the loop must arm it before it
        // sleeps again, and the gate is closed with the next claim, once.
        assert_eq!(w.woke(Wake::Woken), Action::Claim);
        let after = claimed(&mut w, 1);
        assert!(after.close_gate);
        assert_eq!(after.next, Action::Pause(SHORT_CLAIM_PAUSE));
        w.woke(Wake::Timer);
        let after = claimed(&mut w, 0);
        assert!(!after.close_gate);
        assert_eq!(after.next, Action::Arm);
    }

    #[test]
    fn a_notification_during_the_rechecks_means_arming_again() {
        let mut w = push();
        assert_eq!(empty(&mut w), Action::Arm);
        w.armed();
        assert_eq!(empty(&mut w), Action::Pause(RECHECKS[0]));
        assert_eq!(w.woke(Wake::Woken), Action::Claim);
        let after = claimed(&mut w, 0);
        assert!(after.close_gate);
        assert_eq!(after.next, Action::Arm);
    }

    #[test]
    fn shutdown_stops_any_pause() {
        let mut w = push();
        assert_eq!(claimed(&mut w, 1).next, Action::Pause(SHORT_CLAIM_PAUSE));
        assert_eq!(w.woke(Wake::Shutdown), Action::Stop);
        let mut w = push();
        arm_and_recheck(&mut w);
        w.next_due(None);
        assert_eq!(w.woke(Wake::Shutdown), Action::Stop);
        let mut w = push();
        w.failed();
        assert_eq!(w.woke(Wake::Shutdown), Action::Stop);
    }

    #[test]
    fn failures_back_off_doubling_to_a_ceiling() {
        let mut w = push();
        let mut pauses = Vec::new();
        for _ in 0..8 {
            let Action::Backoff(pause) = w.failed() else {
                panic!("a failure backs off")
            };
            pauses.push(pause.as_millis());
            assert_eq!(w.woke(Wake::Timer), Action::Claim);
        }
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // A claim that succeeds starts the schedule over.
        claimed(&mut w, 0);
        assert_eq!(w.failed(), Action::Backoff(FIRST_ERROR_DELAY));
    }

    #[test]
    fn a_polling_loop_never_arms() {
        let mut w = poll();
        assert_eq!(empty(&mut w), Action::ReadNextDue);
        assert_eq!(
            w.next_due(None),
            Action::Sleep {
                duration: POLL,
                poll_tick: true
            }
        );
        assert_eq!(w.woke(Wake::Woken), Action::Claim);
        assert_eq!(empty(&mut w), Action::ReadNextDue);
        w.next_due(Some(ms(20)));
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        assert_eq!(claimed(&mut w, 2).next, Action::Pause(SHORT_CLAIM_PAUSE));
    }

    #[test]
    fn a_polling_loop_closes_the_gate_at_most_once_per_tick() {
        let mut w = poll();
        let start = Instant::now();
        let claim =
            |w: &mut Wakeup, got, after| w.claimed(got, 100, false, start + after).close_gate;
        // A fresh database starts with the gate open: the first claim closes it.
        assert!(claim(&mut w, 0, ms(0)));
        assert!(!claim(&mut w, 0, ms(0)));
        assert!(!claim(&mut w, 5, POLL - ms(1)));
        assert!(claim(&mut w, 0, POLL));
        // Wake-ups do not make a polling loop close it any sooner.
        w.woke(Wake::Woken);
        assert!(!claim(&mut w, 0, POLL + ms(1)));
        assert!(claim(&mut w, 100, POLL * 2));
    }

    #[test]
    fn a_push_loop_closes_the_gate_only_after_a_wake_up() {
        let mut w = push();
        for got in [0, 3, 100] {
            assert!(!claimed(&mut w, got).close_gate);
        }
        w.woke(Wake::Woken);
        assert!(claimed(&mut w, 100).close_gate);
        assert!(!claimed(&mut w, 100).close_gate);
    }
}
