//! The guest's driver of a dma-engine, as vmig's synthetic guests need it: the VMM sets up the
//! ring on a booting VM, the guest's vCPU 0 consumes records through a doorbell, and after a
//! migration every buffer is checked for a whole, recent record.
//!
//! It is written against two small traits, [`Bar0`] (the device's registers, not through the
//! guest) and [`GuestRam`] (guest memory by guest-physical address), so it knows neither the
//! engine nor the VM; whoever embeds it (the `vmig` binary, the tests) adapts them.
//!
//! ```text
//!  guest RAM, the device's area:  ring (RING_ENTRIES u64 buffer addresses) │ buffer 0 │ buffer 1 │ …
//!  driver (source):  CTRL=0, RING_BASE, RING_SIZE, SEED, RATE, CTRL=1
//!  device:           record seq → buffer seq % RING_ENTRIES, PRODUCER += 1
//!  guest vCPU 0:     reads PRODUCER (status page, else BAR0), writes CONSUMER (doorbell
//!                    page, else BAR0)
//! ```

use std::time::Duration;

use vmig_primitives::{GuestAddress, PAGE_SIZE};

use super::{BAR0_SIZE, ID, RECORD_SIZE, check_record, reg};

/// A failure reaching the device or guest memory, from whoever implements the traits.
pub type AccessError = Box<dyn std::error::Error + Send + Sync>;

/// The device's BAR0 registers.
pub trait Bar0 {
    /// Reads the register at `offset`.
    fn read_reg(&self, offset: u64) -> Result<u64, AccessError>;
    /// Writes the register at `offset`.
    fn write_reg(&self, offset: u64, value: u64) -> Result<(), AccessError>;
}

/// Guest memory by guest-physical address.
pub trait GuestRam {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes `data` at `gpa`.
    fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), AccessError>;
}

/// What the driver could not do.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Reading or writing a register.
    #[error("dma-engine register {offset:#x}: {source}")]
    Register {
        /// The register.
        offset: u64,
        /// Why.
        #[source]
        source: AccessError,
    },
    /// Reading or writing the ring or a buffer.
    #[error("dma-engine ring at {gpa}: {source}")]
    Memory {
        /// Where.
        gpa: GuestAddress,
        /// Why.
        #[source]
        source: AccessError,
    },
    /// The device did not take its setup.
    #[error("the dma-engine did not take its ring size")]
    Refused,
}

/// Entries in the ring (one buffer page each).
pub const RING_ENTRIES: u64 = 256;

/// The RAM the ring and its buffers take.
pub const AREA_BYTES: u64 = (RING_ENTRIES + 1) * PAGE_SIZE;

/// Where a dma-engine's ring and buffers are in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// The ring of buffer addresses.
    pub ring_gpa: GuestAddress,
    /// Buffer *i* is at `buffers_gpa + i × PAGE_SIZE`.
    pub buffers_gpa: GuestAddress,
    /// Entries.
    pub entries: u64,
}

impl Ring {
    /// The ring at the start of `area` (at least [`AREA_BYTES`]), its buffers after it.
    pub fn in_area(area: GuestAddress) -> Self {
        Self {
            ring_gpa: area,
            buffers_gpa: GuestAddress(area.raw() + PAGE_SIZE),
            entries: RING_ENTRIES,
        }
    }

    /// Where buffer `i` is.
    pub fn buffer(&self, i: u64) -> GuestAddress {
        GuestAddress(self.buffers_gpa.raw() + i * PAGE_SIZE)
    }
}

/// What checking a dma-engine's records found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordCheck {
    /// Records the device had produced.
    pub produced: u64,
    /// Records found whole and recent in the ring.
    pub checked: u64,
    /// What was wrong, if anything.
    pub problems: Vec<String>,
    /// `DMA_ERRORS` of the device.
    pub dma_errors: u64,
}

pub(super) fn read(regs: &dyn Bar0, offset: u64) -> Result<u64, DriverError> {
    regs.read_reg(offset)
        .map_err(|source| DriverError::Register { offset, source })
}

fn write(regs: &dyn Bar0, offset: u64, value: u64) -> Result<(), DriverError> {
    regs.write_reg(offset, value)
        .map_err(|source| DriverError::Register { offset, source })
}

