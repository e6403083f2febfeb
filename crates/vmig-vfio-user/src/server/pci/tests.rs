//! The PCI rules the function follows, each test quoting the clause it checks (PCI Local Bus
//! Specification 3.0 unless it says otherwise).

use std::io::Read;

use super::*;
use crate::server::IrqSpec;
use crate::wire::{IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE};

const TABLE: u32 = 0x800;
const PBA: u32 = 0xc00;

/// Every feature: BAR0 32-bit memory with the MSI-X table and PBA, BAR2/3 64-bit
/// prefetchable, BAR4 I/O; INTx, MSI with 4 maskable vectors, MSI-X with 3, PCI Express.
fn full_spec() -> PciSpec {
    let mut bars = [None; 6];
    bars[0] = Some(Bar {
        size: 4096,
        kind: BarKind::Memory32,
    });
    bars[2] = Some(Bar {
        size: 1 << 20,
        kind: BarKind::Memory64 { prefetchable: true },
    });
    bars[4] = Some(Bar {
        size: 32,
        kind: BarKind::Io,
    });
    PciSpec {
        vendor_id: 0x1234,
        device_id: 0x7a01,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0042,
        revision: 3,
        class: 0x02_80_00,
        bars,
        intx: true,
        msi: Some(MsiSpec {
            vectors: 4,
            per_vector_mask: true,
        }),
        msix: Some(MsixSpec {
            vectors: 3,
            table_bar: 0,
            table_offset: TABLE,
            pba_bar: 0,
            pba_offset: PBA,
        }),
        express: true,
    }
}

fn function() -> PciFunction {
    PciFunction::new(full_spec()).expect("the full spec is valid")
}

fn irqs() -> Irqs {
    let flags = IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE;
    Irqs::new(&[
        IrqSpec {
            count: 1,
            flags: flags | IRQ_INFO_AUTOMASKED,
        },
        IrqSpec { count: 4, flags },
        IrqSpec { count: 3, flags },
    ])
}

fn read32(pci: &PciFunction, at: usize) -> u32 {
    let mut b = [0u8; 4];
    pci.config_read(at as u64, &mut b);
    u32::from_le_bytes(b)
}

fn read8(pci: &PciFunction, at: usize) -> u8 {
    let mut b = [0u8; 1];
    pci.config_read(at as u64, &mut b);
    b[0]
}

fn read16(pci: &PciFunction, at: usize) -> u16 {
    let mut b = [0u8; 2];
    pci.config_read(at as u64, &mut b);
    u16::from_le_bytes(b)
}

fn write32(pci: &PciFunction, at: usize, value: u32, irqs: &Irqs) {
    pci.config_write(at as u64, &value.to_le_bytes(), irqs);
}

fn write16(pci: &PciFunction, at: usize, value: u16, irqs: &Irqs) {
    pci.config_write(at as u64, &value.to_le_bytes(), irqs);
}

/// Signals that arrived on a wired vector since the last call.
fn signals(reader: &mut std::io::PipeReader) -> usize {
    let mut buf = [0u8; 64];
    let mut total = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return total / 8,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return total / 8,
            Err(e) => panic!("reading the IRQ pipe: {e}"),
        }
    }
}

/// Walks the capability list: (offset, id) in order.
fn capabilities(pci: &PciFunction) -> Vec<(usize, u8)> {
    let mut found = Vec::new();
    let mut at = usize::from(read8(pci, header::CAPABILITIES));
    while at != 0 {
        assert_eq!(at % 4, 0, "capability pointer {at:#x} is not dword aligned");
        assert!(found.len() < 48, "the capability list loops");
        found.push((at, read8(pci, at)));
        at = usize::from(read8(pci, at + 1));
    }
    found
}

fn capability(pci: &PciFunction, id: u8) -> usize {
    capabilities(pci)
        .into_iter()
        .find(|&(_, i)| i == id)
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("no capability {id:#x}"))
}

fn table_write32(pci: &PciFunction, entry: u64, word: u64, value: u32, irqs: &Irqs) {
    let at = u64::from(TABLE) + entry * MSIX_ENTRY_SIZE + word * 4;
    assert!(pci.claims(0, at, 4).unwrap());
    pci.bar_write(0, at, &value.to_le_bytes(), irqs);
}

