//! The state machine: every event from the states it is allowed in and refused in, the
//! preconditions of `policy`, boot classification, and the state file (format, corruption,
//! power cuts during a save).

use super::boot::trial_failure_reason;
use super::*;
use crate::bootinfo::BootInfo;
use crate::failpoint;

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

/// A committed on 1.0.0, nothing in B.
fn fresh() -> State {
    State::new(Slot::A, Some(v("1.0.0")))
}

#[allow(clippy::needless_pass_by_value)]
fn step(s: &State, e: Event) -> State {
    transition(s, &e).unwrap_or_else(|r| panic!("{e:?} refused: {r}"))
}

fn installed_b() -> State {
    let s = step(
        &fresh(),
        Event::InstallStarted {
            slot: Slot::B,
            version: v("1.1.0"),
            security_epoch: 3,
            allow_bad: false,
            booted: None,
        },
    );
    step(&s, Event::Installed { slot: Slot::B, version: v("1.1.0") })
}

fn trial_booted_b() -> State {
    let s = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 100, booted: None });
    step(&s, Event::Booted { slot: Slot::B, tryboot: true })
}

#[test]
fn channel_sequences_are_kept_per_channel_and_never_lowered() {
    let mut s = fresh();
    assert_eq!(s.channel_sequence("stable"), None);
    s.record_channel_sequence("stable", 7);
    s.record_channel_sequence("stable", 5);
    s.record_channel_sequence("beta", 2);
    assert_eq!((s.channel_sequence("stable"), s.channel_sequence("beta")), (Some(7), Some(2)));
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
    // A file written before the field existed (with the old single field) still reads.
    let mut old: serde_json::Value = serde_json::to_value(fresh()).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("channel_sequences");
    obj.insert("channel_sequence".into(), serde_json::Value::Null);
    let back: State = serde_json::from_value(old).unwrap();
    assert!(back.channel_sequences.is_empty());
}

#[test]
fn the_happy_path_installs_tries_and_commits() {
    let s = installed_b();
    assert_eq!(s.slot(Slot::B).state, SlotState::Installed);
    assert_eq!(s.counters.installs, 1);
    let s = step(&s, Event::TrialStarted { slot: Slot::B, at: 100, booted: None });
    let t = s.trial.clone().unwrap();
    assert_eq!((t.slot, t.phase, t.started), (Slot::B, TrialPhase::Requested, 100));
    assert_eq!(t.version, Some(v("1.1.0")));
    let s = step(&s, Event::Booted { slot: Slot::B, tryboot: true });
    assert_eq!(s.trial.as_ref().unwrap().phase, TrialPhase::Booted);
    let s = step(&s, Event::HealthPassed);
    assert_eq!(s.trial.as_ref().unwrap().phase, TrialPhase::Committing);
    let s = step(&s, Event::Committed { slot: Slot::B });
    assert_eq!(s.committed, Slot::B);
    assert_eq!(s.trial, None);
    assert_eq!(s.slot(Slot::B).state, SlotState::Good);
    assert_eq!(s.slot(Slot::A).state, SlotState::Good);
    assert_eq!(s.security_epoch, 3);
    assert_eq!(s.counters.commits, 1);
    // The next plain boot of B is normal.
    assert_eq!(classify_boot(&s, Slot::B, false), BootCase::Normal);
    s.validate().unwrap();
}

#[test]
fn a_trial_that_never_reached_the_updater_marks_the_slot_bad() {
    let s = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1, booted: None });
    let case = classify_boot(&s, Slot::A, false);
    assert!(matches!(&case, BootCase::TrialFailed { slot: Slot::B, reason }
        if reason.contains("never reached the updater")));
    let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
    assert!(matches!(s.slot(Slot::B).state, SlotState::Bad { .. }));
    assert!(s.bad_versions.contains(&v("1.1.0")));
    assert_eq!(s.counters.rollbacks, 1);
    assert_eq!(s.trial, None);
    assert!(s.last_error.as_deref().unwrap().contains("slot b (1.1.0)"));
    // Never retried automatically.
    let again = Event::InstallStarted {
        slot: Slot::B,
        version: v("1.1.0"),
        security_epoch: 3,
        allow_bad: false,
        booted: None,
    };
    assert_eq!(transition(&s, &again), Err(Refusal::BadVersion(v("1.1.0"))));
    assert_eq!(
        transition(&s, &Event::TrialStarted { slot: Slot::B, at: 2, booted: None }),
        Err(Refusal::SlotBad(Slot::B))
    );
    // An operator may ask for it.
    let forced = Event::InstallStarted {
        slot: Slot::B,
        version: v("1.1.0"),
        security_epoch: 3,
        allow_bad: true,
        booted: None,
    };
    assert_eq!(transition(&s, &forced).unwrap().slot(Slot::B).state, SlotState::Installing);
}

