//! QEMU's newest release, from Debian's sid, on this older host: the first QEMU with a
//! vfio-user client (`-device vfio-user-pci`, since 10.1), and the newest one to compare
//! migrations with.
//!
//! sid's binaries need a newer C library than the host's, so the rig runs QEMU through sid's
//! own dynamic loader with sid's libraries, and needs neither a chroot nor root:
//! - a private apt configuration for sid (`target/qemu-sid/apt/`, with an empty dpkg status, so
//!   apt resolves every library QEMU needs and none of the host's packages stands in for one)
//!   downloads `qemu-system-x86` and what it depends on;
//! - `dpkg-deb -x` unpacks them into `target/qemu-sid/root/` (the `.deb`s are then deleted);
//! - `target/qemu-sid/qemu-system-x86_64` is a launcher script: sid's `ld-linux-x86-64.so.2
//!   --library-path root/usr/lib/x86_64-linux-gnu root/usr/bin/qemu-system-x86_64`, with sid's
//!   firmware directories (`-L`) and module directory (`QEMU_MODULE_DIR`), so a user (or
//!   `vmig bench`, which looks there) runs it as any `qemu-system-x86_64`.
//!
//! Prepared once (about 5 s and 41 MB of downloads) and cached; a file lock keeps two tests
//! from preparing it at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::PrepareError;
use crate::debian::{Apt, Timings, download_closure, extract, run, which};
use crate::guest::target_dir;

/// Debian's unstable suite, which carries QEMU's newest release.
pub const SID: &str = "http://deb.debian.org/debian sid main";

/// The package that holds `qemu-system-x86_64`.
const PACKAGE: &str = "qemu-system-x86";

/// The first release with `-device vfio-user-pci`.
pub const FIRST_WITH_VFIO_USER: (u32, u32) = (10, 1);

/// The rig's folder under the workspace's target directory.
pub const RIG_DIR: &str = "qemu-sid";

/// The launcher's name in the rig's folder.
pub const LAUNCHER: &str = "qemu-system-x86_64";

/// QEMU from sid, unpacked and ready to run through its launcher.
#[derive(Debug, Clone)]
pub struct NewestQemu {
    launcher: PathBuf,
    version: String,
}