fn table_read32(pci: &PciFunction, entry: u64, word: u64) -> u32 {
    let at = u64::from(TABLE) + entry * MSIX_ENTRY_SIZE + word * 4;
    let mut b = [0u8; 4];
    pci.bar_read(0, at, &mut b);
    u32::from_le_bytes(b)
}

fn pba(pci: &PciFunction) -> u64 {
    let mut b = [0u8; 8];
    assert!(pci.claims(0, u64::from(PBA), 8).unwrap());
    pci.bar_read(0, u64::from(PBA), &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn identification_registers_are_read_only() {
    // §6.2.1: "All PCI devices must support the Vendor ID, Device ID, Command, Status,
    // Revision ID, Class Code, and Header Type fields in the header." — and they are
    // read-only: "Vendor ID ... This field identifies the manufacturer of the device."
    let pci = function();
    let irqs = irqs();
    let before = read32(&pci, 0);
    write32(&pci, 0, u32::MAX, &irqs);
    write32(&pci, header::REVISION, u32::MAX, &irqs);
    write32(&pci, header::SUBSYSTEM_VENDOR_ID, u32::MAX, &irqs);
    assert_eq!(before, 0x7a01_1234);
    assert_eq!(read32(&pci, 0), before);
    assert_eq!(read32(&pci, header::REVISION), 0x0280_0003);
    assert_eq!(read32(&pci, header::SUBSYSTEM_VENDOR_ID), 0x0042_1af4);
    // Header type 0 (a single-function endpoint).
    assert_eq!(read32(&pci, 0x0c) >> 16 & 0xff, 0);
    assert_eq!(pci.config_size(), EXPRESS_CONFIG_SPACE_SIZE);
}

#[test]
fn bar_sizing_reads_back_the_size_and_type() {
    // §6.2.5.1: "software saves the original value of the Base Address register, writes
    // 0FFFFFFFFh to the register, then reads it back. Size calculation can be done from the
    // 32-bit value read by first clearing encoding information bits (bit 0 for I/O, bits 0-3
    // for memory), inverting all 32 bits (logical NOT), then incrementing by 1."
    let pci = function();
    let irqs = irqs();
    for n in 0..6 {
        write32(&pci, header::BAR0 + 4 * n, u32::MAX, &irqs);
    }
    let bar = |n: usize| read32(&pci, header::BAR0 + 4 * n);
    // 4 KiB of 32-bit memory, not prefetchable: type bits 0000b.
    assert_eq!(bar(0), 0xffff_f000);
    assert_eq!((!(bar(0) & !0xf)).wrapping_add(1), 4096);
    // "Unimplemented Base Address registers are hardwired to zero."
    assert_eq!(bar(1), 0);
    assert_eq!(bar(5), 0);
    // 1 MiB of 64-bit prefetchable memory: type 10b (bits 2:1), prefetchable (bit 3); the
    // upper dword holds the high address bits, all writable.
    assert_eq!(bar(2), 0xfff0_000c);
    assert_eq!(bar(3), u32::MAX);
    let size = !(u64::from(bar(3)) << 32 | u64::from(bar(2) & !0xf)) + 1;
    assert_eq!(size, 1 << 20);
    // 32 bytes of I/O: bit 0 set, bit 1 reserved.
    assert_eq!(bar(4), 0xffff_ffe1);
    assert_eq!((!(bar(4) & !0x3)).wrapping_add(1), 32);

    // An address the driver programs reads back, with the type bits kept.
    write32(&pci, header::BAR0, 0xfebd_1000, &irqs);
    write32(&pci, header::BAR0 + 8, 0x8000_0000, &irqs);
    write32(&pci, header::BAR0 + 12, 0x0000_0001, &irqs);
    write32(&pci, header::BAR0 + 16, 0xc040, &irqs);
    assert_eq!(bar(0), 0xfebd_1000);
    assert_eq!(pci.bar_address(0), Some(0xfebd_1000));
    assert_eq!(pci.bar_address(2), Some(0x1_8000_0000));
    assert_eq!(bar(4), 0xc041);
    assert_eq!(pci.bar_address(4), Some(0xc040));
    assert_eq!(pci.bar_address(1), None);
}

#[test]
fn no_expansion_rom_reads_zero_after_the_size_probe() {
    // §6.2.5.2: "Device independent configuration software can determine how much address
    // space the device requires by writing a value of all 1's to the address portion of the
    // register and then reading the value back" — a function without a ROM answers 0: no
    // address bits, no ROM.
    let pci = function();
    write32(&pci, header::ROM, u32::MAX, &irqs());
    assert_eq!(read32(&pci, header::ROM), 0);
}

#[test]
fn command_register_keeps_only_the_bits_the_function_implements() {
    // §6.2.2: the command register's bits that are not implemented are hardwired to 0 ("If a
    // device does not support I/O Space, it must hardwire" the I/O Space bit "to 0").
    let pci = function();
    let irqs = irqs();
    write16(&pci, header::COMMAND, u16::MAX, &irqs);
    use header::*;
    let implemented = COMMAND_IO
        | COMMAND_MEMORY
        | COMMAND_MASTER
        | COMMAND_PARITY
        | COMMAND_SERR
        | COMMAND_INTX_DISABLE;
    assert_eq!(pci.command(), implemented);

    let mut spec = full_spec();
    spec.bars[4] = None;
    spec.intx = false;
    let no_io = PciFunction::new(spec).unwrap();
    write16(&no_io, COMMAND, u16::MAX, &irqs);
    assert_eq!(
        no_io.command(),
        implemented & !COMMAND_IO & !COMMAND_INTX_DISABLE
    );
    // The interrupt pin says whether INTx exists (§6.2.4: "a value of 0 indicates that the
    // device uses no interrupt pin").
    assert_eq!(read16(&no_io, INTERRUPT_LINE) >> 8, 0);
    assert_eq!(read16(&pci, INTERRUPT_LINE) >> 8, 1);
}

#[test]
fn status_register_writes_can_clear_but_never_set() {
    // §6.2.3: "Reads to this register behave normally. Writes are slightly different in that
    // bits can be reset, but not set."
    let pci = function();
    let irqs = irqs();
    write16(&pci, header::STATUS, u16::MAX, &irqs);
    assert_eq!(read16(&pci, header::STATUS), header::STATUS_CAP_LIST);
    // Interrupt Status is read-only: a 1 written to it does not clear an asserted INTx.
    pci.signal(IRQ_INDEX_INTX, 0, &irqs);
    write16(&pci, header::STATUS, header::STATUS_INTERRUPT, &irqs);
    assert_ne!(read16(&pci, header::STATUS) & header::STATUS_INTERRUPT, 0);
}

#[test]
fn capability_list_holds_express_msix_and_msi_and_ends() {
    // §6.7: "Each capability must be DWORD aligned. The bottom two bits of all pointers
    // (including the initial pointer at 34h) are reserved and must be implemented as 00b
    // although software must mask them to allow for future uses of these bits." ... "The
    // Next Pointer of the last capability in the list must be set to 00h."
    let pci = function();
    assert_ne!(read16(&pci, header::STATUS) & header::STATUS_CAP_LIST, 0);
    let ids: Vec<u8> = capabilities(&pci).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, [cap::ID_EXPRESS, cap::ID_MSIX, cap::ID_MSI]);
    for (at, _) in capabilities(&pci) {
        assert!((0x40..0x100).contains(&at), "capability at {at:#x}");
    }
    // PCI Express Base 4.0, §7.6.3: "Absence of any Extended Capabilities is required to be
    // indicated by an Extended Capability header with a Capability ID of 0000h, a Capability
    // Version of 0h, and a Next Capability Offset of 000h."
    assert_eq!(read32(&pci, 0x100), 0);
    // §7.5.3.2 (PCI Express Capabilities Register): version 2, device/port type 0000b (a PCI
    // Express endpoint).
    let express = capability(&pci, cap::ID_EXPRESS);
    assert_eq!(read16(&pci, express + 2), 0x0002);

    // A conventional function has 256 bytes of config space and no Express capability.
    let mut spec = full_spec();
    spec.express = false;
    spec.msi = None;
    let conventional = PciFunction::new(spec).unwrap();
    assert_eq!(conventional.config_size(), CONFIG_SPACE_SIZE);
    let ids: Vec<u8> = capabilities(&conventional)
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, [cap::ID_MSIX]);

    // Without capabilities, the status bit is clear and the pointer 0.
    let bare = PciFunction::new(PciSpec {
        vendor_id: 1,
        ..PciSpec::default()
    })
    .unwrap();
    assert_eq!(read16(&bare, header::STATUS), 0);
    assert!(capabilities(&bare).is_empty());
    assert_eq!(bare.interrupt_mode(), InterruptMode::None);
}