#[test]
fn a_trial_that_booted_and_then_reset_marks_the_slot_bad() {
    let s = trial_booted_b();
    let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
    match &s.slot(Slot::B).state {
        SlotState::Bad { reason } => assert!(reason.contains("ended before it was committed")),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.counters.rollbacks, 1);
}

#[test]
fn failed_checks_and_deadlines_mark_bad_at_once() {
    let s = step(&trial_booted_b(), Event::HealthFailed { check: "data-writable".into() });
    assert_eq!(
        s.slot(Slot::B).state,
        SlotState::Bad { reason: "health check failed: data-writable".into() }
    );
    assert_eq!((s.counters.rollbacks, s.counters.health_failures), (1, 1));
    assert_eq!(s.trial, None);
    // The plain reboot that follows lands on A: a normal boot.
    assert_eq!(classify_boot(&s, Slot::A, false), BootCase::Normal);

    let s = step(&trial_booted_b(), Event::Deadline { failing: "clock".into() });
    assert!(
        matches!(&s.slot(Slot::B).state, SlotState::Bad { reason } if reason.contains("deadline"))
    );
}

#[test]
fn health_events_need_a_booted_trial() {
    let requested =
        step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1, booted: None });
    for e in [
        Event::HealthPassed,
        Event::HealthFailed { check: "x".into() },
        Event::Deadline { failing: "x".into() },
        Event::Committed { slot: Slot::B },
    ] {
        assert_eq!(transition(&fresh(), &e), Err(Refusal::NoTrial), "{e:?}");
        assert_eq!(transition(&requested, &e), Err(Refusal::TrialNotBooted(Slot::B)), "{e:?}");
    }
    assert_eq!(
        transition(&trial_booted_b(), &Event::Committed { slot: Slot::A }),
        Err(Refusal::TrialPending(Slot::B))
    );
}

#[test]
fn a_commit_whose_autoboot_write_landed_is_finished_at_the_next_boot() {
    let s = step(&trial_booted_b(), Event::HealthPassed);
    assert_eq!(classify_boot(&s, Slot::B, false), BootCase::CommitLanded { slot: Slot::B });
    let s = step(&s, Event::Booted { slot: Slot::B, tryboot: false });
    assert_eq!((s.committed, s.trial.clone()), (Slot::B, None));
    assert_eq!(s.slot(Slot::B).state, SlotState::Good);
}

#[test]
fn a_commit_whose_autoboot_write_did_not_land_keeps_the_slot_installed() {
    let s = step(&trial_booted_b(), Event::HealthPassed);
    assert_eq!(classify_boot(&s, Slot::A, false), BootCase::CommitInterrupted { slot: Slot::B });
    let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
    assert_eq!((s.committed, s.trial.clone()), (Slot::A, None));
    assert_eq!(s.slot(Slot::B).state, SlotState::Installed);
    assert!(s.bad_versions.is_empty());
    assert_eq!(s.counters.rollbacks, 0);
    // It can be tried again.
    step(&s, Event::TrialStarted { slot: Slot::B, at: 5, booted: None });
}

