//! A PCI device bound to vfio-pci (or a variant driver), in a type1 container of its own with
//! all of a VM's guest RAM mapped for DMA, IOVA = guest-physical address: the kernel-VFIO
//! half of [`crate::device::DeviceHandle`]. This module owns the one `unsafe` call the engine
//! makes, mapping guest RAM the container cannot keep alive by itself.

use std::sync::Arc;

use vmig_kvm::GuestMemory;
use vmig_vfio::{Container, Device, Section, VfioDeviceFd, VfioError};

/// A kernel VFIO device, its container and the guest RAM mapped into it.
pub struct KernelDevice {
    /// The device; declared first so it closes first and its group leaves the container
    /// before the container unmaps.
    pub device: Device,
    /// The container: guest RAM is mapped here, and its dirty tracking sees the device's DMA.
    pub container: Container,
    /// Whether the device logs its own DMA (`DMA_LOGGING_*`), checked once at attach.
    pub dma_logging: bool,
    /// Keeps guest RAM alive as long as it is mapped: dropped last.
    _memory: Arc<GuestMemory>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("device", &self.device)
            .field("dma_logging", &self.dma_logging)
            .finish_non_exhaustive()
    }
}

impl KernelDevice {
    /// Opens PCI device `bdf` in a new container, its group registered with the VM's KVM VFIO
    /// device `kvm_vfio`, and maps every slot of `memory` into it.
    pub fn open(
        bdf: &str,
        memory: &Arc<GuestMemory>,
        kvm_vfio: Arc<VfioDeviceFd>,
    ) -> Result<Self, VfioError> {
        let container = Container::open(Some(kvm_vfio))?;
        let device = container.open_device(bdf)?;
        for slot in memory.slots() {
            let section = Section {
                gpa: slot.layout.gpa,
                size: u128::from(slot.layout.size),
                host_addr: slot.host().as_ptr() as u64,
            };
            // SAFETY: the section is exactly the host mapping of this slot, which lives as long
            // as `memory`; the struct keeps `memory` and drops it after the container, which
            // unmaps everything when dropped (on an error here, the container is dropped while
            // the caller still holds `memory`). Guest RAM is only accessed through raw copies
            // and atomics, so device writes into it break no Rust aliasing rule.
            unsafe { container.map_guest_section(section) }?;
        }
        let dma_logging = device.dma_logging_supported();
        Ok(Self {
            device,
            container,
            dma_logging,
            _memory: Arc::clone(memory),
        })
    }
}
