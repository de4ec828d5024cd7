//! Reading decision events from the `events` ring buffer.
//!
//! The BPF side never waits for us: when the buffer is full it counts a
//! dropped event (see [`crate::Stats::dropped_events`]) and still decides. So
//! a slow reader loses audit records, never connections.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};

use crate::{
    KernelError,
    abi::{Event, EventError},
    error::map_err,
};

/// A consumer of the decision ring buffer.
///
/// Non-blocking: [`try_next`](Self::try_next) returns `None` when empty. To
/// wait, either register [`as_fd`](AsFd::as_fd) with an event loop (tokio's
/// `AsyncFd`; the fd is readable while records are pending) or call
/// [`next_timeout`](Self::next_timeout). Use one reader at a time: readers
/// of one map share the consumer position.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl EventReader {
    pub(crate) fn open(map_id: u32) -> Result<Self, KernelError> {
        let data = MapData::from_id(map_id).map_err(|e| map_err("events", "open", &e))?;
        let map = Map::from_map_data(data).map_err(|e| map_err("events", "open", &e))?;
        let ring = RingBuf::try_from(map).map_err(|e| map_err("events", "mmap", &e))?;
        Ok(Self { ring })
    }

    /// The next pending event, if any. A record that does not parse is
    /// returned as an error and consumed, so one bad record cannot wedge
    /// the stream.
    pub fn try_next(&mut self) -> Option<Result<Event, EventError>> {
        let item = self.ring.next()?;
        Some(Event::parse(&item))
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, KernelError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.try_next() {
                return Ok(Some(ev?));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.wait(left)?;
        }
    }

    /// Every event pending right now.
    pub fn drain(&mut self) -> Result<Vec<Event>, KernelError> {
        let mut out = Vec::new();
        while let Some(ev) = self.try_next() {
            out.push(ev?);
        }
        Ok(out)
    }

    /// Blocks until the ring buffer has data or `timeout` passes. Returns
    /// whether data is pending.
    pub fn wait(&self, timeout: Duration) -> Result<bool, KernelError> {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(KernelError::Map {
                map: "events",
                op: "poll",
                detail: e.to_string(),
            });
        }
        Ok(r > 0)
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
