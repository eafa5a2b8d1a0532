//! Named failpoints of the slot code (commit, state writes): where tests cut the power.
//!
//! Every write step of a commit and of a state write calls [`hit`] (or [`torn`] for the one
//! write whose bytes may land partially). A test arms one name with [`arm`]; when the code
//! reaches it, the step returns [`PowerCut`] and nothing after it runs, which is what a power
//! cut does to the process. What is on the (file-backed) disk at that moment is what a reboot
//! finds.
//!
//! The arming is per thread, so tests that cut power run in parallel with tests that do not.
//! A thread that hands work to helper threads gives them a [`Handle`], which they [`adopt`]:
//! its failpoints then fire (and are recorded) there too. [`record`] lists the names a run
//! passes through, so a test can loop over all of them.
//!
//! Only the updater's own tests and builds with the `failpoints` feature have them: in a
//! release build [`hit`] and [`torn`] are empty inline functions, nothing can be armed, and
//! neither this module nor the power cut is part of the crate's API (docs/design.md,
//! "Failpoints").

#[cfg(any(test, feature = "failpoints"))]
pub use armed::*;
#[cfg(not(any(test, feature = "failpoints")))]
pub(crate) use off::*;

/// The simulated power cut. Code that meets it stops; tests find it with `downcast_ref`.
/// Without failpoints it is never made: nothing is armed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("power cut at failpoint {0}")]
pub struct PowerCut(pub String);

/// Failpoints off (release builds): every step passes, at no cost.
#[cfg(not(any(test, feature = "failpoints")))]
mod off {
    use super::PowerCut;

    /// A step boundary: always passes.
    #[inline(always)]
    pub(crate) fn hit(_name: &str) -> Result<(), PowerCut> {
        Ok(())
    }

    /// A write of `len` bytes: always written whole.
    #[inline(always)]
    pub(crate) fn torn(_name: &str, _len: usize) -> Option<usize> {
        None
    }

    /// Nothing to share with helper threads.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Handle;

    #[inline(always)]
    pub(crate) fn handle() -> Handle {
        Handle
    }

    #[inline(always)]
    pub(crate) fn adopt(_handle: &Handle) {}
}

/// Failpoints on (the updater's tests, the `failpoints` feature): a per-thread registry.
#[cfg(any(test, feature = "failpoints"))]
mod armed {
    use super::PowerCut;
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Default)]
    struct Armed {
        name: Option<String>,
        /// Hits of `name` to let pass before the cut.
        skip: usize,
        /// For a torn write: how many bytes land before the cut.
        torn_len: Option<usize>,
        recording: Option<Vec<String>>,
    }

    thread_local! {
        static ARMED: RefCell<Arc<Mutex<Armed>>> = RefCell::new(Arc::new(Mutex::new(Armed::default())));
    }

    /// This thread's failpoints, for the helper threads it starts.
    #[derive(Debug, Clone)]
    pub struct Handle(Arc<Mutex<Armed>>);

    /// A [`Handle`] on this thread's failpoints.
    pub fn handle() -> Handle {
        ARMED.with(|a| Handle(a.borrow().clone()))
    }

    /// Makes this (helper) thread share the failpoints of the thread that made `handle`: from now
    /// on [`hit`] and [`torn`] here fire, and are recorded, as if they ran there.
    pub fn adopt(handle: &Handle) {
        ARMED.with(|a| *a.borrow_mut() = handle.0.clone());
    }

    fn with_armed<T>(f: impl FnOnce(&mut Armed) -> T) -> T {
        ARMED.with(|a| f(&mut a.borrow().lock().unwrap_or_else(|e| e.into_inner())))
    }

    /// Arms `name` on this thread: the next time it is hit, the power is cut there. For a write
    /// failpoint, `torn_len` is how many bytes of that write land first.
    pub fn arm(name: &str, torn_len: Option<usize>) {
        arm_after(name, 0, torn_len);
    }

    /// Like [`arm`], but lets the first `skip` hits of `name` pass (for a step that runs more
    /// than once, such as the state writes of one command).
    pub fn arm_after(name: &str, skip: usize, torn_len: Option<usize>) {
        with_armed(|a| {
            a.name = Some(name.to_string());
            a.skip = skip;
            a.torn_len = torn_len;
        });
    }

    /// Disarms this thread's failpoint and stops any recording.
    pub fn disarm() {
        with_armed(|a| *a = Armed::default());
    }

    /// Starts recording the names hit on this thread.
    pub fn record() {
        with_armed(|a| a.recording = Some(Vec::new()));
    }

    /// The names hit since [`record`], in order; stops recording.
    pub fn recorded() -> Vec<String> {
        with_armed(|a| a.recording.take().unwrap_or_default())
    }

    /// Records a hit of `name`; when it is armed (and not skipped), disarms it and returns the
    /// torn length it was armed with.
    fn note(a: &mut Armed, name: &str) -> Option<Option<usize>> {
        if let Some(r) = a.recording.as_mut() {
            r.push(name.to_string());
        }
        if a.name.as_deref() != Some(name) {
            return None;
        }
        if a.skip > 0 {
            a.skip -= 1;
            return None;
        }
        a.name = None;
        Some(a.torn_len)
    }

    /// A step boundary: cuts the power here when `name` is armed.
    pub fn hit(name: &str) -> Result<(), PowerCut> {
        if with_armed(|a| note(a, name)).is_some() {
            return Err(PowerCut(name.to_string()));
        }
        Ok(())
    }

    /// A write of `len` bytes: when `name` is armed, returns how many bytes land before the cut
    /// (all of them when the test gave no length). The caller writes that prefix, then returns
    /// [`PowerCut`].
    pub fn torn(name: &str, len: usize) -> Option<usize> {
        with_armed(|a| note(a, name)).map(|torn_len| torn_len.unwrap_or(len).min(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_failpoint_cuts_once_and_others_pass() {
        arm("x", None);
        assert_eq!(hit("y"), Ok(()));
        assert_eq!(hit("x"), Err(PowerCut("x".into())));
        assert_eq!(hit("x"), Ok(()));
        arm("w", Some(7));
        assert_eq!(torn("v", 512), None);
        assert_eq!(torn("w", 512), Some(7));
        arm("w", Some(900));
        assert_eq!(torn("w", 512), Some(512));
        arm_after("s", 2, None);
        assert_eq!((hit("s"), hit("s")), (Ok(()), Ok(())));
        assert!(hit("s").is_err());
        disarm();
    }

    #[test]
    fn recording_lists_the_names_in_order() {
        record();
        hit("a").unwrap();
        assert_eq!(torn("b", 3), None);
        hit("c").unwrap();
        assert_eq!(recorded(), ["a", "b", "c"]);
        assert!(recorded().is_empty());
    }

    #[test]
    fn arming_is_per_thread() {
        arm("z", None);
        let other = std::thread::spawn(|| hit("z")).join().unwrap();
        assert_eq!(other, Ok(()));
        assert!(hit("z").is_err());
    }

    #[test]
    fn an_adopted_handle_carries_the_arming_to_a_helper_thread() {
        arm("w", Some(5));
        record();
        let h = handle();
        let got = std::thread::spawn(move || {
            // The helper's own failpoints are not armed; once it adopts the handle, the cut
            // fires there, once, and its hits are recorded with the caller's.
            let before = torn("w", 9);
            adopt(&h);
            (before, hit("x").is_ok(), torn("w", 9), torn("w", 9))
        })
        .join()
        .unwrap();
        assert_eq!(got, (None, true, Some(5), None));
        assert_eq!(recorded(), ["x", "w", "w"]);
    }
}
