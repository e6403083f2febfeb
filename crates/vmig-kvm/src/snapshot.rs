//! A paused VM saved to a file and continued in another process: the configuration, every
//! vCPU's state and the non-zero pages of guest RAM.
//!
//! ```text
//! "VMIGSNAP" | version u32 | header length u32 | header (JSON: config, vCPU states, memory digest)
//! runs:  gpa u64 | pages u64 | pages × 4096 bytes      (only pages that are not all zero)
//! end:   u64::MAX | 0
//! trailer: digest of the header and every run u64
//! ```
//!
//! Loading checks every field against the layout the configuration implies, the trailer, and
//! finally the digest of the loaded memory against the one the header recorded.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use vmig_primitives::GuestAddress;

use serde::{Deserialize, Serialize};

use crate::error::{KvmError, Result};
use crate::memory::{GuestMemory, PAGE_BYTES, PAGE_SIZE, host_offset, page_digest};
use crate::vcpu::VcpuState;
use crate::vm::{Vm, VmConfig};

const MAGIC: &[u8; 8] = b"VMIGSNAP";
// 2: a sparse page (at most 64 non-zero words) enters the memory digest by its words.
const VERSION: u32 = 2;
const MAX_HEADER: u32 = 16 << 20;
const END: u64 = u64::MAX;

#[derive(Serialize, Deserialize)]
struct Header {
    config: VmConfig,
    vcpus: Vec<VcpuState>,
    memory_digest: u64,
}

/// Writes the paused `vm` to `path`.
pub fn save(vm: &Vm, path: &Path) -> Result<()> {
    if !vm.is_paused() {
        return Err(KvmError::Order("pause the VM before saving it".into()));
    }
    let header = Header {
        config: vm.config().clone(),
        vcpus: vm.save_vcpus()?,
        memory_digest: vm.memory().digest()?,
    };
    let json = serde_json::to_vec(&header).map_err(KvmError::SnapshotEncode)?;
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(MAGIC)?;
    out.write_all(&VERSION.to_le_bytes())?;
    let header_len = u32::try_from(json.len()).map_err(|_| {
        KvmError::Snapshot(format!(
            "a header of {} bytes: at most {} bytes fit the format",
            json.len(),
            u32::MAX
        ))
    })?;
    out.write_all(&header_len.to_le_bytes())?;
    out.write_all(&json)?;
    let mut trailer = RunDigest::default();
    trailer.add(&json);
    let mut page = vec![0u8; PAGE_BYTES];
    for slot in vm.memory().slots() {
        let mut run: Vec<u8> = Vec::new();
        let mut run_gpa = 0;
        for index in 0..=slot.layout.pages() {
            let nonzero = index < slot.layout.pages() && {
                slot.host()
                    .read(host_offset(index * PAGE_SIZE), &mut page)?;
                page.iter().any(|&b| b != 0)
            };
            if nonzero {
                if run.is_empty() {
                    run_gpa = slot.layout.gpa + index * PAGE_SIZE;
                }
                run.extend_from_slice(&page);
            }
            if (!nonzero || run.len() >= 16 << 20) && !run.is_empty() {
                let head = [
                    run_gpa.to_le_bytes(),
                    (run.len() as u64 / PAGE_SIZE).to_le_bytes(),
                ]
                .concat();
                trailer.add(&head);
                for page in run.chunks(PAGE_BYTES) {
                    trailer.add(page);
                }
                out.write_all(&head)?;
                out.write_all(&run)?;
                run.clear();
            }
        }
    }
    out.write_all(&END.to_le_bytes())?;
    out.write_all(&0u64.to_le_bytes())?;
    out.write_all(&trailer.finish().to_le_bytes())?;
    out.flush()?;
    Ok(())
}