#[test]
fn msix_capability_locates_the_table_and_pba() {
    // §6.8.2.4: "Table Offset/Table BIR ... Table BIR: Indicates which one of a function's
    // Base Address registers ... is used to map the function's MSI-X Table into Memory
    // Space." §6.8.2.3: "Table Size: ... encoded as N-1".
    let pci = function();
    let irqs = irqs();
    let at = capability(&pci, cap::ID_MSIX);
    assert_eq!(read16(&pci, at + 2), 2, "3 vectors, encoded as N-1");
    assert_eq!(read32(&pci, at + 4), TABLE);
    assert_eq!(read32(&pci, at + 8), PBA);
    // Only Enable and Function Mask are writable.
    write16(&pci, at + 2, u16::MAX, &irqs);
    assert_eq!(
        read16(&pci, at + 2),
        2 | cap::MSIX_ENABLE | cap::MSIX_FUNCTION_MASK
    );
    write32(&pci, at + 4, 0, &irqs);
    assert_eq!(read32(&pci, at + 4), TABLE);
}

#[test]
fn msix_entries_reset_masked_and_keep_only_the_mask_bit_of_vector_control() {
    // §6.8.2.9: "Mask Bit ... This bit's state after reset is 1 (entry is masked)." Bits 31:1
    // of Vector Control are reserved.
    let pci = function();
    let irqs = irqs();
    for entry in 0..3 {
        assert_eq!(table_read32(&pci, entry, 3), cap::MSIX_ENTRY_MASKED);
    }
    table_write32(&pci, 1, 0, 0xfee0_0000, &irqs);
    table_write32(&pci, 1, 1, 0x1, &irqs);
    table_write32(&pci, 1, 2, 0x4021, &irqs);
    table_write32(&pci, 1, 3, u32::MAX, &irqs);
    assert_eq!(
        [0, 1, 2, 3].map(|w| table_read32(&pci, 1, w)),
        [0xfee0_0000, 0x1, 0x4021, cap::MSIX_ENTRY_MASKED]
    );
    table_write32(&pci, 1, 3, 0, &irqs);
    assert_eq!(table_read32(&pci, 1, 3), 0);
    // The PBA is read-only (§6.8.2.10: "Pending Bits ... read-only").
    pci.bar_write(0, u64::from(PBA), &[0xff; 8], &irqs);
    assert_eq!(pba(&pci), 0);
    // The rest of the BAR is the device's; an access across the table's edge is refused.
    assert!(!pci.claims(0, 0x10, 8).unwrap());
    assert!(!pci.claims(2, u64::from(TABLE), 4).unwrap());
    assert!(pci.claims(0, u64::from(TABLE) - 4, 8).is_err());
    assert!(pci.claims(0, u64::from(TABLE) + 3 * 16 - 4, 8).is_err());
}

