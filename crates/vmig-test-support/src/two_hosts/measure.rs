//! Measuring the link as a test checks its shaping: a bulk TCP transfer from A to B (the rate
//! it reaches, the segments A's TCP retransmitted, what the link dropped meanwhile) and a TCP
//! ping-pong (the round trip). Both run on threads inside the hosts' namespaces.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{ADDR_B, DirectionStats, Side, TwoHosts};

/// What a bulk transfer from A to B got.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    /// Payload bits per second B received, after the first quarter of the transfer (TCP's
    /// start-up).
    pub bits_per_s: f64,
    /// Payload bytes B received.
    pub bytes: u64,
    /// Segments A's TCP retransmitted (its namespace's `RetransSegs`).
    pub retransmits: u64,
    /// What the link's A-to-B direction did meanwhile.
    pub link: DirectionStats,
}

fn joined<T>(thread: JoinHandle<io::Result<io::Result<T>>>) -> io::Result<T> {
    thread
        .join()
        .map_err(|_| io::Error::other("a measuring thread panicked"))??
}

/// A listener in B; its address comes back once it is bound.
fn serve_in_b<T: Send + 'static>(
    hosts: &TwoHosts,
    serve: impl FnOnce(TcpStream) -> io::Result<T> + Send + 'static,
) -> io::Result<(SocketAddr, JoinHandle<io::Result<io::Result<T>>>)> {
    let (tx, rx) = mpsc::channel();
    let server = hosts.spawn_in(Side::B, move || {
        let listener = TcpListener::bind((ADDR_B, 0))?;
        let _ = tx.send(listener.local_addr()?);
        let (peer, _) = listener.accept()?;
        serve(peer)
    });
    match rx.recv() {
        Ok(addr) => Ok((addr, server)),
        // The thread ended before binding: its error says why.
        Err(_) => Err(joined(server)
            .err()
            .unwrap_or_else(|| io::Error::other("the server in B ended without an address"))),
    }
}

/// The calling thread's namespace's TCP `RetransSegs` (`/proc/thread-self/net/snmp`).
fn retransmitted_segments() -> io::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return Err(io::Error::other("no Tcp lines in /proc/net/snmp"));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RetransSegs")
        .and_then(|(_, value)| value.parse().ok())
        .ok_or_else(|| io::Error::other("no RetransSegs in /proc/net/snmp"))
}

/// Sends from A to B for `duration` as fast as TCP goes.
#[expect(clippy::cast_precision_loss, reason = "a rate")]
pub fn bulk(hosts: &TwoHosts, duration: Duration) -> io::Result<Bulk> {
    let warmup = duration / 4;
    let (addr, server) = serve_in_b(hosts, move |mut peer| {
        let mut buf = vec![0; 1 << 20];
        let (mut bytes, mut first, mut mark) = (0u64, None, None);
        loop {
            let n = peer.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let start = *first.get_or_insert(now);
            if mark.is_none() && now - start >= warmup {
                mark = Some((now, bytes));
            }
            bytes += n as u64;
        }
        let end = Instant::now();
        peer.write_all(b"k")?;
        let (at, before) = mark.ok_or_else(|| {
            io::Error::other(format!("the transfer ended within its first {warmup:?}"))
        })?;
        Ok((
            (bytes - before) as f64 * 8.0 / (end - at).as_secs_f64(),
            bytes,
        ))
    })?;
    let before = hosts.stats()[0];
    let client = hosts.spawn_in(Side::A, move || -> io::Result<u64> {
        let retransmitted = retransmitted_segments()?;
        let mut s = TcpStream::connect(addr)?;
        let chunk = vec![0x5a; 256 << 10];
        let start = Instant::now();
        while start.elapsed() < duration {
            s.write_all(&chunk)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut ack = [0];
        s.read_exact(&mut ack)?;
        Ok(retransmitted_segments()? - retransmitted)
    });
    let retransmits = joined(client)?;
    let (bits_per_s, bytes) = joined(server)?;
    Ok(Bulk {
        bits_per_s,
        bytes,
        retransmits,
        link: hosts.stats()[0].since(&before),
    })
}

/// The median of `count` round trips of one byte from A to B and back (`TCP_NODELAY`).
pub fn round_trip(hosts: &TwoHosts, count: usize) -> io::Result<Duration> {
    let (addr, server) = serve_in_b(hosts, |mut peer| {
        peer.set_nodelay(true)?;
        let mut byte = [0];
        while peer.read(&mut byte)? == 1 {
            peer.write_all(&byte)?;
        }
        Ok(())
    })?;
    let client = hosts.spawn_in(Side::A, move || -> io::Result<Vec<Duration>> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut byte = [0];
        let mut times = Vec::with_capacity(count);
        // One round first: the connection's own start-up is not the link's.
        for i in 0..=count {
            let start = Instant::now();
            s.write_all(&[1])?;
            s.read_exact(&mut byte)?;
            if i > 0 {
                times.push(start.elapsed());
            }
        }
        s.shutdown(Shutdown::Write)?;
        Ok(times)
    });
    let mut times = joined(client)?;
    joined(server)?;
    times.sort();
    times
        .get(times.len() / 2)
        .copied()
        .ok_or_else(|| io::Error::other("no round trips asked"))
}
