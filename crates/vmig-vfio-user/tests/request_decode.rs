//! The server's decoding of every command: what a conformant client sends is accepted, and each
//! malformed request is refused with the errno of its error reply and a message saying what was
//! expected. Random messages never panic the decoder: they decode or are refused with a reason.

use std::os::fd::OwnedFd;

use vmig_vfio_user::Message;
use vmig_vfio_user::server::request::{Request, decode};
use vmig_vfio_user::wire::*;
use zerocopy::IntoBytes;

fn message(command: u16, payload: Vec<u8>, fds: usize) -> Message {
    Message {
        header: Header {
            msg_id: 1,
            command,
            msg_size: 16 + u32::try_from(payload.len()).unwrap(),
            ..Header::default()
        },
        payload,
        fds: (0..fds).map(|_| OwnedFd::from(tempfile())).collect(),
    }
}

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "vmig-decode-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::File::create(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const MAX: u64 = 1 << 20;

#[test]
fn conformant_requests_decode() {
    let map = DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        addr: 0x1000,
        size: 0x2000,
    };
    assert!(matches!(
        decode(message(2, map.as_bytes().to_vec(), 1), MAX).unwrap(),
        Request::DmaMap { fd: Some(_), .. }
    ));
    assert!(matches!(
        decode(message(2, map.as_bytes().to_vec(), 0), MAX).unwrap(),
        Request::DmaMap { fd: None, .. }
    ));
    let unmap = DmaUnmap {
        argsz: 40,
        flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        addr: 0x1000,
        size: 0x2000,
    };
    let bitmap = DirtyBitmap {
        pgsize: 4096,
        size: 8,
    };
    match decode(
        message(3, cat(&[unmap.as_bytes(), bitmap.as_bytes()]), 0),
        MAX,
    )
    .unwrap()
    {
        Request::DmaUnmap {
            bitmap: Some(b), ..
        } => assert_eq!(b, bitmap),
        other => panic!("{other:?}"),
    }
    let access = RegionAccess {
        offset: 8,
        region: 0,
        count: 4,
    };
    match decode(
        message(10, cat(&[access.as_bytes(), &[1, 2, 3, 4]]), 0),
        MAX,
    )
    .unwrap()
    {
        Request::RegionWrite { data, .. } => assert_eq!(data, [1, 2, 3, 4]),
        other => panic!("{other:?}"),
    }
    let set = SetIrqs {
        argsz: 20,
        flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        index: 2,
        start: 0,
        count: 2,
    };
    assert!(
        matches!(decode(message(8, set.as_bytes().to_vec(), 2), MAX).unwrap(), Request::SetIrqs { ref fds, .. } if fds.len() == 2)
    );
    assert!(
        matches!(decode(message(8, set.as_bytes().to_vec(), 0), MAX).unwrap(), Request::SetIrqs { ref fds, .. } if fds.is_empty())
    );
    let feature = DeviceFeature {
        argsz: 16,
        flags: FEATURE_MIGRATION | FEATURE_GET,
    };
    assert!(matches!(
        decode(message(16, feature.as_bytes().to_vec(), 0), MAX).unwrap(),
        Request::Feature { .. }
    ));
    let read = MigData {
        argsz: 8 + 4096,
        size: 4096,
    };
    assert!(matches!(
        decode(message(17, read.as_bytes().to_vec(), 0), MAX).unwrap(),
        Request::MigDataRead { size: 4096 }
    ));
    let multi = WriteMultiEntry {
        offset: 0,
        region: 0,
        count: 4,
        data: [1; 8],
    };
    let payload = cat(&[&2u64.to_le_bytes(), multi.as_bytes(), multi.as_bytes()]);
    assert!(
        matches!(decode(message(15, payload, 0), MAX).unwrap(), Request::RegionWriteMulti(w) if w.len() == 2)
    );
    let range = DirtyBitmapRange {
        iova: 0,
        size: 1 << 20,
        bitmap: DirtyBitmap {
            pgsize: 4096,
            size: 32,
        },
    };
    let dirty = DirtyPages {
        argsz: 8 + 32 + 32,
        flags: DIRTY_PAGES_FLAG_GET_BITMAP,
    };
    assert!(matches!(
        decode(
            message(14, cat(&[dirty.as_bytes(), range.as_bytes()]), 0),
            MAX
        )
        .unwrap(),
        Request::DirtyPages { range: Some(_), .. }
    ));
}