#[test]
fn msix_masked_vector_sets_its_pending_bit_and_unmasking_sends_it() {
    // §6.8.2.9: "While a vector is masked, the function is prohibited from sending the
    // associated message, and the function must set the associated Pending bit whenever the
    // function would otherwise send the message. When software unmasks a vector whose
    // associated Pending bit is set, the function must schedule sending the associated
    // message, and clear the Pending bit as soon as the message has been sent."
    let pci = function();
    let irqs = irqs();
    let mut vector1 = irqs.wire_pipe(IRQ_INDEX_MSIX, 1);
    let at = capability(&pci, cap::ID_MSIX);

    // Disabled: MSI-X sends nothing and records nothing.
    assert!(!pci.signal(IRQ_INDEX_MSIX, 1, &irqs));
    assert_eq!(pba(&pci), 0);

    write16(&pci, at + 2, cap::MSIX_ENABLE, &irqs);
    assert_eq!(pci.interrupt_mode(), InterruptMode::Msix);
    assert!(!pci.signal(IRQ_INDEX_MSIX, 1, &irqs), "entry 1 is masked");
    assert_eq!(signals(&mut vector1), 0);
    assert_eq!(pba(&pci), 0b10);

    table_write32(&pci, 1, 3, 0, &irqs);
    assert_eq!(
        signals(&mut vector1),
        1,
        "the unmask sent the pending message"
    );
    assert_eq!(pba(&pci), 0);
    assert!(pci.signal(IRQ_INDEX_MSIX, 1, &irqs));
    assert_eq!(signals(&mut vector1), 1);
    // A vector the function does not have is not signalled.
    assert!(!pci.signal(IRQ_INDEX_MSIX, 3, &irqs));
}

