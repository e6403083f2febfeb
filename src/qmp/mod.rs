//! The control socket of `vmig run --api PATH` speaks QMP, QEMU's machine protocol, so the
//! tools that drive QEMU's migrations (Python's `qemu.qmp` and its `qmp-shell`, orchestration
//! written against `migrate`, `query-migrate` and the `MIGRATION` event) drive vmig's:
//!
//! ```text
//! ← {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "vmig 0.1.0"}, "capabilities": []}}
//! → {"execute": "qmp_capabilities"}
//! ← {"return": {}}
//! → {"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 300}, "id": 1}
//! ← {"return": {}, "id": 1}
//! → {"execute": "migrate", "arguments": {"uri": "tcp:10.0.0.2:4444"}, "id": 2}
//! ← {"return": {}, "id": 2}
//! ← {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {...}}
//! ← {"event": "MIGRATION_PASS", "data": {"pass": 1}, "timestamp": {...}}
//! ← {"event": "STOP", "timestamp": {...}}
//! ← {"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {...}}
//! → {"execute": "query-migrate", "id": 3}
//! ← {"return": {"status": "completed", "total-time": 812, "ram": {...}, "x-vmig-verified": true, ...}, "id": 3}
//! ```
//!
//! Before `qmp_capabilities` every command is refused (`CommandNotFound`); requests are JSON
//! objects with `execute`, optional `arguments` and `id` (echoed), in any framing (no newline
//! needed); malformed input gets QEMU's error replies and the connection stays open.
//! [`framing`] splits the stream, [`server`] runs connections and events, [`commands`] holds
//! the commands, [`names`] maps vmig's report and parameters to QEMU's names, and [`client`]
//! is the client `vmig ctl` and `vmig migrate` use.

pub mod client;
pub mod commands;
pub mod framing;
pub mod names;
pub mod server;

pub use client::QmpClient;
pub use server::{Shared, SocketGuard, serve};