#[test]
fn malformed_requests_are_refused_with_errno_and_reason() {
    let einval = libc::EINVAL;
    let map = |argsz, flags| {
        DmaMap {
            argsz,
            flags,
            offset: 0,
            addr: 0,
            size: 4096,
        }
        .as_bytes()
        .to_vec()
    };
    let access = RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
    };
    let big = RegionAccess {
        offset: 0,
        region: 0,
        count: u32::try_from(MAX + 1).unwrap(),
    };
    let irqs = |flags, count| {
        SetIrqs {
            argsz: 20,
            flags,
            index: 0,
            start: 0,
            count,
        }
        .as_bytes()
        .to_vec()
    };
    let cases: Vec<(Message, i32, &str)> = vec![
        (message(99, vec![], 0), libc::ENOSYS, "unknown command 99"),
        (message(0, vec![], 0), libc::ENOSYS, "unknown command 0"),
        (
            message(2, vec![0; 31], 0),
            einval,
            "DMA_MAP: 31 payload bytes, expected at least 32",
        ),
        (message(2, map(16, 3), 1), einval, "argsz 16: expected 32"),
        (
            message(2, map(32, 0x10), 1),
            einval,
            "only READ (1) and WRITE (2)",
        ),
        (message(2, map(32, 3), 2), einval, "at most one fd; 2 came"),
        (
            message(
                3,
                DmaUnmap {
                    argsz: 24,
                    flags: 4,
                    addr: 0,
                    size: 0,
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "only GET_DIRTY_BITMAP (1) and ALL (2)",
        ),
        (
            message(
                3,
                DmaUnmap {
                    argsz: 24,
                    flags: 2,
                    addr: 4096,
                    size: 0,
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "ALL takes addr 0",
        ),
        (
            message(
                3,
                DmaUnmap {
                    argsz: 24,
                    flags: 1,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "dirty bitmap: 0 payload bytes",
        ),
        (
            message(3, vec![0; 24], 1),
            einval,
            "takes no file descriptors; 1 came",
        ),
        (
            message(
                4,
                DeviceInfo {
                    argsz: 8,
                    ..Default::default()
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "argsz 8: expected at least 16",
        ),
        (
            message(
                5,
                RegionInfo {
                    argsz: 16,
                    ..Default::default()
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "argsz 16: expected at least 32",
        ),
        (
            message(9, vec![0; 8], 0),
            einval,
            "REGION_READ: 8 payload bytes",
        ),
        (
            message(9, big.as_bytes().to_vec(), 0),
            einval,
            "exceeds max_data_xfer_size",
        ),
        (
            message(10, cat(&[access.as_bytes(), &[1, 2]]), 0),
            einval,
            "count 4 but 2 data bytes",
        ),
        (
            message(
                8,
                irqs(
                    IRQ_SET_DATA_BOOL | IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK,
                    1,
                ),
                0,
            ),
            einval,
            "exactly one DATA_* and one ACTION_*",
        ),
        (
            message(8, irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 3), 2),
            einval,
            "2 fds for 3 vectors",
        ),
        (
            message(8, irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_MASK, 1), 1),
            einval,
            "goes with ACTION_TRIGGER",
        ),
        (
            message(
                8,
                cat(&[&irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 3), &[1]]),
                0,
            ),
            einval,
            "1 data bytes for 3 vectors",
        ),
        (
            message(15, cat(&[&5u64.to_le_bytes(), &[0; 24]]), 0),
            einval,
            "REGION_WRITE_MULTI of 5 writes",
        ),
        (
            message(
                15,
                cat(&[
                    &1u64.to_le_bytes(),
                    WriteMultiEntry {
                        count: 9,
                        ..Default::default()
                    }
                    .as_bytes(),
                ]),
                0,
            ),
            einval,
            "entry of 9 bytes",
        ),
        (
            message(14, DirtyPages { argsz: 8, flags: 3 }.as_bytes().to_vec(), 0),
            einval,
            "exactly one of START (1), STOP (2), GET_BITMAP (4)",
        ),
        (
            message(14, DirtyPages { argsz: 8, flags: 4 }.as_bytes().to_vec(), 0),
            einval,
            "GET_BITMAP range: 0 payload bytes",
        ),
        (
            message(
                16,
                DeviceFeature { argsz: 8, flags: 1 }.as_bytes().to_vec(),
                0,
            ),
            einval,
            "with GET, SET or PROBE",
        ),
        (
            message(
                16,
                DeviceFeature {
                    argsz: 8,
                    flags: 1 | FEATURE_GET | FEATURE_SET,
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "only together with PROBE",
        ),
        (
            message(
                16,
                DeviceFeature {
                    argsz: 8,
                    flags: 1 << 20,
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "flags 0x100000",
        ),
        (
            message(17, MigData { argsz: 8, size: 64 }.as_bytes().to_vec(), 0),
            einval,
            "no room for 64 bytes",
        ),
        (
            message(
                17,
                MigData {
                    argsz: u32::MAX,
                    size: u32::MAX,
                }
                .as_bytes()
                .to_vec(),
                0,
            ),
            einval,
            "exceeds max_data_xfer_size",
        ),
        (
            message(
                18,
                cat(&[MigData { argsz: 12, size: 8 }.as_bytes(), &[0; 4]]),
                0,
            ),
            einval,
            "size 8 but 4 data bytes",
        ),
        (
            message(11, DmaAccess::default().as_bytes().to_vec(), 0),
            einval,
            "goes from server to client",
        ),
        (
            message(1, vec![0, 0], 0),
            einval,
            "expected at least the 4-byte major/minor pair",
        ),
    ];
    for (msg, errno, expected) in cases {
        let command = msg.header.command;
        let err = decode(msg, MAX).unwrap_err();
        assert_eq!(err.errno, errno, "command {command}: {err}");
        assert!(
            err.message.contains(expected),
            "command {command}: `{}` lacks `{expected}`",
            err.message
        );
    }
    // A reply where a command belongs.
    let mut msg = message(4, vec![0; 16], 0);
    msg.header.flags = FLAG_TYPE_REPLY;
    assert!(
        decode(msg, MAX)
            .unwrap_err()
            .message
            .contains("is not a command")
    );
}

/// The command a decoded request answers.
fn command_of(request: &Request) -> u16 {
    match request {
        Request::Version { .. } => 1,
        Request::DmaMap { .. } => 2,
        Request::DmaUnmap { .. } => 3,
        Request::GetInfo => 4,
        Request::GetRegionInfo { .. } => 5,
        Request::GetRegionIoFds { .. } => 6,
        Request::GetIrqInfo { .. } => 7,
        Request::SetIrqs { .. } => 8,
        Request::RegionRead(_) => 9,
        Request::RegionWrite { .. } => 10,
        Request::Reset => 13,
        Request::DirtyPages { .. } => 14,
        Request::RegionWriteMulti(_) => 15,
        Request::Feature { .. } => 16,
        Request::MigDataRead { .. } => 17,
        Request::MigDataWrite(_) => 18,
    }
}

/// One well-formed message of every command a server accepts: (command, payload, fds).
fn conformant_seeds() -> Vec<(u16, Vec<u8>, usize)> {
    let access = RegionAccess {
        offset: 8,
        region: 0,
        count: 4,
    };
    let irqs = |flags, count| SetIrqs {
        argsz: 20,
        flags,
        index: 2,
        start: 0,
        count,
    };
    let multi = WriteMultiEntry {
        offset: 0,
        region: 0,
        count: 4,
        data: [1; 8],
    };
    let unmap = DmaUnmap {
        argsz: 40,
        flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        addr: 0x1000,
        size: 0x2000,
    };
    let bitmap = DirtyBitmap {
        pgsize: 4096,
        size: 8,
    };
    let range = DirtyBitmapRange {
        iova: 0,
        size: 1 << 20,
        bitmap: DirtyBitmap {
            pgsize: 4096,
            size: 32,
        },
    };
    let map = DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        addr: 0x1000,
        size: 0x2000,
    };
    let dirty = |flags| DirtyPages { argsz: 72, flags };
    let feature = DeviceFeature {
        argsz: 16,
        flags: FEATURE_MIGRATION | FEATURE_GET,
    };
    let caps = vmig_vfio_user::caps::encode(0, 2, &Default::default());
    vec![
        (1, caps, 0),
        (1, vec![0, 0, 2, 0], 0),
        (2, map.as_bytes().to_vec(), 1),
        (2, map.as_bytes().to_vec(), 0),
        (3, cat(&[unmap.as_bytes(), bitmap.as_bytes()]), 0),
        (
            3,
            DmaUnmap {
                argsz: 24,
                flags: 0,
                ..unmap
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            4,
            DeviceInfo {
                argsz: 16,
                ..Default::default()
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            5,
            RegionInfo {
                argsz: 32,
                ..Default::default()
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            6,
            RegionIoFds {
                argsz: 16,
                index: 1,
                ..Default::default()
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            7,
            IrqInfo {
                argsz: 16,
                index: 1,
                ..Default::default()
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            8,
            irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 2)
                .as_bytes()
                .to_vec(),
            2,
        ),
        (
            8,
            cat(&[
                irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 2).as_bytes(),
                &[1, 0],
            ]),
            0,
        ),
        (
            8,
            irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 1)
                .as_bytes()
                .to_vec(),
            0,
        ),
        (9, access.as_bytes().to_vec(), 0),
        (10, cat(&[access.as_bytes(), &[1, 2, 3, 4]]), 0),
        (13, vec![], 0),
        (14, dirty(DIRTY_PAGES_FLAG_START).as_bytes().to_vec(), 0),
        (
            14,
            cat(&[
                dirty(DIRTY_PAGES_FLAG_GET_BITMAP).as_bytes(),
                range.as_bytes(),
            ]),
            0,
        ),
        (
            15,
            cat(&[&2u64.to_le_bytes(), multi.as_bytes(), multi.as_bytes()]),
            0,
        ),
        (16, feature.as_bytes().to_vec(), 0),
        (
            17,
            MigData {
                argsz: 8 + 4096,
                size: 4096,
            }
            .as_bytes()
            .to_vec(),
            0,
        ),
        (
            18,
            cat(&[MigData { argsz: 12, size: 4 }.as_bytes(), &[9; 4]]),
            0,
        ),
    ]
}

/// What the fuzz target does, on stable Rust, starting from well-formed messages: each one
/// decodes to the request of its command; mutated (bits flipped, bytes set, fields set to
/// small numbers, cut, extended, another command, another type, other fds) or left alone,
/// they never panic the decoder, a good share still decodes (to the request of its command)
/// and a good share is refused, each refusal with the errno of its error reply and a message
/// (ENOSYS exactly for unknown commands).
#[test]
fn random_messages_never_panic_the_decoder() {
    let file = tempfile();
    let fds =
        |n: usize| -> Vec<OwnedFd> { (0..n).map(|_| file.try_clone().unwrap().into()).collect() };
    let build = |command: u16, payload: Vec<u8>, nfds: usize| {
        let mut msg = message(command, payload, 0);
        msg.fds = fds(nfds);
        msg
    };
    let seeds = conformant_seeds();
    for (command, payload, nfds) in &seeds {
        match decode(build(*command, payload.clone(), *nfds), MAX) {
            Ok(request) => assert_eq!(command_of(&request), *command, "{request:?}"),
            Err(err) => panic!("seed of command {command} refused: {err}"),
        }
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const MESSAGES: usize = 200_000;
    let (mut decoded, mut refused) = (0, 0);
    for _ in 0..MESSAGES {
        let (mut command, seed_payload, mut nfds) =
            seeds[usize::try_from(next()).unwrap() % seeds.len()].clone();
        let mut payload = seed_payload;
        let mut flags = 0;
        for _ in 0..next() % 3 {
            let at = |len: usize, r: u64| usize::try_from(r).unwrap() % len.max(1);
            match next() % 9 {
                0 if !payload.is_empty() => {
                    let bit = at(payload.len() * 8, next());
                    payload[bit / 8] ^= 1 << (bit % 8);
                }
                1 if !payload.is_empty() => {
                    let i = at(payload.len(), next());
                    payload[i] = next().to_le_bytes()[0];
                }
                2 if payload.len() >= 4 => {
                    // A plausible small number in an aligned field.
                    let i = at(payload.len() / 4, next()) * 4;
                    payload[i..i + 4].copy_from_slice(&((next() % 64) as u32).to_le_bytes());
                }
                3 => payload.truncate(at(payload.len() + 1, next())),
                4 => payload.extend((0..next() % 40).map(|_| next().to_le_bytes()[0])),
                5 => command = (next() % 21) as u16,
                6 => flags = FLAG_NO_REPLY,
                7 => flags = (next() % 16) as u32,
                _ => nfds = (next() % 4) as usize,
            }
        }
        let mut msg = build(command, payload, nfds);
        msg.header.flags = flags;
        match decode(msg, MAX) {
            Ok(request) => {
                decoded += 1;
                assert_eq!(command_of(&request), command, "{request:?}");
                assert_eq!(flags & FLAG_TYPE_MASK, FLAG_TYPE_COMMAND, "{request:?}");
            }
            Err(err) => {
                refused += 1;
                assert!(!err.message.is_empty(), "command {command}: {err:?}");
                assert_eq!(err.to_string(), err.message);
                let unknown =
                    flags & FLAG_TYPE_MASK == FLAG_TYPE_COMMAND && !(1..=18).contains(&command);
                let expected_errno = if unknown { libc::ENOSYS } else { libc::EINVAL };
                assert_eq!(err.errno, expected_errno, "command {command}: {err}");
                if unknown {
                    assert_eq!(err.message, format!("unknown command {command}"));
                }
            }
        }
    }
    // Both outcomes in good numbers: the mutations reach the checks and pass some of them.
    assert!(
        decoded > MESSAGES / 5 && refused > MESSAGES / 5,
        "{decoded} decoded and {refused} refused of {MESSAGES}"
    );
}
