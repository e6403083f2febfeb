//! The `vmig` binary as the root package's tests drive it: the program (the build's, or
//! `/bin/vmig` inside the kernel-VFIO guest), one `vmig ctl` command, and waiting for a socket
//! or file it makes. Included with `#[path = "common/cli.rs"] mod cli;`.

#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a part of it"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `vmig`: this build's binary, or, inside the kernel-VFIO guest, the static one its
/// initramfs holds at `/bin/vmig`.
pub fn vmig() -> Command {
    if vmig_kernel_guest::in_guest() {
        Command::new("/bin/vmig")
    } else {
        Command::new(env!("CARGO_BIN_EXE_vmig"))
    }
}

/// `vmig ctl API ARGS...`: whether it succeeded, and the reply it printed.
pub fn ctl(api: &Path, args: &[&str]) -> (bool, Value) {
    let out = vmig().arg("ctl").arg(api).args(args).output().unwrap();
    let reply = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vmig ctl {} {args:?}: {e}: {}{}",
            api.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), reply)
}

/// Waits at most `patience` for `path` to appear.
pub fn wait_for(path: &Path, patience: Duration) {
    let end = Instant::now() + patience;
    while !path.exists() {
        assert!(Instant::now() < end, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process, killed (and reaped) when dropped, so a failing assertion leaves none behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