#[test]
fn plain_boots_of_the_wrong_slot_are_counted_not_adopted() {
    let committed_b =
        step(&step(&trial_booted_b(), Event::HealthPassed), Event::Committed { slot: Slot::B });
    // A torn autoboot.txt: the partition walk boots A.
    assert_eq!(
        classify_boot(&committed_b, Slot::A, false),
        BootCase::NotCommitted { slot: Slot::A, committed: Slot::B }
    );
    let s = step(&committed_b, Event::Booted { slot: Slot::A, tryboot: false });
    let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
    assert_eq!((s.committed, s.counters.wrong_slot_boots), (Slot::B, 2));
    let s = step(&s, Event::Booted { slot: Slot::B, tryboot: false });
    assert_eq!(s.counters.wrong_slot_boots, 0);
    // A trial slot booted plainly before any commit: not adopted either.
    let requested =
        step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1, booted: None });
    assert_eq!(
        classify_boot(&requested, Slot::B, false),
        BootCase::NotCommitted { slot: Slot::B, committed: Slot::A }
    );
}

#[test]
fn tryboot_without_a_trial_is_refused() {
    assert_eq!(
        transition(&installed_b(), &Event::Booted { slot: Slot::B, tryboot: true }),
        Err(Refusal::UnexpectedTryboot(Slot::B))
    );
    // The committed slot with the flag (both autoboot sections equal) is harmless.
    assert_eq!(classify_boot(&fresh(), Slot::A, true), BootCase::Normal);
}

#[test]
fn a_tryboot_that_lands_on_the_committed_slot_fails_the_trial() {
    let s = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1, booted: None });
    assert!(matches!(
        classify_boot(&s, Slot::A, true),
        BootCase::TrialFailed { slot: Slot::B, .. }
    ));
}

#[test]
fn booted_is_idempotent_within_a_trial() {
    let s = trial_booted_b();
    assert_eq!(step(&s, Event::Booted { slot: Slot::B, tryboot: true }), s);
    let committing = step(&s, Event::HealthPassed);
    assert_eq!(step(&committing, Event::Booted { slot: Slot::B, tryboot: true }), committing);
    assert_eq!(step(&committing, Event::HealthPassed), committing);
}

#[test]
fn installs_are_refused_into_the_committed_slot_or_during_a_trial() {
    let e = |slot| Event::InstallStarted {
        slot,
        version: v("2.0.0"),
        security_epoch: 0,
        allow_bad: false,
        booted: None,
    };
    assert_eq!(transition(&fresh(), &e(Slot::A)), Err(Refusal::Committed(Slot::A)));
    assert_eq!(transition(&trial_booted_b(), &e(Slot::B)), Err(Refusal::TrialPending(Slot::B)));
    // Installed must match the install that started.
    assert!(matches!(
        transition(&fresh(), &Event::Installed { slot: Slot::B, version: v("2.0.0") }),
        Err(Refusal::NotInstalling { slot: Slot::B, state: "empty", .. })
    ));
    let started = step(&fresh(), e(Slot::B));
    assert!(transition(&started, &Event::Installed { slot: Slot::B, version: v("2.0.1") }).is_err());
}

#[test]
fn trials_need_an_installed_non_committed_slot() {
    let at = 9;
    assert_eq!(
        transition(&fresh(), &Event::TrialStarted { slot: Slot::A, at, booted: None }),
        Err(Refusal::Committed(Slot::A))
    );
    assert_eq!(
        transition(&fresh(), &Event::TrialStarted { slot: Slot::B, at, booted: None }),
        Err(Refusal::NothingInstalled(Slot::B))
    );
    let requested =
        step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1, booted: None });
    // Asking again before the reboot happened is fine; after it booted, not.
    assert_eq!(
        step(&requested, Event::TrialStarted { slot: Slot::B, at, booted: None })
            .trial
            .unwrap()
            .started,
        at
    );
    assert_eq!(
        transition(&trial_booted_b(), &Event::TrialStarted { slot: Slot::B, at, booted: None }),
        Err(Refusal::TrialPending(Slot::B))
    );
}

#[test]
fn mark_good_commits_a_booted_trial_or_clears_a_bad_mark() {
    let s = step(&trial_booted_b(), Event::MarkGood { slot: Slot::B });
    assert_eq!(s.trial.unwrap().phase, TrialPhase::Committing);
    let requested =
        step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1, booted: None });
    assert_eq!(
        transition(&requested, &Event::MarkGood { slot: Slot::B }),
        Err(Refusal::TrialNotBooted(Slot::B))
    );
    let bad = step(&installed_b(), Event::MarkBad { slot: Slot::B, reason: "broken".into() });
    let cleared = step(&bad, Event::MarkGood { slot: Slot::B });
    assert_eq!(cleared.slot(Slot::B).state, SlotState::Installed);
    assert!(cleared.bad_versions.is_empty());
    assert_eq!(
        transition(&fresh(), &Event::MarkGood { slot: Slot::B }),
        Err(Refusal::NothingInstalled(Slot::B))
    );
    assert_eq!(step(&fresh(), Event::MarkGood { slot: Slot::A }), fresh());
    assert_eq!(step(&installed_b(), Event::MarkGood { slot: Slot::B }), installed_b());
}

