//! The guest: 64-bit long-mode code assembled at run time (iced-x86), the page tables and
//! descriptor table it runs on, and the self-checking workloads it executes.
//!
//! Each vCPU writes pages of a working set, chosen `sequential`ly, at `random` (xorshift64* seeded
//! per vCPU) or `hotcold` (most writes to a small hot set), either in its own slice of the working
//! set or anywhere in it (`shared`, with a per-page try-lock). Every write leaves a stamp:
//!
//! ```text
//! page + 0     MAGIC | working-set page number
//! page + 8     epoch (set by the host: the iteration number of dirty-log tests)
//! page + 16    tag = vcpu << 48 | the vCPU's write count (unique per write)
//! page + 24    checksum of the three words above
//! page + 4088  tag again (a torn copy of the page shows a head and tail that disagree)
//! journal[i]   tag, written last (the guest's own record of the page's latest write)
//! ```
//!
//! The host talks to the guest through a control page the guest polls between batches of writes
//! (the epoch and commands) and the guest reports through I/O ports: a pacing request per batch
//! (the VMM's token bucket sleeps it), each inconsistent page found by `verify`, the end of a
//! verify, and a yield while it spins in a barrier. `verify` stops every vCPU's writes at a
//! barrier in guest memory, has each vCPU check its slice of the working set against the
//! journal, and releases them at a second barrier. A port script (a few byte-wide `out`s and
//! `in`s the VMM posts in the control page) is run by vCPU 0 at a batch boundary, so a test can
//! have the guest itself drive a device's I/O-port BAR, for example a UART's FIFO before and
//! after a migration.
//!
//! Its files, each re-exported here: `workload` (the `--workload` spec), `layout` (the
//! guest-physical memory map and the working set's place in it), `protocol` (the control page,
//! the vCPU blocks and the I/O ports the guest and the VMM talk through), `program` (what the
//! VMM installs: descriptor table, page tables, code, boot registers), `assemble` (the guest's
//! code), `page_tables`, and `verify` (the stamp a write leaves and the verify counters).

mod assemble;
mod layout;
mod page_tables;
mod program;
mod protocol;
mod verify;
mod workload;

pub use layout::{
    CONTROL_GPA, GuestLayout, IO_WINDOW_PORT, IO_WINDOW_PORTS, MAX_VCPUS, MMIO_WINDOW_GPA,
    MMIO_WINDOW_SIZE,
};
pub use program::GuestProgram;
pub use protocol::{
    Doorbell, MAX_DOORBELLS, MAX_PORT_OPS, PORT_BAD_PAGE, PORT_PACE, PORT_VERIFY_DONE, PORT_YIELD,
    PortOp, set_doorbells, set_epoch,
};
pub(crate) use protocol::{port_script_done, port_script_reads, post_port_script};
pub use verify::{STAMP_MAGIC, Stamp, VcpuCounters, post_verify, read_counters};
pub use workload::{Workload, WorkloadKind, parse_size};