/// Creates a VM from the snapshot at `path`, paused at the instruction where it was saved.
/// `dirty_log` overrides the tracking mode the snapshot was taken with.
pub fn restore(path: &Path, dirty_log: Option<crate::DirtyLogMode>) -> Result<Vm> {
    let file = File::open(path).map_err(|source| KvmError::SnapshotOpen {
        path: path.to_owned(),
        source,
    })?;
    let mut input = BufReader::new(file);
    let mut fixed = [0u8; 16];
    read_exact(&mut input, &mut fixed, "the file header")?;
    if &fixed[..8] != MAGIC {
        return Err(KvmError::Snapshot(format!(
            "{} is not a vmig snapshot (expected the magic \"VMIGSNAP\")",
            path.display()
        )));
    }
    let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(KvmError::Snapshot(format!(
            "snapshot version {version}; this vmig reads version {VERSION}"
        )));
    }
    let header_len = u32::from_le_bytes(fixed[12..16].try_into().unwrap());
    if header_len > MAX_HEADER {
        return Err(KvmError::Snapshot(format!(
            "header of {header_len} bytes: at most {MAX_HEADER} expected"
        )));
    }
    let mut json = vec![0u8; header_len as usize];
    read_exact(&mut input, &mut json, "the JSON header")?;
    let header: Header = serde_json::from_slice(&json).map_err(KvmError::SnapshotHeader)?;
    let mut config = header.config;
    if let Some(mode) = dirty_log {
        config.dirty_log = mode;
    }
    Vm::restore(&config, &header.vcpus, |memory| {
        load_memory(&mut input, memory, &json)?;
        let digest = memory.digest()?;
        if digest != header.memory_digest {
            return Err(KvmError::Snapshot(format!(
                "loaded memory digest {digest:#x} differs from the saved {:#x}",
                header.memory_digest
            )));
        }
        Ok(())
    })
}

fn load_memory(input: &mut impl Read, memory: &GuestMemory, header: &[u8]) -> Result<()> {
    let mut trailer = RunDigest::default();
    trailer.add(header);
    let mut page = vec![0u8; PAGE_BYTES];
    loop {
        let mut head = [0u8; 16];
        read_exact(input, &mut head, "a memory run header")?;
        let gpa = u64::from_le_bytes(head[..8].try_into().unwrap());
        let pages = u64::from_le_bytes(head[8..].try_into().unwrap());
        if gpa == END {
            if pages != 0 {
                return Err(KvmError::Snapshot(
                    "the end record is malformed: the file is corrupted".into(),
                ));
            }
            break;
        }
        trailer.add(&head);
        let fits = gpa % PAGE_SIZE == 0
            && pages > 0
            && memory.slots().iter().any(|s| {
                gpa >= s.layout.gpa
                    && (gpa - s.layout.gpa) / PAGE_SIZE < s.layout.pages()
                    && pages <= s.layout.pages() - (gpa - s.layout.gpa) / PAGE_SIZE
            });
        if !fits {
            return Err(KvmError::Snapshot(format!(
                "memory run at {gpa:#x} of {pages} pages is not inside one RAM slot of this VM"
            )));
        }
        for i in 0..pages {
            read_exact(input, &mut page, "memory pages")?;
            trailer.add(&page);
            memory.write(GuestAddress(gpa + i * PAGE_SIZE), &page)?;
        }
    }
    let mut digest = [0u8; 8];
    read_exact(input, &mut digest, "the trailer")?;
    if u64::from_le_bytes(digest) != trailer.finish() {
        return Err(KvmError::Snapshot(
            "header and memory records do not match the trailer digest: the file is corrupted"
                .into(),
        ));
    }
    let mut extra = [0u8; 1];
    if input.read(&mut extra)? != 0 {
        return Err(KvmError::Snapshot("bytes after the trailer".into()));
    }
    Ok(())
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    input.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            KvmError::Snapshot(format!("truncated: the file ends inside {what}"))
        } else {
            KvmError::Io(e)
        }
    })
}

#[derive(Default)]
struct RunDigest(u64);

impl RunDigest {
    fn add(&mut self, bytes: &[u8]) {
        self.0 = page_digest(
            &[
                self.0.to_le_bytes().as_slice(),
                &page_digest(bytes).to_le_bytes(),
            ]
            .concat(),
        );
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
