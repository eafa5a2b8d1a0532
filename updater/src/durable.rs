//! The durable writer: a thread beside a writer that makes what it wrote durable, in order.
//!
//! Used by the updater's install (chunks into a slot partition) and the imager's flash (an image
//! onto a card). The writer writes on its own thread and hands [`Job`]s, in the order of its
//! writes, to a settling thread through a [`Settler`]:
//!
//! - [`Job::Writeback`]: start writing a span back to storage and drop its clean pages, without
//!   waiting ([`drop_pages`], like GNU dd's `oflag=nocache`);
//! - [`Job::Settle`]: wait until a span is on the device ([`make_durable`]), drop its pages,
//!   then tell the [`OnDurable`] hook (the flash's read-back starts there);
//! - [`Job::Checkpoint`]: everything handed on before it has been written; the hook makes it
//!   durable and records it (the install's fsync and resume record).
//!
//! Ownership and errors: [`settle_while`] owns the thread and the hook; the writer only holds
//! the sending end. A hook error stops the thread, which drops its receiving end: the writer's
//! next [`Settler::send`] fails with [`DurableError::Stopped`], and [`settle_while`] returns the
//! hook's error, not that echo. A writer error ends the jobs; those already queued are still
//! done (they name bytes written before the failure). The thread shares the caller's
//! failpoints ([`crate::failpoint::adopt`]).

use std::fs::File;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use thiserror::Error;

/// Bytes `start..end` of a file; `end` `None`: to the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: Option<u64>,
}

impl Span {
    /// `len` bytes at `start`.
    pub fn at(start: u64, len: u64) -> Span {
        Span { start, end: Some(start + len) }
    }

    /// Its length as `sync_file_range` and `posix_fadvise` take it: 0 is "to the end".
    pub fn len(self) -> u64 {
        self.end.map_or(0, |end| end - self.start)
    }

    /// Whether it holds no byte (a span to the end of the file never counts as empty).
    pub fn is_empty(self) -> bool {
        self.end == Some(self.start)
    }

    /// Its end, `u64::MAX` for a span to the end of the file.
    pub fn limit(self) -> u64 {
        self.end.unwrap_or(u64::MAX)
    }
}

/// Work for the settling thread, in the order of the writes.
#[derive(Debug)]
pub enum Job<M> {
    /// Start writing this span back and drop its clean pages; do not wait (advisory).
    Writeback(Span),
    /// Wait until this span is on the device, drop its pages, then [`OnDurable::durable`].
    Settle(Span),
    /// Everything before this job has been written: [`OnDurable::checkpoint`].
    Checkpoint(M),
}

/// Why the durable writer failed.
#[derive(Debug, Error)]
pub enum DurableError {
    /// The settling thread stopped (its error, or the hook's decision, is returned instead).
    #[error("the settling thread stopped")]
    Stopped,
    #[error("syncing {what}")]
    Sync {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the settling thread panicked")]
    Panicked,
}

/// What the settling thread does around its jobs. Every method runs on that thread.
pub trait OnDurable: Send {
    /// What a [`Job::Checkpoint`] carries (e.g. the resume record to save).
    type Mark: Send;
    type Error: Send + From<DurableError>;

    /// Before a [`Job::Settle`] span is made durable: may wait (a reader's back-pressure);
    /// `Ok(false)` stops the thread without an error.
    fn admit(&mut self, _span: Span) -> Result<bool, Self::Error> {
        Ok(true)
    }

    /// A [`Job::Settle`] span is on the device and out of the page cache.
    fn durable(&mut self, _span: Span) -> Result<(), Self::Error> {
        Ok(())
    }

    /// A [`Job::Checkpoint`]: everything queued before it has been written.
    fn checkpoint(&mut self, _mark: Self::Mark) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The thread stops: after the last job, or `failed` after an error.
    fn closed(&mut self, _failed: bool) {}
}

/// A hook that only settles: no read-back, nothing to record at checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct JustSettle<E>(std::marker::PhantomData<fn() -> E>);

impl<E> Default for JustSettle<E> {
    fn default() -> Self {
        JustSettle(std::marker::PhantomData)
    }
}

impl<E: Send + From<DurableError>> OnDurable for JustSettle<E> {
    type Mark = ();
    type Error = E;
}

/// The writer's end of the settling thread.
#[derive(Debug)]
pub struct Settler<M> {
    tx: SyncSender<Job<M>>,
}

impl<M> Settler<M> {
    /// Queues `job`, waiting while `depth` jobs are queued; fails once the thread has stopped.
    pub fn send(&self, job: Job<M>) -> Result<(), DurableError> {
        self.tx.send(job).map_err(|_| DurableError::Stopped)
    }
}

/// The file the jobs are about, and how errors name it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'f> {
    pub file: &'f File,
    pub label: &'f str,
}

