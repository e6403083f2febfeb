//! Round trips and refusals of every record kind.

use super::*;
use crate::stream::{RecordReader, RecordWriter, page_digest};
use vmig_primitives::GuestAddress;

/// The fixed heads have the sizes the wire format gives them.
#[test]
fn heads_have_their_wire_sizes() {
    assert_eq!(size_of::<PagesHead>(), 8);
    assert_eq!(size_of::<PageEntry>(), 8);
    assert_eq!(size_of::<PassEndHead>(), 4);
    assert_eq!(size_of::<DeviceDataHead>(), 8);
    assert_eq!(size_of::<DeviceEndHead>(), 20);
    assert_eq!(size_of::<DigestsHead>(), 12);
}

#[test]
fn kind_zero_and_unknown_kinds_are_no_kind() {
    assert_eq!(Kind::from_u16(0), None);
    assert_eq!(Kind::from_u16(17), None);
    for kind in Kind::ALL {
        assert_eq!(Kind::from_u16(kind as u16), Some(kind));
        assert_eq!(kind.name(), format!("{kind:?}"));
    }
}

/// A page of recognisable data.
pub(crate) fn page() -> Vec<u8> {
    (0..PAGE_BYTES)
        .map(|i| (i % 251).to_le_bytes()[0])
        .collect()
}

/// One record of each kind, with non-trivial contents; `data` is one page, `page_digests`
/// its digest in the `Pages` record, `digests` backs the `Digests` record.
pub(crate) fn one_of_each<'a>(
    data: &'a [u8],
    entries: &'a [PageEntry],
    page_digests: &'a [U64],
    digests: &'a [U64],
) -> Vec<Record<'a>> {
    let config = MigrationConfig {
        vm: VmConfig::default(),
        devices: vec![DeviceDescription {
            name: "dev0".into(),
            protocol: MigrationProtocol::V2 { pre_copy: true },
            bars: vec![Bar {
                index: 0,
                gpa: GuestAddress(0xfe00_0000),
                size: 0x1000,
                space: crate::device::BarSpace::Memory,
            }],
            mapped: vec![MappedArea {
                region: 0,
                gpa: GuestAddress(0xfe00_0000),
                len: 0x1000,
            }],
            kind: DeviceKind::VfioPci {
                ids: Some((0x15b3, 0x101e)),
            },
        }],
        verify_memory: true,
    };
    let verification = Verification {
        pages_compared: 3,
        problems: vec!["one".into()],
        ..Verification::default()
    };
    vec![
        Record::Config(Box::new(config)),
        Record::Ready,
        Record::Pages(Pages {
            pass: 3,
            entries,
            digests: page_digests,
            data,
            sparse: &[],
        }),
        Record::PassEnd { pass: 3 },
        Record::DeviceData(DeviceData {
            device: 1,
            more: true,
            data: b"state",
        }),
        Record::DeviceEnd(DeviceEnd {
            device: 1,
            bytes: 5,
            digest: 0xdead_beef,
        }),
        Record::VcpuState(Vec::new()),
        Record::Digests(Digests {
            first: PageNumber(16),
            digests,
        }),
        Record::Complete,
        Record::Accepted,
        Record::Commit,
        Record::Resumed,
        Record::Result(Box::new(verification)),
        Record::Abort(Cow::Borrowed("no room")),
        Record::InitialSent { device: 1 },
        Record::SwitchoverAck,
    ]
}

/// Every kind goes through writer and reader and comes out as it went in.
#[test]
fn every_record_kind_round_trips() {
    let data = page();
    let entries = [
        PageEntry::new(PageNumber(7), false),
        PageEntry::new(PageNumber(9), true),
    ];
    let digests = [U64::new(1), U64::new(u64::MAX)];
    let page_digests = [U64::new(page_digest(&data))];
    let records = one_of_each(&data, &entries, &page_digests, &digests);
    let kinds: Vec<Kind> = records.iter().map(Record::kind).collect();
    assert_eq!(kinds, Kind::ALL);
    let mut w = RecordWriter::new(Vec::new());
    for record in &records {
        w.send(record).unwrap();
    }
    let bytes = w.get_ref().clone();
    let mut r = RecordReader::new(&bytes[..], "t");
    let mut buf = Vec::new();
    for record in &records {
        let kind = r.read_into(&mut buf).unwrap();
        assert_eq!(kind, record.kind());
        let decoded = Record::decode(kind, &buf).unwrap();
        assert!(r.torn_pages().is_empty(), "{kind:?}: {:?}", r.torn_pages());
        // What was decoded encodes to the bytes that came, and says what went in.
        assert_eq!(payload(&decoded), buf, "{kind:?}");
        assert_eq!(format!("{decoded:?}"), format!("{record:?}"));
    }
    assert_eq!(r.bytes(), bytes.len() as u64);
}

/// A record's payload, as one buffer.
fn payload(record: &Record<'_>) -> Vec<u8> {
    let p = record.encode().unwrap();
    [&p.head[..], p.body, p.digests, p.pages, p.tail].concat()
}

