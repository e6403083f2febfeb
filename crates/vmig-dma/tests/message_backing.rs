//! Message-backed mappings (`Backing::Message`): the same table rules as fd-backed mappings,
//! accesses carried by the owner's callback, no pinning, no host slices, and no dirty bits (the
//! owner of the memory records the writes that reach it).

use std::sync::{Arc, Mutex};
use vmig_primitives::Iova;

use vmig_dma::{
    Backing, DirtyRead, DmaError, Iommu, IommuConfig, MessageDma, MessageDmaError, Prot, UnmapScope,
};
use vmig_primitives::{HostMemory, PAGE_SIZE};

const PG: u64 = PAGE_SIZE;
const BASE: u64 = 0x10_0000;

/// Owner memory: 4 pages at `BASE`, and a switch that makes every access fail.
#[derive(Debug, Default)]
struct Owner {
    bytes: Mutex<Vec<u8>>,
    broken: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("the owner is broken")]
struct Broken;

impl Owner {
    fn at(&self, iova: u64, len: usize) -> Result<usize, MessageDmaError> {
        if self.broken.load(std::sync::atomic::Ordering::Acquire) {
            return Err(MessageDmaError::new(libc::ENOTCONN, Broken));
        }
        let at = usize::try_from(iova - BASE).unwrap();
        assert!(at + len <= self.bytes.lock().unwrap().len());
        Ok(at)
    }
}

