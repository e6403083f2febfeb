//! A vfio-user device served on a thread of the test, on a UNIX socket in the test's
//! directory, stopped when dropped. Included with
//! `#[path = "common/device_server.rs"] mod device_server;`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use vmig_migration::DeviceSpec;
use vmig_vfio_user::server::{Device, Server, ServerConfig};

/// A device served over vfio-user until dropped.
pub struct DeviceServer {
    /// The socket it listens on.
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceServer {
    /// Serves `device` on `dir/name`.
    pub fn serve(dir: &Path, name: &str, device: impl Device + 'static) -> Self {
        let socket = dir.join(name);
        let listener = UnixListener::bind(&socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server::new(device, ServerConfig::default());
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let _ = server.run(&listener, &stop);
            })
        };
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    /// Its `--device`, a dma-engine driven at `rate` records per second.
    pub fn spec(&self, rate: u64) -> DeviceSpec {
        DeviceSpec::vfio_user(self.socket.clone(), rate)
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