#[test]
fn msix_function_mask_masks_every_vector() {
    // §6.8.2.3: "Function Mask: If 1, all of the vectors associated with the function are
    // masked, regardless of their per-vector Mask bit states. If 0, each vector's Mask bit
    // determines whether the vector is masked or not."
    let pci = function();
    let irqs = irqs();
    let mut vector0 = irqs.wire_pipe(IRQ_INDEX_MSIX, 0);
    let at = capability(&pci, cap::ID_MSIX);
    table_write32(&pci, 0, 3, 0, &irqs);
    write16(
        &pci,
        at + 2,
        cap::MSIX_ENABLE | cap::MSIX_FUNCTION_MASK,
        &irqs,
    );
    assert!(!pci.signal(IRQ_INDEX_MSIX, 0, &irqs));
    assert_eq!(pba(&pci), 0b1);
    assert_eq!(signals(&mut vector0), 0);
    write16(&pci, at + 2, cap::MSIX_ENABLE, &irqs);
    assert_eq!(signals(&mut vector0), 1);
    assert_eq!(pba(&pci), 0);
}

#[test]
fn msi_sends_only_enabled_unmasked_vectors_and_holds_masked_ones_pending() {
    // §6.8.1.3: "Multiple Message Enable: Software writes to this field to indicate the
    // number of allocated vectors (equal to or less than the number of requested vectors)."
    // §6.8.1.7/8: "For each Mask bit that is set, the function is prohibited from sending the
    // associated message." "For each Pending bit that is set, the function has a pending
    // associated message."
    let pci = function();
    let irqs = irqs();
    let at = capability(&pci, cap::ID_MSI);
    let control = read16(&pci, at + 2);
    assert_eq!(control >> 1 & 0x7, 2, "Multiple Message Capable: 4 vectors");
    assert_ne!(control & cap::MSI_64BIT, 0);
    assert_ne!(control & cap::MSI_PER_VECTOR_MASK, 0);
    // Multiple Message Capable is read-only.
    write16(&pci, at + 2, 0x000e, &irqs);
    assert_eq!(read16(&pci, at + 2), control);
    let mut pipes: Vec<_> = (0..4).map(|v| irqs.wire_pipe(IRQ_INDEX_MSI, v)).collect();

    assert!(!pci.signal(IRQ_INDEX_MSI, 0, &irqs), "MSI is disabled");
    // Enable 2 of the 4 vectors, and mask vector 1.
    write32(&pci, at + 0x10, 0b10, &irqs);
    write16(&pci, at + 2, cap::MSI_ENABLE | 1 << 4, &irqs);
    assert_eq!(pci.interrupt_mode(), InterruptMode::Msi);
    assert!(pci.signal(IRQ_INDEX_MSI, 0, &irqs));
    assert!(!pci.signal(IRQ_INDEX_MSI, 1, &irqs));
    assert!(
        !pci.signal(IRQ_INDEX_MSI, 2, &irqs),
        "only 2 vectors enabled"
    );
    assert_eq!(
        pipes.iter_mut().map(signals).collect::<Vec<_>>(),
        [1, 0, 0, 0]
    );
    assert_eq!(read32(&pci, at + 0x14), 0b10, "vector 1 pending");
    // The Pending bits are read-only.
    write32(&pci, at + 0x14, 0, &irqs);
    assert_eq!(read32(&pci, at + 0x14), 0b10);
    // Mask bits beyond the function's vectors are reserved.
    write32(&pci, at + 0x10, u32::MAX, &irqs);
    assert_eq!(read32(&pci, at + 0x10), 0b1111);
    write32(&pci, at + 0x10, 0, &irqs);
    assert_eq!(
        signals(&mut pipes[1]),
        1,
        "unmasking sent the pending vector"
    );
    assert_eq!(read32(&pci, at + 0x14), 0);
    // The message address keeps its low two bits zero (dword aligned).
    write32(&pci, at + 4, u32::MAX, &irqs);
    assert_eq!(read32(&pci, at + 4), !0x3);
}