impl MessageDma for Owner {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), MessageDmaError> {
        let at = self.at(iova, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), MessageDmaError> {
        let at = self.at(iova, data.len())?;
        self.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn setup() -> (Iommu, Arc<Owner>) {
    let iommu = Iommu::new(IommuConfig::default()).unwrap();
    let owner = Arc::new(Owner {
        bytes: Mutex::new(vec![0; 4 * 4096]),
        ..Owner::default()
    });
    iommu
        .map(
            Iova(BASE),
            4 * PG,
            Backing::Message(owner.clone()),
            Prot::READ_WRITE,
        )
        .unwrap();
    (iommu, owner)
}

#[test]
fn message_mappings_follow_the_table_rules() {
    let (iommu, owner) = setup();
    let errno = |r: Result<(), DmaError>| r.expect_err("expected a refusal").errno();
    // Overlap with a message mapping or an fd one is EEXIST either way.
    let memory = Arc::new(HostMemory::anonymous(4 * PG).unwrap());
    let host = Backing::Memory {
        memory: Arc::clone(&memory),
        offset: 0,
    };
    assert_eq!(
        errno(iommu.map(Iova(BASE + PG), PG, host, Prot::READ)),
        libc::EEXIST
    );
    let message = Backing::Message(owner.clone());
    assert_eq!(
        errno(iommu.map(Iova(BASE + 3 * PG), 2 * PG, message, Prot::READ)),
        libc::EEXIST
    );
    // Alignment and size rules as for any mapping.
    let message = Backing::Message(owner.clone());
    assert_eq!(
        errno(iommu.map(Iova(0x800), PG, message, Prot::READ)),
        libc::EINVAL
    );
    let message = Backing::Message(owner.clone());
    assert_eq!(
        errno(iommu.map(Iova(0), 0, message, Prot::READ)),
        libc::EINVAL
    );
    let info = iommu.mappings();
    assert_eq!(info.len(), 1);
    assert!(info[0].by_message);
    // Unmap never splits it; a whole unmap removes it.
    assert_eq!(
        iommu
            .unmap(Iova(BASE), PG, UnmapScope::Range)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        iommu.unmap(Iova(BASE), 4 * PG, UnmapScope::Range).unwrap(),
        4 * PG
    );
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn message_accesses_reach_the_owner_and_leave_no_dirty_bits() {
    let (iommu, owner) = setup();
    iommu.start_dirty_tracking().unwrap();
    iommu.write(Iova(BASE + PG - 2), b"abcd").unwrap();
    assert_eq!(&owner.bytes.lock().unwrap()[4094..4098], b"abcd");
    let mut back = [0u8; 4];
    iommu.read(Iova(BASE + PG - 2), &mut back).unwrap();
    assert_eq!(&back, b"abcd");
    let mut bitmap = [0u64; 1];
    iommu
        .get_dirty_bitmap(Iova(BASE), 4 * PG, PG, &mut bitmap, DirtyRead::Clear)
        .unwrap();
    assert_eq!(bitmap[0], 0, "the owner records what reaches it");
    let mut bitmap = [u64::MAX; 1];
    iommu
        .unmap_with_dirty_bitmap(Iova(BASE), 4 * PG, PG, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0], 0);
}

#[test]
fn message_mappings_refuse_pins_and_host_slices_and_pass_the_owners_errno() {
    let (iommu, owner) = setup();
    let group = iommu.attach_group(vmig_dma::GroupKind::Mediated, 1);
    assert_eq!(
        iommu
            .pin_pages(group, Iova(BASE), 1, Prot::READ)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    assert_eq!(
        iommu
            .with_host_slices(Iova(BASE), 8, Prot::READ, |_| ())
            .unwrap_err()
            .errno(),
        libc::EFAULT
    );
    owner
        .broken
        .store(true, std::sync::atomic::Ordering::Release);
    let err = iommu.write(Iova(BASE), b"x").unwrap_err();
    assert_eq!(err.errno(), libc::ENOTCONN);
    assert!(matches!(
        err,
        DmaError::Message {
            iova: BASE,
            len: 1,
            ..
        }
    ));
}

/// An owner that answers a read only when told to, and says when a read arrived.
#[derive(Debug)]
struct SlowOwner {
    arrived: std::sync::mpsc::SyncSender<()>,
    answer: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl MessageDma for SlowOwner {
    fn read(&self, _iova: u64, buf: &mut [u8]) -> Result<(), MessageDmaError> {
        self.arrived.send(()).unwrap();
        self.answer.lock().unwrap().recv().unwrap();
        buf.fill(0x5a);
        Ok(())
    }

    fn write(&self, _iova: u64, _data: &[u8]) -> Result<(), MessageDmaError> {
        Ok(())
    }
}

/// An IOMMU with a slow owner's page at `BASE` and a host page after it; a device thread whose
/// read of the owner's page is in flight (the owner has it and has not answered); the sender
/// that lets the owner answer.
fn read_in_flight() -> (
    Arc<Iommu>,
    std::thread::JoinHandle<Vec<u8>>,
    std::sync::mpsc::SyncSender<()>,
) {
    let (arrived_tx, arrived) = std::sync::mpsc::sync_channel(1);
    let (answer, answer_rx) = std::sync::mpsc::sync_channel(1);
    let iommu = Arc::new(Iommu::new(IommuConfig::default()).unwrap());
    let owner = Arc::new(SlowOwner {
        arrived: arrived_tx,
        answer: Mutex::new(answer_rx),
    });
    iommu
        .map(Iova(BASE), PG, Backing::Message(owner), Prot::READ_WRITE)
        .unwrap();
    let host = Arc::new(HostMemory::anonymous(PG).unwrap());
    iommu
        .map(
            Iova(BASE + PG),
            PG,
            Backing::Memory {
                memory: host,
                offset: 0,
            },
            Prot::READ_WRITE,
        )
        .unwrap();
    let device = {
        let iommu = Arc::clone(&iommu);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64];
            iommu.read(Iova(BASE), &mut buf).unwrap();
            buf
        })
    };
    arrived.recv().unwrap();
    (iommu, device, answer)
}

/// "No other operation waits behind them" (the IOMMU's table is not held while an owner
/// answers): dirty tracking starts and stops, host DMA and maps go on while a message read is
/// in flight.
#[test]
fn a_slow_owner_holds_up_no_other_request() {
    let (iommu, device, answer) = read_in_flight();
    let others = {
        let iommu = Arc::clone(&iommu);
        std::thread::spawn(move || {
            iommu.start_dirty_tracking().unwrap();
            iommu.write(Iova(BASE + PG), b"host DMA").unwrap();
            let host = Arc::new(HostMemory::anonymous(PG).unwrap());
            iommu
                .map(
                    Iova(BASE + 2 * PG),
                    PG,
                    Backing::Memory {
                        memory: host,
                        offset: 0,
                    },
                    Prot::READ_WRITE,
                )
                .unwrap();
            iommu.stop_dirty_tracking().unwrap();
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !others.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let finished_first = others.is_finished();
    assert!(!device.is_finished(), "the owner has not answered yet");
    answer.send(()).unwrap();
    others.join().unwrap();
    assert!(
        finished_first,
        "the other requests waited for the owner's answer"
    );
    assert_eq!(device.join().unwrap(), [0x5a; 64]);
}

/// An unmap of a message-backed mapping returns only once the access in flight to it is
/// done: after it returns, no DMA to the range is outstanding.
#[test]
fn an_unmap_waits_for_the_access_in_flight() {
    let (iommu, device, answer) = read_in_flight();
    let unmapper = {
        let iommu = Arc::clone(&iommu);
        std::thread::spawn(move || iommu.unmap(Iova(BASE), PG, UnmapScope::Range).unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !unmapper.is_finished(),
        "the unmap returned while a read of the range was in flight"
    );
    answer.send(()).unwrap();
    assert_eq!(device.join().unwrap(), [0x5a; 64]);
    assert_eq!(unmapper.join().unwrap(), PG);
    let mut buf = [0u8; 8];
    assert!(matches!(
        iommu.read(Iova(BASE), &mut buf),
        Err(DmaError::Invalid(_))
    ));
}