impl NewestQemu {
    /// Finds the rig, or fetches and unpacks it: `Err` says why it cannot be had here
    /// (`Unavailable`: no apt, no network) or what went wrong (`Failed`). Preparing prints how
    /// long each step took.
    pub fn prepare() -> Result<Self, PrepareError> {
        let work = target_dir().join(RIG_DIR);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let lock_path = work.join(".lock");
        let lock = std::fs::File::create(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        lock.lock()
            .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
        let root = work.join("root");
        let mut timings = Timings::default();
        if !root.join(".extracted").exists() {
            if which("apt-get").is_none() || which("dpkg-deb").is_none() {
                return Err(PrepareError::Unavailable(
                    "apt-get and dpkg-deb are needed to fetch QEMU from Debian's sid".into(),
                ));
            }
            let apt = Apt::private(&work.join("apt"), SID)?;
            apt.ensure_lists(&mut timings)?;
            let debs = download_closure(&apt, PACKAGE, &mut timings)?;
            // What an interrupted attempt left must not mix with this one.
            if root.exists() {
                std::fs::remove_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
            }
            extract(&debs, &root, &mut timings, |_| Ok(()))?;
            for deb in &debs {
                let _ = std::fs::remove_file(deb);
            }
        }
        let launcher = work.join(LAUNCHER);
        let script = launcher_script(&root)?;
        if std::fs::read_to_string(&launcher).ok().as_deref() != Some(script.as_str()) {
            write_executable(&launcher, &script)?;
        }
        let start = Instant::now();
        let banner = run(Command::new(&launcher).arg("--version"))?;
        let version = parse_version(&banner).ok_or_else(|| {
            format!(
                "{} --version printed no \"QEMU emulator version\": {banner}",
                launcher.display()
            )
        })?;
        if !timings.is_empty() {
            timings.add(format!("{LAUNCHER} --version"), start.elapsed());
            print!(
                "{}",
                timings.render(&format!("QEMU {version} rig (Debian sid) prepared"))
            );
        }
        let (major, minor) = major_minor(&version).unwrap_or((0, 0));
        if (major, minor) < FIRST_WITH_VFIO_USER {
            return Err(PrepareError::Failed(format!(
                "sid's QEMU is {version}: vfio-user-pci needs {}.{} or newer",
                FIRST_WITH_VFIO_USER.0, FIRST_WITH_VFIO_USER.1
            )));
        }
        Ok(Self { launcher, version })
    }

    /// As [`NewestQemu::prepare`], for a test: what is absent here goes to `skip` (with why)
    /// and gives `None`; any other failure panics, failing the test.
    pub fn prepare_or_skip(skip: impl FnOnce(String)) -> Option<Self> {
        match Self::prepare() {
            Ok(qemu) => Some(qemu),
            Err(PrepareError::Unavailable(why)) => {
                skip(format!("QEMU from Debian's sid cannot be had here: {why}"));
                None
            }
            Err(PrepareError::Failed(why)) => panic!("preparing QEMU from Debian's sid: {why}"),
        }
    }

    /// The launcher: run it as `qemu-system-x86_64`.
    pub fn launcher(&self) -> &Path {
        &self.launcher
    }

    /// `qemu-system-x86_64` of this release, ready for arguments.
    pub fn command(&self) -> Command {
        Command::new(&self.launcher)
    }

    /// The release, e.g. `11.1.3`.
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// The launcher for the QEMU unpacked in `root`.
fn launcher_script(root: &Path) -> Result<String, String> {
    let root = root.to_str().filter(|r| !r.contains('\'')).ok_or_else(|| {
        format!(
            "{}: the launcher quotes this path in a shell script, and cannot quote it",
            root.display()
        )
    })?;
    Ok(format!(
        "#!/bin/sh\n\
         # QEMU from Debian's sid, prepared by vmig's tests (vmig-kernel-guest, newest_qemu):\n\
         # sid's binaries need its newer C library, so they run through sid's own loader.\n\
         root='{root}'\n\
         lib=\"$root/usr/lib/x86_64-linux-gnu\"\n\
         QEMU_MODULE_DIR=\"$lib/qemu\" exec \"$root/usr/lib64/ld-linux-x86-64.so.2\" \\\n\
         \x20   --library-path \"$lib\" \"$root/usr/bin/qemu-system-x86_64\" \\\n\
         \x20   -L \"$root/usr/share/qemu\" -L \"$root/usr/share/seabios\" \\\n\
         \x20   -L \"$root/usr/lib/ipxe/qemu\" \"$@\"\n"
    ))
}

fn write_executable(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    // Written aside and renamed: a launcher is never seen half written.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).map_err(|e| format!("{}: {e}", partial.display()))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    std::fs::rename(&partial, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The release in `qemu-system-x86_64 --version`'s first line.
pub fn parse_version(banner: &str) -> Option<String> {
    let rest = banner
        .lines()
        .next()?
        .strip_prefix("QEMU emulator version ")?;
    let version = rest.split_whitespace().next()?;
    major_minor(version)?;
    Some(version.to_owned())
}

/// `11.1.3` → `(11, 1)`.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_is_read_from_the_version_banner() {
        let banner = "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)\n\
                      Copyright (c) 2003-2026 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(banner).as_deref(), Some("11.1.3"));
        assert_eq!(major_minor("7.2.19"), Some((7, 2)));
        assert!(major_minor("7.2.19") < Some(FIRST_WITH_VFIO_USER));
        assert_eq!(parse_version("qemu-img version 11.1.3"), None);
        assert_eq!(parse_version("QEMU emulator version x.y"), None);
    }

    #[test]
    fn the_launcher_runs_sids_qemu_through_sids_loader() {
        let script = launcher_script(Path::new("/t/qemu-sid/root")).unwrap();
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("root='/t/qemu-sid/root'\n"));
        assert!(script.contains(
            "exec \"$root/usr/lib64/ld-linux-x86-64.so.2\" \\\n    --library-path \"$lib\""
        ));
        assert!(script.trim_end().ends_with("\"$@\""));
        assert!(launcher_script(Path::new("/t/it's")).is_err());
    }
}