#[test]
fn mark_bad_refuses_the_committed_or_empty_slot_and_ends_a_trial() {
    assert_eq!(
        transition(&fresh(), &Event::MarkBad { slot: Slot::A, reason: "x".into() }),
        Err(Refusal::Committed(Slot::A))
    );
    assert_eq!(
        transition(&fresh(), &Event::MarkBad { slot: Slot::B, reason: "x".into() }),
        Err(Refusal::NothingInstalled(Slot::B))
    );
    let s = step(&trial_booted_b(), Event::MarkBad { slot: Slot::B, reason: "operator".into() });
    assert_eq!(s.trial, None);
    assert_eq!(s.slot(Slot::B).state, SlotState::Bad { reason: "operator".into() });
    assert!(s.bad_versions.contains(&v("1.1.0")));
}

/// Every (pending trial phase, booted slot, tryboot flag) with A committed and a trial of
/// B, and what it means.
#[test]
fn boot_classification_table() {
    use BootCase::*;
    use TrialPhase::*;
    let reason = |phase| {
        let t = Trial { slot: Slot::B, version: Some(v("1.1.0")), started: 1, phase };
        trial_failure_reason(&t, Slot::A)
    };
    let nc = |slot| NotCommitted { slot, committed: Slot::A };
    let table: [(Option<TrialPhase>, Slot, bool, BootCase); 16] = [
        (None, Slot::A, false, Normal),
        (None, Slot::A, true, Normal),
        (None, Slot::B, false, nc(Slot::B)),
        (None, Slot::B, true, UnexpectedTryboot { slot: Slot::B }),
        (Some(Requested), Slot::A, false, TrialFailed { slot: Slot::B, reason: reason(Requested) }),
        (Some(Requested), Slot::A, true, TrialFailed { slot: Slot::B, reason: reason(Requested) }),
        (Some(Requested), Slot::B, false, nc(Slot::B)),
        (Some(Requested), Slot::B, true, TrialBoot { slot: Slot::B }),
        (Some(Booted), Slot::A, false, TrialFailed { slot: Slot::B, reason: reason(Booted) }),
        (Some(Booted), Slot::A, true, TrialFailed { slot: Slot::B, reason: reason(Booted) }),
        (Some(Booted), Slot::B, false, nc(Slot::B)),
        (Some(Booted), Slot::B, true, TrialBoot { slot: Slot::B }),
        (Some(Committing), Slot::A, false, CommitInterrupted { slot: Slot::B }),
        (Some(Committing), Slot::A, true, CommitInterrupted { slot: Slot::B }),
        (Some(Committing), Slot::B, false, CommitLanded { slot: Slot::B }),
        (Some(Committing), Slot::B, true, TrialBoot { slot: Slot::B }),
    ];
    for (phase, slot, tryboot, want) in table {
        let mut s = installed_b();
        s.trial = phase.map(|phase| Trial {
            slot: Slot::B,
            version: Some(v("1.1.0")),
            started: 1,
            phase,
        });
        assert_eq!(classify_boot(&s, slot, tryboot), want, "{phase:?} {slot} {tryboot}");
        // And the transition agrees with the case.
        match (transition(&s, &Event::Booted { slot, tryboot }), &want) {
            (Err(Refusal::UnexpectedTryboot(_)), UnexpectedTryboot { .. }) => {}
            (Ok(n), TrialFailed { .. }) => {
                assert!(
                    n.trial.is_none() && matches!(n.slot(Slot::B).state, SlotState::Bad { .. })
                );
            }
            (Ok(n), CommitInterrupted { .. }) => {
                assert!(n.trial.is_none() && n.committed == Slot::A);
                assert_eq!(n.slot(Slot::B).state, SlotState::Installed);
            }
            (Ok(n), CommitLanded { .. }) => assert_eq!((n.committed, n.trial), (Slot::B, None)),
            (Ok(n), TrialBoot { .. }) => assert_ne!(n.trial.unwrap().phase, Requested),
            (Ok(n), NotCommitted { .. }) => assert_eq!(n.counters.wrong_slot_boots, 1),
            (Ok(n), Normal) => assert_eq!(n, s),
            (other, want) => panic!("{want:?}: {other:?}"),
        }
    }
}