#[test]
fn intx_disable_and_status_follow_the_command_register() {
    // §6.2.3 (Status bit 3): "This read-only bit reflects the state of the interrupt in the
    // device/function. Only when the Interrupt Disable bit in the command register is a 0 and
    // this Interrupt Status bit is a 1, will the device's/function's INTx# signal be asserted.
    // Setting the Interrupt Disable bit to a 1 has no effect on the state of this bit."
    let pci = function();
    let irqs = irqs();
    let mut intx = irqs.wire_pipe(IRQ_INDEX_INTX, 0);
    assert_eq!(pci.interrupt_mode(), InterruptMode::Intx);

    write16(&pci, header::COMMAND, header::COMMAND_INTX_DISABLE, &irqs);
    assert!(!pci.signal_interrupt(0, &irqs));
    assert_ne!(read16(&pci, header::STATUS) & header::STATUS_INTERRUPT, 0);
    assert_eq!(signals(&mut intx), 0);
    // Clearing Interrupt Disable while the condition holds asserts INTx.
    write16(&pci, header::COMMAND, 0, &irqs);
    assert_eq!(signals(&mut intx), 1);

    pci.deassert_intx(&irqs);
    assert_eq!(read16(&pci, header::STATUS) & header::STATUS_INTERRUPT, 0);
    write16(&pci, header::COMMAND, header::COMMAND_INTX_DISABLE, &irqs);
    write16(&pci, header::COMMAND, 0, &irqs);
    assert_eq!(signals(&mut intx), 0, "nothing asserted, nothing sent");
}

#[test]
fn intx_is_automasked_and_a_deasserted_signal_is_withdrawn() {
    // vfio's INTx: "VFIO_IRQ_INFO_AUTOMASKED ... the interrupt is masked when it fires and
    // must be unmasked" (linux/vfio.h); a level interrupt deasserted while masked must not
    // fire on unmask.
    let pci = function();
    let irqs = irqs();
    let mut intx = irqs.wire_pipe(IRQ_INDEX_INTX, 0);
    assert!(pci.signal_interrupt(0, &irqs));
    assert!(
        !pci.signal_interrupt(0, &irqs),
        "masked by the first signal"
    );
    assert_eq!(signals(&mut intx), 1);
    irqs.set_masked(IRQ_INDEX_INTX, 0, false);
    assert_eq!(signals(&mut intx), 1, "the unmask sends the held signal");

    assert!(!pci.signal_interrupt(0, &irqs));
    pci.deassert_intx(&irqs);
    irqs.set_masked(IRQ_INDEX_INTX, 0, false);
    assert_eq!(signals(&mut intx), 0, "deasserted before the unmask");
}

