//! Framing on a socket pair: whole messages with descriptors both ways, large messages split
//! by the kernel, and every kind of broken framing refused with a reason, never a panic.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use vmig_vfio_user::wire::{Command, FLAG_TYPE_REPLY, Header};
use vmig_vfio_user::{Channel, TransportError};
use zerocopy::IntoBytes;

fn pair() -> (Channel, Channel) {
    let (a, b) = UnixStream::pair().unwrap();
    (Channel::new(a), Channel::new(b))
}

fn header(command: Command, id: u16) -> Header {
    Header {
        msg_id: id,
        command: command as u16,
        ..Header::default()
    }
}

#[test]
fn a_message_arrives_whole_with_its_descriptors() {
    let (a, b) = pair();
    let file = tempfile();
    let fds = [file.as_fd(), file.as_fd()];
    a.send(header(Command::DmaMap, 7), &[b"0123", b"456789"], &fds)
        .unwrap();
    let m = b.recv().unwrap();
    assert_eq!(m.header.msg_id, 7);
    assert_eq!(m.header.command, Command::DmaMap as u16);
    assert_eq!(m.header.msg_size, 16 + 10);
    assert_eq!(m.payload, b"0123456789");
    assert_eq!(m.fds.len(), 2);
    assert_ne!(
        m.fds[0].as_raw_fd(),
        file.as_raw_fd(),
        "received descriptors are new ones"
    );
}

#[test]
fn a_large_message_survives_partial_sends() {
    let (a, b) = pair();
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let sender = std::thread::spawn(move || {
        let mut h = header(Command::MigDataRead, 1);
        h.flags = FLAG_TYPE_REPLY;
        a.send(h, &[&big[..3], &big[3..]], &[]).unwrap();
        big
    });
    let m = b.recv().unwrap();
    let big = sender.join().unwrap();
    assert!(m.header.is_reply());
    assert_eq!(m.payload, big);
}

#[test]
fn a_clean_close_between_messages_is_closed() {
    let (a, b) = pair();
    drop(a);
    assert!(matches!(b.recv(), Err(TransportError::Closed)));
}

fn raw_pair() -> (UnixStream, Channel) {
    let (a, b) = UnixStream::pair().unwrap();
    (a, Channel::new(b))
}

fn malformed(result: Result<vmig_vfio_user::Message, TransportError>, expected: &str) {
    match result {
        Err(TransportError::Malformed(why)) => assert!(why.contains(expected), "{why}"),
        other => panic!("expected a malformed-message error with `{expected}`, got {other:?}"),
    }
}

#[test]
fn a_header_cut_short_is_refused() {
    let (mut raw, b) = raw_pair();
    raw.write_all(&[1, 0, 1, 0, 20]).unwrap();
    drop(raw);
    malformed(b.recv(), "the stream ended 5 bytes into a 16-byte read");
}

#[test]
fn a_msg_size_below_the_header_is_refused() {
    for size in [0u32, 1, 15] {
        let (mut raw, b) = raw_pair();
        let h = Header {
            msg_size: size,
            ..header(Command::Version, 3)
        };
        raw.write_all(h.as_bytes()).unwrap();
        malformed(b.recv(), "smaller than the 16-byte header");
    }
}

#[test]
fn a_msg_size_above_the_limit_is_refused_before_allocating() {
    let (mut raw, mut b) = raw_pair();
    b.set_limits(1 << 20, 4);
    let h = Header {
        msg_size: u32::MAX,
        ..header(Command::RegionWrite, 3)
    };
    raw.write_all(h.as_bytes()).unwrap();
    malformed(b.recv(), "exceeds the 1048576 bytes this side accepts");
}

#[test]
fn a_payload_that_lies_about_its_length_is_refused() {
    let (mut raw, b) = raw_pair();
    let h = Header {
        msg_size: 16 + 100,
        ..header(Command::RegionWrite, 3)
    };
    raw.write_all(h.as_bytes()).unwrap();
    raw.write_all(&[0u8; 40]).unwrap();
    drop(raw);
    malformed(b.recv(), "the stream ended 40 bytes into a 100-byte read");
}

#[test]
fn too_many_descriptors_are_refused_and_closed() {
    let (a, mut b) = pair();
    b.set_limits(1 << 20, 2);
    let file = tempfile();
    let fds = [file.as_fd(), file.as_fd(), file.as_fd(), file.as_fd()];
    a.send(header(Command::DmaMap, 1), &[&[0u8; 32]], &fds)
        .unwrap();
    malformed(b.recv(), "more file descriptors than the 2 accepted");
}

#[test]
fn messages_in_a_row_keep_their_boundaries() {
    let (a, b) = pair();
    for id in 0..100u16 {
        a.send(
            header(Command::RegionRead, id),
            &[&vec![u8::try_from(id).unwrap(); id as usize]],
            &[],
        )
        .unwrap();
    }
    for id in 0..100u16 {
        let m = b.recv().unwrap();
        assert_eq!(m.header.msg_id, id);
        assert_eq!(m.payload, vec![u8::try_from(id).unwrap(); id as usize]);
    }
}

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("vmig-vfio-user-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    file
}
