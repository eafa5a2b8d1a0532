use super::*;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// A sparse 64 MiB temporary file standing in for a disk.
fn disk() -> (tempfile::TempDir, File) {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("disk.img"))
        .unwrap();
    file.set_len(64 << 20).unwrap();
    (dir, file)
}

/// What the settling thread saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Durable(Span, Vec<u8>),
    Checkpoint(u32),
    Closed(bool),
}

/// Records every call; reads each durable span's first bytes back from the disk; fails at the
/// checkpoint `fail_at`, stops before a span starting at `stop_at`.
struct Recorder<'f> {
    file: &'f File,
    seen: Arc<Mutex<Vec<Seen>>>,
    fail_at: Option<u32>,
    stop_at: Option<u64>,
}

impl OnDurable for Recorder<'_> {
    type Mark = u32;
    type Error = anyhow::Error;

    fn admit(&mut self, span: Span) -> anyhow::Result<bool> {
        Ok(self.stop_at != Some(span.start))
    }

    fn durable(&mut self, span: Span) -> anyhow::Result<()> {
        let mut head = vec![0u8; 4];
        self.file.read_exact_at(&mut head, span.start)?;
        self.seen.lock().unwrap().push(Seen::Durable(span, head));
        Ok(())
    }

    fn checkpoint(&mut self, mark: u32) -> anyhow::Result<()> {
        if self.fail_at == Some(mark) {
            anyhow::bail!("checkpoint {mark} failed");
        }
        self.seen.lock().unwrap().push(Seen::Checkpoint(mark));
        Ok(())
    }

    fn closed(&mut self, failed: bool) {
        self.seen.lock().unwrap().push(Seen::Closed(failed));
    }
}

fn recorder(
    file: &File,
    fail_at: Option<u32>,
    stop_at: Option<u64>,
) -> (Recorder<'_>, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    (Recorder { file, seen: seen.clone(), fail_at, stop_at }, seen)
}

/// Writes `n` 1 MiB spans of the byte `i + 1`, settling each and checkpointing after each.
fn write_spans(file: &File, settler: &Settler<u32>, n: u32) -> anyhow::Result<u32> {
    for i in 0..n {
        let span = Span::at(u64::from(i) << 20, 1 << 20);
        file.write_all_at(&vec![i as u8 + 1; 1 << 20], span.start)?;
        start_writeback(file, span);
        settler.send(Job::Writeback(span))?;
        settler.send(Job::Settle(span))?;
        settler.send(Job::Checkpoint(i))?;
    }
    Ok(n)
}

#[test]
fn jobs_are_done_in_order_after_their_bytes_were_written() {
    let (_dir, file) = disk();
    let (hook, seen) = recorder(&file, None, None);
    let target = Target { file: &file, label: "disk.img" };
    let n = settle_while(target, 2, hook, |s| write_spans(&file, s, 5)).unwrap();
    assert_eq!(n, 5);
    let mut want = Vec::new();
    for i in 0..5u32 {
        want.push(Seen::Durable(Span::at(u64::from(i) << 20, 1 << 20), vec![i as u8 + 1; 4]));
        want.push(Seen::Checkpoint(i));
    }
    want.push(Seen::Closed(false));
    assert_eq!(*seen.lock().unwrap(), want);
}

#[test]
fn a_hook_error_stops_the_writer_and_is_the_error_returned() {
    let (_dir, file) = disk();
    let (hook, seen) = recorder(&file, Some(1), None);
    let target = Target { file: &file, label: "disk.img" };
    let mut sent = 0;
    let e = settle_while(target, 1, hook, |s| {
        let r = write_spans(&file, s, 1000);
        // The writer saw the stop as a closed channel, long before its 1000 spans.
        let stopped = r.as_ref().unwrap_err().downcast_ref::<DurableError>();
        assert!(matches!(stopped, Some(DurableError::Stopped)), "{r:?}");
        sent = 1;
        r
    })
    .unwrap_err();
    assert_eq!(sent, 1);
    assert_eq!(e.to_string(), "checkpoint 1 failed");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.last(), Some(&Seen::Closed(true)));
    assert!(seen.len() < 10, "{seen:?}");
    assert!(!seen.contains(&Seen::Checkpoint(1)), "{seen:?}");
}

#[test]
fn a_hook_that_stops_ends_the_writer_without_an_error_of_its_own() {
    let (_dir, file) = disk();
    let (hook, seen) = recorder(&file, None, Some(2 << 20));
    let target = Target { file: &file, label: "disk.img" };
    let e = settle_while(target, 1, hook, |s| write_spans(&file, s, 1000)).unwrap_err();
    assert!(matches!(e.downcast_ref::<DurableError>(), Some(DurableError::Stopped)), "{e}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.iter().filter(|s| matches!(s, Seen::Durable(..))).count(), 2, "{seen:?}");
    assert_eq!(seen.last(), Some(&Seen::Closed(false)));
}

#[test]
fn jobs_queued_before_a_writer_error_are_still_done() {
    let (_dir, file) = disk();
    let (hook, seen) = recorder(&file, None, None);
    let target = Target { file: &file, label: "disk.img" };
    let e = settle_while(target, 8, hook, |s| -> anyhow::Result<()> {
        write_spans(&file, s, 3)?;
        anyhow::bail!("the source broke")
    })
    .unwrap_err();
    assert_eq!(e.to_string(), "the source broke");
    let seen = seen.lock().unwrap();
    assert!(seen.contains(&Seen::Checkpoint(2)), "{seen:?}");
    assert_eq!(seen.last(), Some(&Seen::Closed(false)));
}

/// A hook that cuts the power at its checkpoint, as the install's fsync does.
struct CutAtCheckpoint;

impl OnDurable for CutAtCheckpoint {
    type Mark = ();
    type Error = anyhow::Error;

    fn checkpoint(&mut self, (): ()) -> anyhow::Result<()> {
        crate::failpoint::hit("durable.test-checkpoint")?;
        Ok(())
    }
}

#[test]
fn the_settling_thread_shares_the_callers_failpoints() {
    let (_dir, file) = disk();
    crate::failpoint::arm("durable.test-checkpoint", None);
    let target = Target { file: &file, label: "disk.img" };
    let e =
        settle_while(target, 4, CutAtCheckpoint, |s| Ok(s.send(Job::Checkpoint(()))?)).unwrap_err();
    crate::failpoint::disarm();
    assert_eq!(
        e.downcast_ref::<crate::failpoint::PowerCut>(),
        Some(&crate::failpoint::PowerCut("durable.test-checkpoint".into()))
    );
}

#[test]
fn spans_to_the_end_are_length_zero_and_never_empty() {
    let to_end = Span { start: 4096, end: None };
    assert_eq!((to_end.len(), to_end.limit(), to_end.is_empty()), (0, u64::MAX, false));
    let some = Span::at(4096, 8192);
    assert_eq!((some.len(), some.limit(), some.is_empty()), (8192, 12288, false));
    assert!(Span::at(7, 0).is_empty());
}

#[test]
fn make_durable_and_drop_pages_keep_the_bytes() {
    let (_dir, file) = disk();
    file.write_all_at(b"durable", 5 << 20).unwrap();
    start_writeback(&file, Span::at(5 << 20, 7));
    make_durable(&file, Span { start: 0, end: None }).unwrap();
    drop_pages(&file, Span { start: 0, end: None });
    let mut back = [0u8; 7];
    file.read_exact_at(&mut back, 5 << 20).unwrap();
    assert_eq!(&back, b"durable");
    assert!(page_size() >= 4096 && page_size().is_power_of_two());
}