/// The bytes of the fixed payloads are the documented ones.
#[test]
fn fixed_payloads_have_their_documented_bytes() {
    let bytes = |record: Record<'_>| payload(&record);
    assert_eq!(bytes(Record::PassEnd { pass: 0x0102_0304 }), [4, 3, 2, 1]);
    assert_eq!(bytes(Record::InitialSent { device: 0x0102 }), [2, 1, 0, 0]);
    assert!(bytes(Record::SwitchoverAck).is_empty());
    let end = DeviceEnd {
        device: 2,
        bytes: 3,
        digest: 4,
    };
    let mut expected = 2u32.to_le_bytes().to_vec();
    expected.extend_from_slice(&3u64.to_le_bytes());
    expected.extend_from_slice(&4u64.to_le_bytes());
    assert_eq!(bytes(Record::DeviceEnd(end)), expected);
    let data = DeviceData {
        device: 2,
        more: true,
        data: b"x",
    };
    assert_eq!(
        bytes(Record::DeviceData(data)),
        [2, 0, 0, 0, 1, 0, 0, 0, b'x']
    );
    let entries = [
        PageEntry::new(PageNumber(9), true),
        PageEntry::sparse(PageNumber(10)),
    ];
    // One sparse page: 2 words, word 0 = 5 and word 511 = 6.
    let sparse = [
        &2u16.to_le_bytes()[..],
        &0u16.to_le_bytes(),
        &5u64.to_le_bytes(),
        &511u16.to_le_bytes(),
        &6u64.to_le_bytes(),
    ]
    .concat();
    let pages = Pages {
        pass: 1,
        entries: &entries,
        digests: &[],
        data: &[],
        sparse: &sparse,
    };
    let mut expected = [1u32.to_le_bytes(), 2u32.to_le_bytes()].concat();
    expected.extend_from_slice(&(9 | ZERO_PAGE).to_le_bytes());
    expected.extend_from_slice(&(10 | SPARSE_PAGE).to_le_bytes());
    expected.extend_from_slice(&sparse);
    assert_eq!(bytes(Record::Pages(pages)), expected);
    let Record::Pages(decoded) = Record::decode(Kind::Pages, &expected).unwrap() else {
        panic!("a Pages record decoded as another");
    };
    assert_eq!(decoded, pages);
    let words = sparse_words(decoded.sparse, 1).unwrap();
    assert_eq!(
        words[0]
            .iter()
            .map(|w| (w.index.get(), w.value.get()))
            .collect::<Vec<_>>(),
        [(0, 5), (511, 6)]
    );
}

