//! Who wrote each byte on a Unix stream socket.
//!
//! A Workload API connection belongs to the process that made it. Its
//! descriptor can still reach other processes (a fork that keeps it, an
//! exec'd child, SCM_RIGHTS, pidfd_getfd), and the peer credentials
//! (SO_PEERCRED, SO_PEERPIDFD) only ever name the connector. With
//! SO_PASSCRED set on the listening socket (accepted sockets inherit it,
//! and the kernel attaches credentials even to bytes queued before accept),
//! the kernel stamps every write with the writing process, never merges two
//! writers' bytes into one read, and `recvmsg` reports the writer with each
//! read. [`SenderChecked`] refuses the connection at the first byte some
//! other process wrote.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Sets SO_PASSCRED (on a listener: every accepted socket gets it).
pub fn pass_credentials(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            std::ptr::from_ref(&one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A connection whose reads succeed only for bytes written by `pid`.
pub struct SenderChecked {
    inner: UnixStream,
    pid: i32,
}

impl SenderChecked {
    pub fn new(inner: UnixStream, pid: i32) -> Self {
        SenderChecked { inner, pid }
    }

    /// One recvmsg into `buf`: (bytes, writer pid). A read without
    /// credentials reports pid 0.
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, i32)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one SCM_CREDENTIALS message and a few descriptors a
        // client may pass (SCM_RIGHTS): those are closed below; any that do
        // not fit the kernel closes itself (MSG_CTRUNC).
        let mut cmsg = [0u64; 16];
        // SAFETY: zeroed msghdr is valid; pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&cmsg);
        // SAFETY: a valid fd and msghdr; non-blocking.
        let n = unsafe {
            libc::recvmsg(
                self.inner.as_raw_fd(),
                &raw mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut writer = 0;
        // SAFETY: walking the control buffer the kernel filled, with the
        // CMSG_* accessors and the length it reported.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                    let cred = libc::CMSG_DATA(c).cast::<libc::ucred>().read_unaligned();
                    writer = cred.pid;
                } else if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS
                {
                    // Descriptors were passed to us: close them unread.
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let fds = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    for i in 0..len / size_of::<libc::c_int>() {
                        libc::close(fds.add(i).read_unaligned());
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, writer))
    }
}

impl AsyncRead for SenderChecked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.inner.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let unfilled = buf.initialize_unfilled();
            let res = this
                .inner
                .try_io(tokio::io::Interest::READABLE, || this.recv(unfilled));
            match res {
                Ok((n, writer)) => {
                    if n > 0 && writer != this.pid {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!(
                                "bytes written by pid {writer} on a Workload API connection made by pid {}",
                                this.pid
                            ),
                        )));
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SenderChecked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn bytes_of_another_writer_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        pass_credentials(l.as_fd()).expect("SO_PASSCRED");
        let me = std::process::id() as i32;

        // Written by us, before and after accept: accepted.
        let mut c = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        c.write_all(b"early").await.expect("write");
        let (s, _) = l.accept().await.expect("accept");
        let mut s = SenderChecked::new(s, me);
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.expect("own bytes");
        assert_eq!(&buf, b"early");

        // The same connection written by a child process: refused.
        let fd = c.as_fd().as_raw_fd();
        // SAFETY: fork in a test; the child only writes and _exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: write(2) and _exit(2) only.
            unsafe {
                libc::write(fd, b"child".as_ptr().cast(), 5);
                libc::_exit(0);
            }
        }
        let mut st = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(child, &mut st, 0) };
        let err = s.read(&mut buf).await.expect_err("a child's bytes");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains(&child.to_string()), "{err}");
    }
}