#[test]
fn signal_interrupt_prefers_msix_then_msi_then_intx() {
    // §6.8: "A function is permitted to implement both MSI and MSI-X, but system software is
    // prohibited from enabling both at the same time" and, once MSI or MSI-X is enabled, "the
    // function is prohibited from using its INTx# pin".
    let pci = function();
    let irqs = irqs();
    let mut intx = irqs.wire_pipe(IRQ_INDEX_INTX, 0);
    let mut msi = irqs.wire_pipe(IRQ_INDEX_MSI, 0);
    let mut msix = irqs.wire_pipe(IRQ_INDEX_MSIX, 0);
    let msi_at = capability(&pci, cap::ID_MSI);
    let msix_at = capability(&pci, cap::ID_MSIX);

    write16(&pci, msi_at + 2, cap::MSI_ENABLE, &irqs);
    assert!(pci.signal_interrupt(0, &irqs));
    write16(&pci, msix_at + 2, cap::MSIX_ENABLE, &irqs);
    table_write32(&pci, 0, 3, 0, &irqs);
    assert!(pci.signal_interrupt(0, &irqs));
    assert_eq!(
        [signals(&mut intx), signals(&mut msi), signals(&mut msix)],
        [0, 1, 1]
    );
    assert_eq!(read16(&pci, header::STATUS) & header::STATUS_INTERRUPT, 0);
}

#[test]
fn wiring_vectors_enables_and_unmasks_them_as_the_host_kernel_does() {
    // The host kernel's vfio-pci enables MSI-X and unmasks the vectors in the hardware when
    // SET_IRQS wires eventfds; a client that emulates the table (QEMU) never writes ours.
    let pci = function();
    let irqs = irqs();
    let mut vector0 = irqs.wire_pipe(IRQ_INDEX_MSIX, 0);
    pci.vectors_wired(IRQ_INDEX_MSIX, 0..2, true, &irqs);
    assert_eq!(pci.interrupt_mode(), InterruptMode::Msix);
    assert_eq!(table_read32(&pci, 0, 3), 0);
    assert_eq!(table_read32(&pci, 2, 3), cap::MSIX_ENTRY_MASKED);
    assert!(pci.signal_interrupt(0, &irqs));
    assert_eq!(signals(&mut vector0), 1);

    pci.vectors_wired(IRQ_INDEX_MSIX, 0..1, false, &irqs);
    assert!(!pci.signal_interrupt(0, &irqs));
    assert_eq!(pba(&pci), 0b1, "held pending while unwired");
    pci.index_disabled(IRQ_INDEX_MSIX);
    assert_eq!(pci.interrupt_mode(), InterruptMode::Intx);

    // MSI: wiring 3 vectors enables 4 (a power of two), and unmasks them.
    let msi_at = capability(&pci, cap::ID_MSI);
    write32(&pci, msi_at + 0x10, 0b1111, &irqs);
    pci.vectors_wired(IRQ_INDEX_MSI, 0..3, true, &irqs);
    assert_eq!(pci.interrupt_mode(), InterruptMode::Msi);
    assert_eq!(read16(&pci, msi_at + 2) >> 4 & 0x7, 2);
    assert_eq!(read32(&pci, msi_at + 0x10), 0b1000);
}

#[test]
fn reset_returns_the_power_on_state() {
    // §6.2.2: "A value of 0 in this register logically disconnects a device from the PCI bus
    // for all accesses except configuration accesses" (the command register after reset).
    let pci = function();
    let irqs = irqs();
    write16(&pci, header::COMMAND, 0x6, &irqs);
    write32(&pci, header::BAR0, 0xfebd_1000, &irqs);
    pci.vectors_wired(IRQ_INDEX_MSIX, 0..3, true, &irqs);
    pci.vectors_wired(IRQ_INDEX_MSIX, 0..1, false, &irqs);
    pci.signal(IRQ_INDEX_MSIX, 0, &irqs);
    assert_eq!(pba(&pci), 1);
    pci.reset();
    assert_eq!(pci.command(), 0);
    assert_eq!(pci.bar_address(0), Some(0));
    assert_eq!(pci.interrupt_mode(), InterruptMode::Intx);
    assert_eq!(pba(&pci), 0);
    for entry in 0..3 {
        assert_eq!(table_read32(&pci, entry, 3), cap::MSIX_ENTRY_MASKED);
    }
}

