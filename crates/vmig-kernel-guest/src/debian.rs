//! Fetching what the guest needs from Debian's packages (`apt-get download`, `dpkg-deb -x`),
//! QEMU included, and telling an absent mirror or missing rights ([`PrepareError::Unavailable`])
//! from a real failure ([`PrepareError::Failed`]); the kernel modules' load order from their
//! `.modinfo` strings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::PrepareError;
use vmig_vfio::sys::is_root;

/// What apt says when it cannot reach its mirror.
const UNREACHABLE: &[&str] = &[
    "Temporary failure resolving",
    "Could not resolve",
    "Failed to fetch",
    "Unable to connect",
    "Could not connect",
    "Connection failed",
    "Connection timed out",
    "Network is unreachable",
    "No route to host",
];

/// An apt step's failure: `Unavailable` when the network is out of reach, or when the package
/// lists are missing and only root could fetch them; `Failed` otherwise.
pub(crate) fn apt_failure(why: String) -> PrepareError {
    if UNREACHABLE.iter().any(|m| why.contains(m)) {
        PrepareError::Unavailable(format!("Debian's mirror cannot be reached: {why}"))
    } else if !is_root()
        && (why.contains("Unable to locate package") || why.contains("No packages found"))
    {
        PrepareError::Unavailable(format!(
            "apt has no package lists and updating them needs root: {why}"
        ))
    } else {
        PrepareError::Failed(why)
    }
}

/// Runs `apt-get update`; only a failure to reach the mirror is worth reporting, as the step
/// that needed the lists says what it missed.
pub(crate) fn apt_update() -> Result<(), PrepareError> {
    if !is_root() {
        return Ok(());
    }
    match run(Command::new("apt-get").args(["update", "-qq"])) {
        Err(why) if UNREACHABLE.iter().any(|m| why.contains(m)) => Err(apt_failure(why)),
        _ => Ok(()),
    }
}

/// QEMU's `qemu-system-x86_64`, installed from Debian's `qemu-system-x86` when it is missing
/// and this process is root (`Unavailable` when it cannot be had).
pub fn qemu_system() -> Result<PathBuf, PrepareError> {
    if let Some(qemu) = which("qemu-system-x86_64") {
        return Ok(qemu);
    }
    if which("apt-get").is_none() || !is_root() {
        return Err(PrepareError::Unavailable(
            "qemu-system-x86_64 is missing and installing it needs apt-get and root \
             (apt-get install qemu-system-x86)"
                .into(),
        ));
    }
    let install = || {
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "qemu-system-x86",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        apt_update()?;
        install().map_err(apt_failure)?;
    }
    Ok(which("qemu-system-x86_64").ok_or("qemu-system-x86 installed no qemu-system-x86_64")?)
}

pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// Downloads `package` (a `.deb`) into `dir` unless it is there; returns its path.
pub(crate) fn download(package: &str, dir: &Path) -> Result<PathBuf, PrepareError> {
    let find = || {
        std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
        })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    let fetch = || {
        run(Command::new("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(dir))
    };
    if fetch().is_err() {
        // The package lists may be missing on a fresh machine.
        apt_update()?;
        fetch().map_err(apt_failure)?;
    }
    find().ok_or_else(|| {
        PrepareError::Failed(format!(
            "apt-get download {package} left no .deb in {}",
            dir.display()
        ))
    })
}

/// Extracts `deb` into `dir` once.
pub(crate) fn extract(deb: &Path, dir: &Path) -> Result<(), String> {
    let done = dir.join(".extracted");
    if done.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Err(e) = run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir)) {
        // A damaged download must not be reused by the next attempt.
        let _ = std::fs::remove_file(deb);
        return Err(e);
    }
    std::fs::write(&done, b"").map_err(|e| format!("{}: {e}", done.display()))
}

/// The `depends=` list of a kernel module file (from its `.modinfo` strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// `names` and everything they depend on, dependencies first.
pub(crate) fn load_order(
    names: &[&str],
    files: &BTreeMap<String, PathBuf>,
) -> Result<Vec<(String, PathBuf)>, String> {
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), String> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 16 {
            return Err(format!("module dependencies loop at {name}"));
        }
        let file = files
            .get(name)
            .ok_or_else(|| format!("the kernel package has no module {name}"))?;
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        for dep in module_depends(&bytes) {
            visit(&dep, files, order, depth + 1)?;
        }
        order.push((name.to_owned(), file.clone()));
        Ok(())
    }
    let mut order = Vec::new();
    for name in names {
        visit(&name.replace('-', "_"), files, &mut order, 0)?;
    }
    Ok(order)
}

pub(crate) fn find_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                find_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_the_modinfo_string() {
        let ko = b"\x7fELF...license=GPL\0depends=vfio-pci-core,vfio\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["vfio_pci_core", "vfio"]);
        assert!(module_depends(b"depends=\0").is_empty());
    }

    #[test]
    fn only_an_unreachable_mirror_or_missing_rights_make_the_guest_unavailable() {
        let offline = "\"apt-get\" \"download\" \"busybox-static\" failed (exit status: 100): \
            E: Failed to fetch http://deb.example/busybox-static.deb  Temporary failure resolving";
        assert!(matches!(
            apt_failure(offline.into()),
            PrepareError::Unavailable(why) if why.starts_with("Debian's mirror cannot be reached")
        ));
        let damaged = "\"dpkg-deb\" \"-x\" failed (exit status: 2): dpkg-deb: error: \
            archive has premature member 'control.tar.xz'";
        assert_eq!(
            apt_failure(damaged.into()),
            PrepareError::Failed(damaged.into())
        );
        let unknown = "E: Unable to locate package linux-image-9.9.9-amd64";
        let as_root = matches!(apt_failure(unknown.into()), PrepareError::Failed(_));
        assert_eq!(as_root, is_root(), "only root could have fetched the lists");
    }
}