/// Runs `write` on this thread with a settling thread beside it that does its [`Job`]s in
/// order, at most `depth` of them queued. Returns the hook's error if the thread failed, else
/// `write`'s result.
pub fn settle_while<H: OnDurable, T>(
    target: Target<'_>,
    depth: usize,
    hook: H,
    write: impl FnOnce(&Settler<H::Mark>) -> Result<T, H::Error>,
) -> Result<T, H::Error> {
    let failpoints = crate::failpoint::handle();
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Job<H::Mark>>(depth.max(1));
        let failpoints = &failpoints;
        let thread = s.spawn(move || {
            crate::failpoint::adopt(failpoints);
            settle(target, hook, rx)
        });
        let written = write(&Settler { tx });
        // `write` has dropped the sender: the thread ends after the jobs queued.
        let settled = thread.join().unwrap_or_else(|_| Err(H::Error::from(DurableError::Panicked)));
        settled.and(written)
    })
}

/// The settling thread: does the jobs in order until the writer is done or one fails.
fn settle<H: OnDurable>(
    target: Target<'_>,
    mut hook: H,
    jobs: Receiver<Job<H::Mark>>,
) -> Result<(), H::Error> {
    let result = (|| {
        for job in jobs {
            match job {
                Job::Writeback(span) => drop_pages(target.file, span),
                Job::Settle(span) => {
                    if !hook.admit(span)? {
                        return Ok(());
                    }
                    make_durable(target.file, span).map_err(|source| DurableError::Sync {
                        what: target.label.to_string(),
                        source,
                    })?;
                    drop_pages(target.file, span);
                    hook.durable(span)?;
                }
                Job::Checkpoint(mark) => hook.checkpoint(mark)?,
            }
        }
        Ok(())
    })();
    hook.closed(result.is_err());
    result
}

/// Drops the cached pages of `span` and queues its dirty ones for writeback, without waiting
/// (`posix_fadvise(DONTNEED)`, like GNU dd's `oflag=nocache`): the storage works while the
/// writer goes on, a later fsync finds little left to do, and a large write does not push the
/// machine's other pages out of the cache. Advisory: errors are ignored.
pub fn drop_pages(file: &File, span: Span) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(span.start), i64::try_from(span.len())) else {
        return;
    };
    let _ = posix_fadvise(file.as_raw_fd(), offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Starts writing the dirty pages of `span` out, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Advisory: where it is not supported, a later
/// [`make_durable`] writes them.
pub fn start_writeback(file: &File, span: Span) {
    let _ = sys::sync_file_range(file, span.start, span.len(), sys::START);
}

/// Makes `span` of `file` durable on the device:
/// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`, or `fdatasync` of the whole file where
/// the file system does not support that.
pub fn make_durable(file: &File, span: Span) -> std::io::Result<()> {
    match sys::sync_file_range(file, span.start, span.len(), sys::WAIT) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE)
            ) =>
        {
            file.sync_data()
        }
        r => r,
    }
}

/// The size of a page of the page cache.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

mod sys {
    //! `sync_file_range(2)`, which neither std nor nix (0.29) wraps.
    #![allow(unsafe_code)]

    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// Starts writing the dirty pages of the range out, without waiting.
    pub const START: libc::c_uint = libc::SYNC_FILE_RANGE_WRITE;
    /// Waits for writes in flight, writes the dirty pages out and waits for them: the range's
    /// data is on the device (not the file's metadata: that is `fsync`'s).
    pub const WAIT: libc::c_uint = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;

    /// `sync_file_range(f, offset, len, flags)`; `len` 0 means to the end of the file.
    pub fn sync_file_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
        let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
        let (offset, len) = (offset.try_into().map_err(invalid)?, len.try_into().map_err(invalid)?);
        // SAFETY: the call takes a descriptor, two offsets and flags and touches no memory of
        // the process; `f` keeps the descriptor open for its duration.
        let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), offset, len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests;