#[test]
fn saved_state_loads_into_the_same_layout_and_nowhere_else() {
    let pci = function();
    let irqs = irqs();
    write16(&pci, header::COMMAND, 0x6, &irqs);
    write32(&pci, header::BAR0, 0xfebd_1000, &irqs);
    table_write32(&pci, 2, 0, 0xfee0_1000, &irqs);
    table_write32(&pci, 2, 2, 0x41, &irqs);
    let msix_at = capability(&pci, cap::ID_MSIX);
    write16(&pci, msix_at + 2, cap::MSIX_ENABLE, &irqs);
    pci.signal(IRQ_INDEX_MSIX, 2, &irqs);
    pci.signal(IRQ_INDEX_INTX, 0, &irqs);
    let record = pci.save();
    assert_eq!(record.len(), pci.saved_len());

    let target = function();
    target.load(&record).unwrap();
    assert_eq!(target.save(), record);
    assert_eq!(target.bar_address(0), Some(0xfebd_1000));
    assert_eq!(table_read32(&target, 2, 0), 0xfee0_1000);
    assert_eq!(pba(&target), 0b100, "pending survives, unsent");
    let mut vector2 = irqs.wire_pipe(IRQ_INDEX_MSIX, 2);
    table_write32(&target, 2, 3, 0, &irqs);
    assert_eq!(signals(&mut vector2), 1);

    // Another device: refused, and nothing changed.
    let mut other = full_spec();
    other.device_id = 0x7a02;
    let other = PciFunction::new(other).unwrap();
    let before = other.save();
    let err = other.load(&record).unwrap_err();
    assert!(err.to_string().contains("config offset 0x2"), "{err}");
    assert_eq!(other.save(), before);
    // Another size, or not a record at all.
    assert!(function().load(&record[..record.len() - 1]).is_err());
    let mut bad = record.clone();
    bad[0] = b'X';
    assert!(function().load(&bad).is_err());
    let mut fewer = full_spec();
    fewer.msix = fewer.msix.map(|m| MsixSpec { vectors: 2, ..m });
    assert!(PciFunction::new(fewer).unwrap().load(&record).is_err());
}

#[test]
fn specs_that_break_pci_rules_are_refused_with_the_rule() {
    let refused = |change: fn(&mut PciSpec), says: &str| {
        let mut spec = full_spec();
        change(&mut spec);
        let err = PciFunction::new(spec).unwrap_err().to_string();
        assert!(err.contains(says), "{err:?} should say {says:?}");
    };
    refused(
        |s| {
            s.bars[0] = Some(Bar {
                size: 3000,
                kind: BarKind::Memory32,
            })
        },
        "not a power of two",
    );
    refused(
        |s| {
            s.bars[4] = Some(Bar {
                size: 512,
                kind: BarKind::Io,
            })
        },
        "4 to 256",
    );
    refused(
        |s| {
            s.bars[5] = Some(Bar {
                size: 4096,
                kind: BarKind::Memory64 {
                    prefetchable: false,
                },
            })
        },
        "next BAR's slot",
    );
    refused(
        |s| {
            s.bars[3] = Some(Bar {
                size: 16,
                kind: BarKind::Memory32,
            })
        },
        "next BAR's slot",
    );
    refused(|s| s.class = 0x100_0000, "24 bits");
    refused(
        |s| {
            s.msi = Some(MsiSpec {
                vectors: 3,
                per_vector_mask: false,
            })
        },
        "1, 2, 4, 8, 16 or 32",
    );
    refused(
        |s| s.msix = s.msix.map(|m| MsixSpec { vectors: 0, ..m }),
        "1 to 2048",
    );
    refused(
        |s| {
            s.msix = s.msix.map(|m| MsixSpec {
                table_offset: 0xff8,
                ..m
            })
        },
        "inside BAR0",
    );
    refused(
        |s| {
            s.msix = s.msix.map(|m| MsixSpec {
                pba_offset: TABLE + 16,
                ..m
            })
        },
        "overlap",
    );
    refused(
        |s| s.msix = s.msix.map(|m| MsixSpec { table_bar: 4, ..m }),
        "I/O BAR",
    );
    refused(
        |s| s.msix = s.msix.map(|m| MsixSpec { pba_bar: 1, ..m }),
        "BAR1 does not exist",
    );
}