#[test]
fn repairs_are_counted() {
    assert_eq!(step(&fresh(), Event::AutobootRepaired).counters.repairs, 1);
}

/// Every event from every reachable state either is refused or keeps the invariants.
#[test]
fn no_event_sequence_breaks_the_invariants() {
    let events = |at| {
        let mut es = vec![Event::HealthPassed, Event::AutobootRepaired];
        for slot in Slot::ALL {
            es.extend([
                Event::InstallStarted {
                    slot,
                    version: v("2.0.0"),
                    security_epoch: 1,
                    allow_bad: false,
                    booted: None,
                },
                Event::Installed { slot, version: v("2.0.0") },
                Event::TrialStarted { slot, at, booted: None },
                Event::Booted { slot, tryboot: false },
                Event::Booted { slot, tryboot: true },
                Event::Committed { slot },
                Event::MarkGood { slot },
                Event::MarkBad { slot, reason: "r".into() },
            ]);
        }
        es.extend([
            Event::HealthFailed { check: "c".into() },
            Event::Deadline { failing: "c".into() },
        ]);
        es
    };
    let mut seen = vec![fresh(), State::new(Slot::B, None)];
    let mut frontier = seen.clone();
    for depth in 0..6u64 {
        let mut next = Vec::new();
        for s in &frontier {
            for e in events(depth) {
                if let Ok(n) = transition(s, &e) {
                    n.validate().unwrap_or_else(|m| panic!("{e:?} from {s:?}: {m}"));
                    // A parsed-back state is the same state.
                    let json = serde_json::to_vec(&n).unwrap();
                    assert_eq!(parse(Path::new("s"), &json).unwrap(), n);
                    if !seen.contains(&n) {
                        seen.push(n.clone());
                        next.push(n);
                    }
                }
            }
        }
        frontier = next;
    }
    assert!(seen.len() > 30, "explored {} states", seen.len());
}

#[test]
fn newer_formats_are_refused_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let newer = br#"{"format": 2, "committed": "a", "future": true}"#;
    std::fs::write(&path, newer).unwrap();
    let e = load(&path).unwrap_err();
    assert!(matches!(e, LoadError::Newer { found: 2, supported: 1, .. }));
    assert!(e.to_string().contains("newer than this updater"), "{e}");
    let e = save(&path, &fresh()).unwrap_err();
    assert!(e.to_string().contains("newer"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), newer);
}

#[test]
fn corrupt_files_are_reported_and_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    for bad in [
        &b"{\"format\": 1, \"committed\": "[..],
        b"",
        b"[1,2]",
        br#"{"format": "one"}"#,
        br#"{"format": 0, "committed": "a"}"#,
        br#"{"format": 1, "committed": "c", "slots": {}}"#,
    ] {
        std::fs::write(&path, bad).unwrap();
        assert!(matches!(load(&path), Err(LoadError::Corrupt { .. })), "{bad:?}");
    }
    // A parseable file that breaks an invariant is corrupt too.
    let mut s = trial_booted_b();
    s.committed = Slot::B;
    std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
    assert!(load(&path).unwrap_err().to_string().contains("trial slot b is the committed"));
    let b1 = keep_corrupt(&path).unwrap();
    std::fs::write(&path, b"x").unwrap();
    let b2 = keep_corrupt(&path).unwrap();
    assert!(b1.ends_with("state.json.corrupt-1") && b2.ends_with("state.json.corrupt-2"));
    assert_eq!(std::fs::read(&b2).unwrap(), b"x");
    assert!(load(&path).unwrap().is_none());
}

