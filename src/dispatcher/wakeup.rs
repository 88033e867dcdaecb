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
//!
//! The loop's view of the bell must never drift from the database's: a loop that
//! sleeps believing the bell armed while a producer has already rung it hears nothing
//! until the poll tick. So the loop believes the bell armed only from an arm that
//! succeeded to the next sleep, and forgets it on any wake-up that was not its own
//! timer (a notification, the listener's reconnect after notifications were lost) and
//! on any failure (the claim, the arm, the next due time): each means arming again
//! before the next sleep.

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
/// The pause after a first failure; it doubles with each failure that follows, up to
/// [`MAX_ERROR_DELAY`] or the poll interval, whichever is shorter: failing or not, the
/// loop looks for work at least once per poll interval.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Bell {
    /// Not armed by this loop since it last slept, woke or failed.
    Unarmed,
    /// Armed by this loop, which has since looked again `rechecks` times.
    Armed { rechecks: usize },
}

/// The claim loop's decisions. Start with [`Action::Claim`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Wakeup {
    listen: bool,
    poll_interval: Duration,
    bell: Bell,
    /// Woken (in push mode): the doorbell's gate is open for nothing (a producer rang
    /// the bell), so it is closed with the next claim that succeeds.
    close_gate: bool,
    /// When a polling loop last closed the gate.
    gate_closed_at: Option<Instant>,
    /// The pause after the next failure. It grows while failures follow each other,
    /// and starts over once the loop makes progress (a claim that took work, or a sleep
    /// reached without a failure, the bell armed in push mode): a claim that succeeds
    /// between arms that fail does not count, or a failing arm would be retried after
    /// the first, shortest pause every time.
    error_delay: Duration,
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
        if got > 0 {
            self.error_delay = FIRST_ERROR_DELAY;
        }
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

    /// The doorbell is armed (the statement succeeded; a failed arm is a failure).
    pub(super) fn armed(&mut self) -> Action {
        self.bell = Bell::Armed { rechecks: 0 };
        Action::Claim
    }

    /// The next known work falls due in `due` (`None`: nothing is waiting): sleep until
    /// then, the poll tick or a wake-up, whichever comes first.
    pub(super) fn next_due(&mut self, due: Option<Duration>) -> Action {
        // Belief in the arm ends with the sleep: after it, the loop arms again (only a
        // read if the bell is still armed) before it sleeps once more.
        self.bell = Bell::Unarmed;
        self.error_delay = FIRST_ERROR_DELAY;
        let duration = due.map_or(self.poll_interval, |due| {
            due.min(self.poll_interval).max(Duration::from_millis(1))
        });
        Action::Sleep {
            duration,
            poll_tick: duration >= self.poll_interval,
        }
    }

    /// A statement failed: the claim, the arm or reading the next due time, whatever
    /// the error (a lost connection, a `lock_timeout` or `statement_timeout`, ...).
    pub(super) fn failed(&mut self) -> Action {
        // The bell's state is unknown (was the arm committed? did the connection's loss
        // also cost the listener notifications?): arm again before sleeping.
        self.bell = Bell::Unarmed;
        let delay = self.error_delay.min(self.poll_interval);
        self.error_delay = (self.error_delay * 2).min(MAX_ERROR_DELAY);
        Action::Backoff(delay)
    }

    /// A pause, sleep or backoff ended.
    pub(super) fn woke(&mut self, wake: Wake) -> Action {
        match wake {
            Wake::Shutdown => Action::Stop,
            Wake::Timer => Action::Claim,
            // A notification means a producer rang, and so disarmed, the doorbell; a
            // reconnect, that rings may have gone unheard. Either way the bell must be
            // armed again before the next sleep, or that sleep would last until the
            // poll tick, whatever pause the wake-up ended.
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

    /// The pauses of `n` failures in a row.
    fn backoffs(w: &mut Wakeup, n: usize) -> Vec<u128> {
        (0..n)
            .map(|_| {
                let Action::Backoff(pause) = w.failed() else {
                    panic!("a failure backs off")
                };
                assert_eq!(w.woke(Wake::Timer), Action::Claim);
                pause.as_millis()
            })
            .collect()
    }

    #[test]
    fn failures_back_off_doubling_to_a_ceiling() {
        let mut w = Wakeup::new(true, Duration::from_secs(3600));
        assert_eq!(
            backoffs(&mut w, 8),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        // Never longer than the poll interval: failing or not, the loop looks for work
        // at least once per tick.
        let mut w = push();
        assert_eq!(backoffs(&mut w, 7), [100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn progress_starts_the_backoff_over() {
        let mut w = push();
        backoffs(&mut w, 3);
        // A claim that took work.
        claimed(&mut w, 1);
        assert_eq!(backoffs(&mut w, 1), [100]);
        // A sleep reached with the bell armed.
        arm_and_recheck(&mut w);
        w.next_due(None);
        w.woke(Wake::Timer);
        assert_eq!(backoffs(&mut w, 1), [100]);
        // Not an empty claim: between arms that fail, it would retry the arm at the
        // first pause forever.
        backoffs(&mut w, 2);
        assert_eq!(empty(&mut w), Action::Arm);
        assert_eq!(w.failed(), Action::Backoff(ms(800)));
    }

    /// The fault behind a push path lost after a connection loss: the listener's
    /// reconnect wake-up arrived while the loop paused after a failed claim, and the
    /// loop went on with its rechecks as if the bell were still armed, then slept on a
    /// bell a producer had rung while nobody listened.
    #[test]
    fn a_wake_up_during_a_failures_pause_means_arming_again() {
        let mut w = push();
        assert_eq!(empty(&mut w), Action::Arm);
        w.armed();
        assert_eq!(empty(&mut w), Action::Pause(RECHECKS[0]));
        w.woke(Wake::Timer);
        assert_eq!(w.failed(), Action::Backoff(FIRST_ERROR_DELAY));
        assert_eq!(w.woke(Wake::Woken), Action::Claim);
        // A producer's event, committed while the listener was down.
        let after = claimed(&mut w, 1);
        assert!(
            after.close_gate,
            "a wake-up is a wake-up, whatever pause it ended"
        );
        w.woke(Wake::Timer);
        assert_eq!(empty(&mut w), Action::Arm);
    }

    #[test]
    fn any_failure_means_arming_again() {
        // A claim that fails in the middle of the rechecks, woken by its timer.
        let mut w = push();
        assert_eq!(empty(&mut w), Action::Arm);
        w.armed();
        empty(&mut w);
        w.woke(Wake::Timer);
        w.failed();
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        assert_eq!(empty(&mut w), Action::Arm);
        // An arm that fails is not an arm.
        assert_eq!(w.failed(), Action::Backoff(ms(200)));
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        assert_eq!(empty(&mut w), Action::Arm);
        // Reading the next due time fails after the rechecks.
        arm_and_recheck(&mut w);
        assert!(matches!(w.failed(), Action::Backoff(_)));
        assert_eq!(w.woke(Wake::Timer), Action::Claim);
        assert_eq!(empty(&mut w), Action::Arm);
    }

    /// The listener wakes the loop after every (re)connect, since notifications sent
    /// while it was down are lost: a wake-up like a notification.
    #[test]
    fn a_reconnect_while_asleep_means_arming_again() {
        let mut w = push();
        arm_and_recheck(&mut w);
        w.next_due(None);
        assert_eq!(w.woke(Wake::Woken), Action::Claim);
        assert_eq!(empty(&mut w), Action::Arm);
        assert_eq!(w.armed(), Action::Claim);
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

    /// What the search in [`every_reachable_state_keeps_the_bell_in_view`] tracks
    /// beside the machine: what really happened since the loop last armed the bell.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Seen {
        /// An arm succeeded, with no wake-up, failure or sleep since.
        armed: bool,
        /// A claim succeeded since that arm.
        looked_again: bool,
    }

    /// Every state the machine can reach, in either mode, from every answer the loop
    /// can give to each action (a claim that is full, short, empty or fails; an arm
    /// that succeeds or fails; a next due time, none, or a failure; a pause ended by
    /// its timer or a wake-up). In each: a push-mode loop sleeps only with the bell
    /// armed and looked at again since, with no wake-up or failure in between; a
    /// polling loop never arms; no sleep or backoff outlasts the poll interval.
    #[test]
    fn every_reachable_state_keeps_the_bell_in_view() {
        use std::collections::HashSet;
        let at = Instant::now();
        for listen in [true, false] {
            let start = (
                Wakeup::new(listen, POLL),
                Action::Claim,
                Seen {
                    armed: false,
                    looked_again: false,
                },
            );
            let mut seen = HashSet::from([start.clone()]);
            let mut todo = vec![start];
            while let Some((w, action, model)) = todo.pop() {
                let mut next = Vec::new();
                match action {
                    Action::Claim => {
                        for (got, more) in [(100, false), (3, false), (0, true), (0, false)] {
                            let mut w = w.clone();
                            let action = w.claimed(got, 100, more, at).next;
                            let model = Seen {
                                looked_again: true,
                                ..model
                            };
                            next.push((w, action, model));
                        }
                    }
                    Action::Arm => {
                        assert!(listen, "a polling loop must never arm");
                        let mut armed = w.clone();
                        let action = armed.armed();
                        next.push((
                            armed,
                            action,
                            Seen {
                                armed: true,
                                looked_again: false,
                            },
                        ));
                    }
                    Action::ReadNextDue => {
                        for due in [None, Some(ms(20)), Some(POLL * 2)] {
                            let mut w = w.clone();
                            let action = w.next_due(due);
                            let Action::Sleep { duration, .. } = action else {
                                panic!("the next due time leads to a sleep: {action:?}")
                            };
                            assert!(duration <= POLL);
                            if listen {
                                assert!(
                                    model.armed && model.looked_again,
                                    "asleep on a bell not armed, or not looked at since: {model:?} {w:?}"
                                );
                            }
                            next.push((
                                w,
                                action,
                                Seen {
                                    armed: false,
                                    ..model
                                },
                            ));
                        }
                    }
                    Action::Pause(_) | Action::Sleep { .. } | Action::Backoff(_) => {
                        if let Action::Backoff(pause) = action {
                            assert!(pause <= POLL.min(MAX_ERROR_DELAY));
                        }
                        let mut timer = w.clone();
                        let action = timer.woke(Wake::Timer);
                        next.push((timer, action, model));
                        let mut woken = w.clone();
                        let action = woken.woke(Wake::Woken);
                        next.push((
                            woken,
                            action,
                            Seen {
                                armed: false,
                                ..model
                            },
                        ));
                        let mut stopped = w.clone();
                        assert_eq!(stopped.woke(Wake::Shutdown), Action::Stop);
                    }
                    Action::Stop => unreachable!("only shutdown stops"),
                }
                // Any statement may fail.
                if matches!(action, Action::Claim | Action::Arm | Action::ReadNextDue) {
                    let mut failed = w.clone();
                    let action = failed.failed();
                    assert!(matches!(action, Action::Backoff(_)));
                    next.push((
                        failed,
                        action,
                        Seen {
                            armed: false,
                            ..model
                        },
                    ));
                }
                for state in next {
                    if seen.insert(state.clone()) {
                        todo.push(state);
                    }
                }
            }
            assert!(seen.len() > 20, "the search went nowhere: {}", seen.len());
        }
    }
}
