//! Sending the fan-out's datagrams: many listeners' packets per system call.
//!
//! A frame for N listeners makes N datagrams to N addresses at once. On Linux they leave in
//! batches through `sendmmsg(2)`, one call per [`BATCH`] packets instead of one `sendto` each.
//! Hand-written because neither tokio nor socket2 offers a multi-destination batch send
//! (quinn-udp batches by GSO, which needs one destination). Elsewhere, one `send_to` each.

use std::io;

use str0m::net::Transmit;
use tokio::net::UdpSocket;

/// Datagrams per `sendmmsg` call. The kernel caps a call at 1024 (UIO_MAXIOV); 64 already
/// amortises the call and keeps the scratch arrays small.
pub const BATCH: usize = 64;

/// What one [`send_all`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams the kernel took.
    pub datagrams: usize,
    /// Datagrams refused (e.g. an unreachable listener); the rest were still sent.
    pub errors: usize,
    /// System calls made.
    pub calls: usize,
}

/// Sends every datagram in `queue`, waiting for the socket when it is full. An error for
/// one destination skips that datagram only.
pub async fn send_all(socket: &UdpSocket, queue: &[Transmit]) -> Sent {
    let mut sent = Sent::default();
    let mut next = 0;
    while next < queue.len() {
        let end = (next + BATCH).min(queue.len());
        let r = socket.try_io(tokio::io::Interest::WRITABLE, || {
            send_batch(socket, &queue[next..end])
        });
        sent.calls += 1;
        match r {
            Ok(n) => {
                sent.datagrams += n;
                next += n.max(1);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    sent.errors += queue.len() - next;
                    return sent;
                }
            }
            Err(e) => {
                // The call failed on its first datagram: that one is lost, the rest go on.
                tracing::debug!(to = %queue[next].destination, "send failed: {e}");
                sent.errors += 1;
                next += 1;
            }
        }
    }
    sent
}

#[cfg(target_os = "linux")]
fn send_batch(socket: &UdpSocket, batch: &[Transmit]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;

    let addrs: Vec<socket2::SockAddr> = batch
        .iter()
        .map(|t| socket2::SockAddr::from(t.destination))
        .collect();
    let mut iovs: Vec<libc::iovec> = batch
        .iter()
        .map(|t| libc::iovec {
            // sendmmsg only reads through this pointer.
            iov_base: t.contents.as_ptr() as *mut libc::c_void,
            iov_len: t.contents.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter()
        .zip(iovs.iter_mut())
        .map(|(addr, iov)| {
            // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = addr.len();
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: every header points into `addrs` and `iovs`, and every iovec into a datagram
    // of `batch`; all of them outlive the call, and the kernel writes only `msg_len`.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            0,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(not(target_os = "linux"))]
fn send_batch(socket: &UdpSocket, batch: &[Transmit]) -> io::Result<usize> {
    socket.try_send_to(&batch[0].contents, batch[0].destination)?;
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::net::Protocol;

    fn transmit(to: std::net::SocketAddr, from: std::net::SocketAddr, n: usize) -> Transmit {
        Transmit {
            proto: Protocol::Udp,
            source: from,
            destination: to,
            contents: vec![n as u8; 20 + n % 7].into(),
        }
    }

    #[tokio::test]
    async fn batches_reach_every_destination_and_survive_a_bad_one() {
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = sender.local_addr().unwrap();
        let mut receivers = Vec::new();
        for _ in 0..3 {
            receivers.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let v6 = "[::1]:9".parse().unwrap(); // wrong family for this socket: refused
        let mut queue = Vec::new();
        for i in 0..150 {
            let to = if i == 70 {
                v6
            } else {
                receivers[i % 3].local_addr().unwrap()
            };
            queue.push(transmit(to, from, i));
        }
        let sent = send_all(&sender, &queue).await;
        assert_eq!(sent.datagrams, 149, "{sent:?}");
        assert_eq!(sent.errors, 1, "{sent:?}");
        assert!(sent.calls < 10, "batched: {sent:?}");
        let mut buf = [0u8; 64];
        for (r, recv) in receivers.iter().enumerate() {
            let mut got = Vec::new();
            while let Ok(Ok((n, _))) = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                recv.recv_from(&mut buf),
            )
            .await
            {
                got.push((buf[0] as usize, n));
            }
            let want: Vec<_> = (0..150)
                .filter(|i| i % 3 == r && *i != 70)
                .map(|i| (i % 256, 20 + i % 7))
                .collect();
            assert_eq!(got, want, "receiver {r} gets its datagrams, in order");
        }
    }
}