#[test]
fn saves_round_trip_and_ignore_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path());
    let s = trial_booted_b();
    save(&path, &s).unwrap();
    assert_eq!(load(&path).unwrap(), Some(s.clone()));
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["added_later"] = serde_json::json!(1);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(load(&path).unwrap(), Some(s));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"format\": 1") || text.contains("\"format\":1"));
}

#[test]
fn a_power_cut_during_a_save_leaves_the_old_or_the_new_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(dir.path());
    let old = fresh();
    save(&path, &old).unwrap();
    let new = installed_b();
    failpoint::record();
    save(&path, &new).unwrap();
    let names = failpoint::recorded();
    assert_eq!(names, SAVE_FAILPOINTS);
    for name in &names {
        for torn in [None, Some(0), Some(17)] {
            save(&path, &old).unwrap();
            failpoint::arm(name, torn);
            let e = save(&path, &new).unwrap_err();
            assert!(e.downcast_ref::<failpoint::PowerCut>().is_some(), "{e:#}");
            let found = load(&path).unwrap().unwrap();
            assert!(found == old || found == new, "{name}");
            if name == "state.after-rename" || name == "state.after-dir-fsync" {
                assert_eq!(found, new, "{name}");
            }
        }
    }
    failpoint::disarm();
}

fn at(slot: Slot, tryboot: bool) -> BootInfo {
    use crate::bootinfo::BootInfoSource;
    BootInfo { partition: slot.boot().number, tryboot, source: BootInfoSource::KernelCmdline }
}

/// Installs and trials start only from the committed slot booted plainly; where the system
/// booted unknown (a host on an image file) is allowed. One rule for both, in `policy`.
#[test]
fn installs_and_trials_start_only_from_the_committed_plain_boot() {
    let install = |booted| Event::InstallStarted {
        slot: Slot::B,
        version: v("2.0.0"),
        security_epoch: 0,
        allow_bad: false,
        booted,
    };
    let trial = |booted| Event::TrialStarted { slot: Slot::B, at: 1, booted };
    for wrong in [at(Slot::B, false), at(Slot::A, true), at(Slot::B, true)] {
        let r = transition(&fresh(), &install(Some(wrong))).unwrap_err();
        assert_eq!(
            r,
            Refusal::NotFromCommitted {
                booted: wrong,
                committed: Slot::A,
                action: Action::Install
            }
        );
        assert_eq!(
            r.to_string(),
            format!("booted {wrong}, not committed slot a: installs run from the committed slot")
        );
        let r = transition(&installed_b(), &trial(Some(wrong))).unwrap_err();
        assert_eq!(
            r.to_string(),
            format!("booted {wrong}, not committed slot a: a trial starts from the committed slot")
        );
        // Asked before anything else: the daemon's early check refuses it the same way.
        assert!(matches!(
            policy::install_target(&trial_booted_b(), Some(&wrong)),
            Err(Refusal::NotFromCommitted { .. })
        ));
    }
    for fine in [Some(at(Slot::A, false)), None] {
        assert_eq!(step(&fresh(), install(fine)).slot(Slot::B).state, SlotState::Installing);
        assert!(step(&installed_b(), trial(fine)).trial.is_some());
        assert_eq!(policy::install_target(&fresh(), fine.as_ref()), Ok(Slot::B));
    }
    assert_eq!(
        policy::install_target(&trial_booted_b(), Some(&at(Slot::A, false))),
        Err(Refusal::TrialPending(Slot::B))
    );
}

/// The commit's precondition, asked by the flow before it writes `autoboot.txt` and by
/// `transition` when the commit is recorded.
#[test]
fn only_a_trial_whose_checks_passed_is_ready_to_commit() {
    assert_eq!(policy::ready_to_commit(&fresh()), Err(Refusal::NoTrial));
    assert_eq!(policy::ready_to_commit(&trial_booted_b()), Err(Refusal::TrialNotBooted(Slot::B)));
    let passed = step(&trial_booted_b(), Event::HealthPassed);
    assert_eq!(policy::ready_to_commit(&passed).unwrap().slot, Slot::B);
    assert_eq!(
        transition(&passed, &Event::Committed { slot: Slot::A }),
        Err(Refusal::TrialPending(Slot::B))
    );
    assert_eq!(step(&passed, Event::Committed { slot: Slot::B }).committed, Slot::B);
}