/// Whether the device behind `regs`, whose BAR0 is `bar0_size` bytes, is a dma-engine (its
/// `ID` register says so). Call it on emulated devices only: a read of an unknown register of
/// real hardware may have side effects.
pub fn is_dma_engine(regs: &dyn Bar0, bar0_size: u64) -> bool {
    bar0_size >= BAR0_SIZE && regs.read_reg(reg::ID).ok() == Some(ID)
}

/// The driver's setup on a booting VM: the ring of buffer addresses in guest memory, then the
/// registers, then enable; `seed` stamps the records.
pub fn start(
    regs: &dyn Bar0,
    ram: &dyn GuestRam,
    ring: Ring,
    rate: u64,
    seed: u64,
) -> Result<(), DriverError> {
    let mut table = Vec::with_capacity(usize::try_from(ring.entries * 8).unwrap_or(0));
    for i in 0..ring.entries {
        table.extend_from_slice(&ring.buffer(i).raw().to_le_bytes());
    }
    ram.write(ring.ring_gpa, &table)
        .map_err(|source| DriverError::Memory {
            gpa: ring.ring_gpa,
            source,
        })?;
    write(regs, reg::CTRL, 0)?;
    write(regs, reg::RING_BASE, ring.ring_gpa.raw())?;
    write(regs, reg::RING_SIZE, ring.entries)?;
    write(regs, reg::SEED, seed)?;
    write(regs, reg::RATE, rate)?;
    write(regs, reg::CTRL, 1)?;
    // A device that refuses the setup shows it in its registers.
    std::thread::sleep(Duration::from_millis(1));
    if read(regs, reg::RING_SIZE)? != ring.entries {
        return Err(DriverError::Refused);
    }
    Ok(())
}

/// The guest's doorbell: where it reads `PRODUCER` (the mapped status page when there is one,
/// else BAR0's register) and where it writes `CONSUMER` (the mapped doorbell page when there is
/// one, else BAR0's register), for BAR0 at `bar0_gpa`.
pub fn doorbell(
    bar0_gpa: GuestAddress,
    status_page_gpa: Option<GuestAddress>,
    doorbell_page_gpa: Option<GuestAddress>,
) -> (GuestAddress, GuestAddress) {
    (
        status_page_gpa.unwrap_or(GuestAddress(bar0_gpa.raw() + reg::PRODUCER)),
        doorbell_page_gpa.unwrap_or(GuestAddress(bar0_gpa.raw() + reg::CONSUMER)),
    )
}

/// Checks the ring: each buffer must hold a whole record that is among the last ring-full the
/// device produced (or nothing, if the device has not reached it). A record that a migration
/// lost shows as an older record, or as an empty buffer.
pub fn check_records(
    regs: &dyn Bar0,
    ram: &dyn GuestRam,
    ring: Ring,
) -> Result<RecordCheck, DriverError> {
    let seed = read(regs, reg::SEED)?;
    let before = read(regs, reg::PRODUCER)?;
    let mut buffers = Vec::new();
    for i in 0..ring.entries {
        let mut record = [0u8; RECORD_SIZE];
        let gpa = ring.buffer(i);
        ram.read(gpa, &mut record)
            .map_err(|source| DriverError::Memory { gpa, source })?;
        buffers.push(record);
    }
    let after = read(regs, reg::PRODUCER)?;
    let mut check = RecordCheck {
        produced: after,
        dma_errors: read(regs, reg::DMA_ERRORS)?,
        ..RecordCheck::default()
    };
    for (i, record) in (0u64..).zip(&buffers) {
        if record.iter().all(|&b| b == 0) {
            if i < before {
                check
                    .problems
                    .push(format!("buffer {i} is empty, but the device wrote it"));
            }
            continue;
        }
        match check_record(record, seed) {
            Ok(seq) if seq % ring.entries == i && seq < after && seq + ring.entries >= before => {
                check.checked += 1;
            }
            Ok(seq) => check.problems.push(format!(
                "buffer {i} holds record {seq}, but records {}..{before} should be there: a record written before the switch-over was lost",
                before.saturating_sub(ring.entries)
            )),
            Err(why) => check.problems.push(format!("buffer {i}: {why}")),
        }
    }
    check.problems.truncate(8);
    Ok(check)
}
