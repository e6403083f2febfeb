//! What the device tests share: a device served by the framework over a socket pair, in a
//! thread of its own, with a client connected to it.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmig_vfio_user::client::Client;
use vmig_vfio_user::server::{Device, ServeError, Server, ServerConfig};

/// A served device and its client; dropping it stops the server and joins its thread.
pub struct Served {
    pub client: Client,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `device` with the default configuration and connects a client to it.
pub fn serve<D: Device + Send + Sync + 'static>(device: D) -> Served {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = Arc::new(Server::new(device, ServerConfig::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || server.serve(theirs, &stop))
    };
    Served {
        client: Client::over(ours, None).unwrap(),
        stop,
        thread: Some(thread),
    }
}
