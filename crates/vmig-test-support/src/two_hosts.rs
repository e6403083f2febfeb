//! Two hosts on one machine: two network namespaces joined by a shaped link, for tests that
//! migrate between a source and a destination that are not on loopback.
//!
//! What it owns, from creation to removal: the namespaces (`vmig2h-PID-N-a` and `-b`, from
//! `ip netns add`), one TUN device in each (`10.199.0.1` in A, `10.199.0.2` in B,
//! point-to-point, MTU 65000 so that few packets carry a lot), and the emulator between them
//! ([`link`]), which shapes the traffic as `tc netem`'s `rate`, `delay` and `loss` would. All
//! of it goes when the [`TwoHosts`] is dropped, a failing test's unwinding included; namespaces
//! a killed test left behind (their process is gone) are removed by the next one.
//!
//! Why not a veth pair with `tc netem` on it: a veth pair joins the namespaces inside the
//! kernel, and only netem can delay or drop there; a kernel without netem (this machine's 6.18:
//! `CONFIG_NET_SCH_NETEM` is not set, `tc` answers "Specified qdisc kind is unknown") has
//! `tbf` and `htb` for the rate and nothing for the delay and the loss. So every packet goes
//! through the emulator in userspace, which does all three; it is the one path the tests take,
//! also where netem exists, so that figures compare between machines. [`TwoHosts::shaping`]
//! says which shaping was used and why, for the test's output.
//!
//! Processes run in a host through `ip netns exec` ([`TwoHosts::command`]); code of the test
//! itself through a thread that enters the namespace ([`TwoHosts::spawn_in`]: the network
//! namespace is per thread). UNIX sockets are files, so a process in the test's own namespace
//! reaches a host's API socket directly. [`measure`] checks the shaping: a bulk TCP transfer
//! and a ping-pong across the link.
//!
//! Creating it needs `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (namespaces), the `ip` command and
//! `/dev/net/tun`; [`TwoHosts::available`] says what is missing, for the test's skip.

mod link;
pub mod measure;
mod sys;

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

pub use link::{DirectionStats, MAX_PACKET, Shape};

/// The MTU of both ends: large, so that the emulator moves 10 Gbit/s in few packets.
pub const MTU: u32 = 65_000;
/// Host A's address.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
/// Host B's address.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
/// Every namespace this harness makes starts so, then the owner's pid.
const PREFIX: &str = "vmig2h-";

/// One of the two hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The first host (`10.199.0.1`): a migration's source, in the tests.
    A,
    /// The second host (`10.199.0.2`): a migration's destination, in the tests.
    B,
}

impl Side {
    /// Its address on the link.
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Self::A => ADDR_A,
            Self::B => ADDR_B,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Self, String> {
        ip(&["netns", "add", &name])?;
        Ok(Self { name })
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            // Nothing to return it to; the next harness removes it once this process is gone.
            println!("two hosts: removing namespace {}: {e}", self.name);
        }
    }
}

/// Runs `ip ARGS`; `Err` carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The effective capability set of this process, from `/proc/self/status`.
fn effective_capabilities() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or("/proc/self/status has no CapEff line")?;
    u64::from_str_radix(hex.trim(), 16).map_err(|e| format!("CapEff {hex:?}: {e}"))
}

/// Removes the namespaces of harnesses whose process is gone (a test killed before its drop).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Two network namespaces joined by a shaped link; see the module doc.
#[derive(Debug)]
pub struct TwoHosts {
    /// Dropped first (fields drop in order): its threads stop and its TUN devices close
    /// before the namespaces go.
    link: link::Link,
    hosts: [Netns; 2],
    shaping: String,
}

impl TwoHosts {
    /// Whether two hosts can be made here; `Err` says what is missing.
    pub fn available() -> Result<(), String> {
        const CAP_NET_ADMIN: u32 = 12;
        const CAP_SYS_ADMIN: u32 = 21;
        let caps = effective_capabilities()?;
        for (bit, name) in [
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        ] {
            if caps & (1 << bit) == 0 {
                return Err(format!(
                    "making network namespaces and a link between them needs {name}, which \
                     this process lacks (run as root)"
                ));
            }
        }
        run("ip", &["-V"]).map_err(|e| format!("the `ip` command (iproute2) is needed: {e}"))?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        Ok(())
    }