/// Short, long and reserved-bit payloads are refused with what was expected.
#[test]
fn malformed_payloads_are_refused_saying_what_was_expected() {
    let data = page();
    let cases: [(Kind, Vec<u8>, &str); 16] = [
        (
            Kind::InitialSent,
            vec![0; 5],
            "an InitialSent record of 5 bytes: expected exactly 4 bytes (device u32)",
        ),
        (
            Kind::SwitchoverAck,
            vec![0],
            "a SwitchoverAck record of 1 bytes: expected an empty payload",
        ),
        (
            Kind::Ready,
            vec![0],
            "a Ready record of 1 bytes: expected an empty payload",
        ),
        (
            Kind::Commit,
            vec![0; 3],
            "a Commit record of 3 bytes: expected an empty payload",
        ),
        (
            Kind::PassEnd,
            vec![0; 3],
            "a PassEnd record of 3 bytes: expected exactly 4 bytes (pass u32)",
        ),
        (
            Kind::PassEnd,
            vec![0; 5],
            "a PassEnd record of 5 bytes: expected exactly 4 bytes (pass u32)",
        ),
        (
            Kind::DeviceEnd,
            vec![0; 19],
            "a DeviceEnd record of 19 bytes: expected exactly 20 bytes (device u32, bytes u64, digest u64)",
        ),
        (
            Kind::DeviceEnd,
            vec![0; 21],
            "a DeviceEnd record of 21 bytes: expected exactly 20 bytes (device u32, bytes u64, digest u64)",
        ),
        (
            Kind::DeviceData,
            vec![0; 7],
            "a DeviceData record of 7 bytes: expected at least 8 bytes (device u32, flags u32)",
        ),
        (
            Kind::DeviceData,
            [0, 0, 0, 0, 2, 0, 0, 0].to_vec(),
            "a DeviceData record with flags 0x2: expected 0x1 (more parts) or 0",
        ),
        (
            Kind::Pages,
            vec![0; 7],
            "a Pages record of 7 bytes: expected at least 8 bytes (pass u32, count u32)",
        ),
        (
            Kind::Pages,
            [0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].to_vec(),
            "a Pages record of 16 bytes: expected 8 bytes of head and 8 bytes for each of its 2 entries",
        ),
        (
            Kind::Pages,
            [
                [0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0].as_slice(),
                &data[1..],
            ]
            .concat(),
            "a Pages record lists 1 whole pages and carries 4095 bytes after its entries: expected 8 bytes of digest and 4096 bytes of data for each, then its sparse section",
        ),
        (
            Kind::Pages,
            [
                [0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0x80].as_slice(),
                &data,
            ]
            .concat(),
            "a Pages record's sparse section has 4096 bytes after its 0 sparse pages",
        ),
        (
            Kind::Digests,
            [0u8; 11].to_vec(),
            "a Digests record of 11 bytes: expected at least 12 bytes (first u64, count u32)",
        ),
        (
            Kind::Digests,
            [[0u8; 8].as_slice(), &[1, 0, 0, 0], &[0; 9]].concat(),
            "a Digests record of 21 bytes: expected 12 bytes of head and 8 bytes for each of its 1 digests",
        ),
    ];
    for (kind, payload, expected) in cases {
        let err = Record::decode(kind, &payload).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("migration stream: {expected}"),
            "{kind:?}"
        );
    }
    for (kind, what) in [
        (
            Kind::Config,
            "the Config record is not a vmig configuration",
        ),
        (
            Kind::VcpuState,
            "the VcpuState record is not valid vCPU state",
        ),
        (
            Kind::Result,
            "the destination's Result record is not valid JSON",
        ),
    ] {
        let err = Record::decode(kind, b"{").unwrap_err();
        assert!(matches!(err, MigrationError::Json { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("migration stream: {what}: ")),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}

/// `read_within` gives `None` while nothing comes and loses nothing by it; a record that
/// arrives in pieces is read whole.
#[test]
fn a_record_is_awaited_without_losing_any_of_it() {
    use std::io::Write;
    use std::time::Duration;

    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let conn = crate::transport::Conn::Unix(ours);
    let own_timeout = Some(Duration::from_secs(7));
    conn.set_read_timeout(own_timeout).unwrap();
    let mut reader = RecordReader::new(conn, "t");
    let mut buf = Vec::new();
    assert_eq!(
        reader
            .read_within(Duration::from_millis(5), &mut buf)
            .unwrap(),
        None
    );
    // The connection's own timeout is back.
    assert_eq!(reader.get_ref().read_timeout().unwrap(), own_timeout);
    let mut w = RecordWriter::new(Vec::new());
    w.send(&Record::InitialSent { device: 3 }).unwrap();
    w.send(&Record::SwitchoverAck).unwrap();
    let bytes = w.get_ref().clone();
    let sender = std::thread::spawn(move || {
        let mut theirs = theirs;
        // The first record in two pieces, the second whole.
        theirs.write_all(&bytes[..3]).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        theirs.write_all(&bytes[3..]).unwrap();
        theirs
    });
    let kind = reader
        .read_within(Duration::from_secs(5), &mut buf)
        .unwrap();
    assert_eq!(kind, Some(Kind::InitialSent));
    assert!(matches!(
        Record::decode(Kind::InitialSent, &buf).unwrap(),
        Record::InitialSent { device: 3 }
    ));
    let kind = reader
        .read_within(Duration::from_secs(5), &mut buf)
        .unwrap();
    assert_eq!(kind, Some(Kind::SwitchoverAck));
    drop(sender.join().unwrap());
    let closed = reader
        .read_within(Duration::from_secs(5), &mut buf)
        .unwrap_err()
        .to_string();
    assert!(closed.contains("the peer closed"), "{closed}");
}

/// A sparse section is refused unless it gives each sparse page 1 to 64 non-zero words at
/// increasing indices below 512, and nothing more.
#[test]
fn malformed_sparse_sections_are_refused_saying_what_was_expected() {
    let word = |index: u16, value: u64| [&index.to_le_bytes()[..], &value.to_le_bytes()].concat();
    let page = |words: &[Vec<u8>]| {
        let count = u16::try_from(words.len()).unwrap();
        [count.to_le_bytes().to_vec(), words.concat()].concat()
    };
    let many: Vec<Vec<u8>> = (0..65).map(|i| word(i, 1)).collect();
    let cases: [(Vec<u8>, usize, &str); 8] = [
        (
            page(&[word(1, 0)]),
            1,
            "gives sparse page 0 a word of value 0",
        ),
        (Vec::new(), 1, "ends before sparse page 0 of 1"),
        (
            page(&[]),
            1,
            "gives sparse page 0 0 words: expected 1 to 64",
        ),
        (
            page(&many),
            1,
            "gives sparse page 0 65 words: expected 1 to 64",
        ),
        (
            page(&[word(3, 1), word(3, 2)]),
            1,
            "gives sparse page 0 word indices that are not increasing and below 512",
        ),
        (
            page(&[word(512, 1)]),
            1,
            "gives sparse page 0 word indices that are not increasing and below 512",
        ),
        (
            page(&[word(1, 1), word(2, 1)])[..15].to_vec(),
            1,
            "ends inside the 2 words of sparse page 0",
        ),
        (
            [page(&[word(1, 1)]), vec![0]].concat(),
            1,
            "has 1 bytes after its 1 sparse pages",
        ),
    ];
    for (section, pages, expected) in cases {
        let err = sparse_words(&section, pages).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("migration stream: a Pages record's sparse section {expected}")
        );
    }
    assert_eq!(sparse_words(&page(&many[..64]), 1).unwrap()[0].len(), 64);
}