    /// Makes the two hosts and starts the link with `shape` in both directions (random losses
    /// follow `seed`). `Err` says which step failed; everything made before it is removed.
    pub fn new(shape: Shape, seed: u64) -> Result<Self, String> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let a = Netns::create(format!("{PREFIX}{pid}-{n}-a"))?;
        let b = Netns::create(format!("{PREFIX}{pid}-{n}-b"))?;
        let tun_a = link_end(&a, &format!("v{pid:x}x{n:x}a"), ADDR_A, ADDR_B)?;
        let tun_b = link_end(&b, &format!("v{pid:x}x{n:x}b"), ADDR_B, ADDR_A)?;
        let shaping = shaping_used(&a.name);
        let link = link::Link::start(tun_a, tun_b, shape, seed)
            .map_err(|e| format!("starting the link's threads: {e}"))?;
        Ok(Self {
            link,
            hosts: [a, b],
            shaping,
        })
    }

    /// Shapes both directions with `shape` from the next packet on.
    pub fn set_shape(&self, shape: Shape) {
        self.link.set_shape(shape);
    }

    /// The shape in force.
    pub fn shape(&self) -> Shape {
        self.link.shape()
    }

    /// What the link did so far: `[A to B, B to A]`.
    pub fn stats(&self) -> [DirectionStats; 2] {
        self.link.stats()
    }

    /// Errors the link's threads met (none, when all is well).
    pub fn link_errors(&self) -> Vec<String> {
        self.link.errors()
    }

    /// Which shaping is in use and why, in one line.
    pub fn shaping(&self) -> &str {
        &self.shaping
    }

    /// The namespace of `side`, as `ip netns` names it.
    pub fn netns(&self, side: Side) -> &str {
        &self.hosts[side.index()].name
    }

    /// `ip netns exec NS program`: add the program's arguments and run it in `side`.
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.netns(side)])
            .arg(program);
        command
    }

    /// Runs `f` on a new thread inside `side`'s network namespace (sockets it opens live
    /// there, whichever thread uses them later); `Err` when the thread could not enter it.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        side: Side,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<std::io::Result<T>> {
        let ns = self.hosts[side.index()].path();
        std::thread::spawn(move || {
            sys::enter_netns(&ns)?;
            Ok(f())
        })
    }
}

/// Creates the TUN device `dev` (at most 15 bytes) and puts it in `ns` as `local`'s end of a
/// point-to-point link to `peer`.
fn link_end(ns: &Netns, dev: &str, local: Ipv4Addr, peer: Ipv4Addr) -> Result<File, String> {
    let tun = sys::open_tun(dev).map_err(|e| format!("creating TUN {dev}: {e}"))?;
    let (local, peer, mtu) = (format!("{local}/32"), format!("{peer}/32"), MTU.to_string());
    ip(&["link", "set", dev, "netns", &ns.name])?;
    ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
    ip(&["-n", &ns.name, "link", "set", dev, "mtu", &mtu, "up"])?;
    ip(&[
        "-n", &ns.name, "addr", "add", &local, "peer", &peer, "dev", dev,
    ])?;
    Ok(tun)
}

/// What shapes the link, and why that: a probe of netem in namespace `ns`.
fn shaping_used(ns: &str) -> String {
    let emulator = "userspace link emulator over a TUN pair (rate, delay and loss per packet)";
    match run(
        "tc",
        &[
            "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ],
    ) {
        Ok(()) => {
            let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", "lo", "root"]);
            format!(
                "{emulator}; tc netem exists in this kernel, but the emulator is the one path \
                 these tests take"
            )
        }
        Err(why) if why.contains("qdisc kind is unknown") => {
            format!("{emulator}, because tc netem is absent in this kernel ({why})")
        }
        Err(why) => format!("{emulator}; tc netem could not be tried here ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn two_hosts_reach_each_other_only_through_the_link_and_leave_nothing_behind() {
        if let Err(why) = TwoHosts::available() {
            crate::skip(why);
            return;
        }
        let hosts = TwoHosts::new(Shape::UNSHAPED, 1).unwrap();
        println!("shaping: {}", hosts.shaping());
        let names = [
            hosts.netns(Side::A).to_owned(),
            hosts.netns(Side::B).to_owned(),
        ];
        let (tx, rx) = std::sync::mpsc::channel();
        let server = hosts.spawn_in(Side::B, move || {
            let listener = TcpListener::bind((ADDR_B, 0)).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let (mut peer, from) = listener.accept().unwrap();
            std::io::copy(&mut peer.try_clone().unwrap(), &mut peer).unwrap();
            from
        });
        let addr = rx.recv().unwrap();
        let client = hosts.spawn_in(Side::A, move || {
            use std::io::{Read, Write};
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"across").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = String::new();
            s.read_to_string(&mut back).unwrap();
            back
        });
        assert_eq!(client.join().unwrap().unwrap(), "across");
        assert_eq!(server.join().unwrap().unwrap().ip(), ADDR_A);
        let [a_to_b, b_to_a] = hosts.stats();
        assert!(
            a_to_b.delivered >= 3 && b_to_a.delivered >= 3,
            "{a_to_b:?} {b_to_a:?}"
        );
        assert!(hosts.link_errors().is_empty(), "{:?}", hosts.link_errors());
        drop(hosts);
        for name in names {
            assert!(
                !Path::new("/run/netns").join(&name).exists(),
                "{name} is left"
            );
        }
    }
}
