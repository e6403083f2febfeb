//! The hello: the first 32 bytes of every connection, before any record.

use std::io::Read;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::receiver::{State, refusal};
use super::{HELLO_SIZE, Kind, MAGIC, VERSION};
use crate::error::{MigrationError, Result, io_error};

/// The hello's bytes as they are on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct HelloHead {
    magic: [u8; 8],
    version: U32,
    channel: U16,
    channels: U16,
    session: U64,
    reserved: U64,
}

/// The first bytes of every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// This connection's index (0 is the main connection).
    pub channel: u16,
    /// Connections in this migration.
    pub channels: u16,
    /// Random number shared by the connections of one migration.
    pub session: u64,
}

impl Hello {
    /// The hello's bytes.
    pub fn encode(&self) -> [u8; HELLO_SIZE] {
        let head = HelloHead {
            magic: MAGIC,
            version: VERSION.into(),
            channel: self.channel.into(),
            channels: self.channels.into(),
            session: self.session.into(),
            reserved: 0.into(),
        };
        let mut b = [0u8; HELLO_SIZE];
        b.copy_from_slice(head.as_bytes());
        b
    }

    /// Parses and checks a hello: the magic, [`VERSION`] exactly (see the versioning rule in
    /// the module doc), a channel below a non-zero count, and zero reserved bytes.
    pub fn decode(b: &[u8; HELLO_SIZE]) -> Result<Self> {
        let head = HelloHead::read_from_bytes(b).map_err(|_| {
            MigrationError::Stream(format!("a hello is {HELLO_SIZE} bytes; got {}", b.len()))
        })?;
        if head.magic != MAGIC {
            let mut message = format!(
                "the peer did not start with the vmig magic \"VMIGSTRM\" (got {:02x?}): not a vmig migration stream",
                &head.magic
            );
            // A record where the hello belongs: say which, as any record out of place is told.
            let raw_kind = u16::from_le_bytes([b[0], b[1]]);
            if let (Some(kind), [0, 0]) = (Kind::from_u16(raw_kind), [b[2], b[3]]) {
                message = format!("{message} ({})", refusal(State::AwaitingHello, kind.name()));
            }
            return Err(MigrationError::Stream(message));
        }
        let version = head.version.get();
        if version != VERSION {
            return Err(MigrationError::Stream(format!(
                "stream version {version}: this vmig speaks version {VERSION} only"
            )));
        }
        let hello = Self {
            channel: head.channel.get(),
            channels: head.channels.get(),
            session: head.session.get(),
        };
        if hello.channels == 0 || hello.channel >= hello.channels || head.reserved.get() != 0 {
            return Err(MigrationError::Stream(format!(
                "hello of channel {} of {} (reserved {:02x?}): expected a channel below a non-zero count and zero reserved bytes",
                hello.channel,
                hello.channels,
                &b[24..32]
            )));
        }
        Ok(hello)
    }

    /// Reads a hello from `r`.
    pub fn read(r: &mut impl Read) -> Result<Self> {
        let mut b = [0u8; HELLO_SIZE];
        r.read_exact(&mut b)
            .map_err(io_error("reading the connection's hello"))?;
        Self::decode(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hello_head_is_32_bytes_in_wire_order() {
        assert_eq!(size_of::<HelloHead>(), HELLO_SIZE);
        let b = Hello {
            channel: 0x0102,
            channels: 0x0304,
            session: 0x1122_3344_5566_7788,
        }
        .encode();
        assert_eq!(&b[0..8], b"VMIGSTRM");
        assert_eq!(b[8..12], VERSION.to_le_bytes());
        assert_eq!(b[12..16], [0x02, 0x01, 0x04, 0x03]);
        assert_eq!(b[16..24], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[24..32], [0; 8]);
    }

    #[test]
    fn hellos_check_magic_version_and_channel() {
        let hello = Hello {
            channel: 1,
            channels: 2,
            session: 7,
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let mut b = hello.encode();
        b[0] = b'X';
        assert!(Hello::decode(&b).unwrap_err().to_string().contains("magic"));
        let mut b = hello.encode();
        b[8] = 9;
        assert!(
            Hello::decode(&b)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        let bad = Hello {
            channel: 2,
            channels: 2,
            session: 7,
        };
        assert!(Hello::decode(&bad.encode()).is_err());
    }

    /// Versions other than this build's, older or newer, are refused; and so is a hello with
    /// a reserved byte set or no channels, each saying what it expected.
    #[test]
    fn other_versions_reserved_bytes_and_zero_channels_are_refused() {
        let hello = Hello {
            channel: 0,
            channels: 1,
            session: 7,
        };
        for version in [0, 1, VERSION - 1, VERSION + 1, u32::MAX] {
            let mut b = hello.encode();
            b[8..12].copy_from_slice(&version.to_le_bytes());
            assert_eq!(
                Hello::decode(&b).unwrap_err().to_string(),
                format!(
                    "migration stream: stream version {version}: this vmig speaks version {VERSION} only"
                )
            );
        }
        let mut b = hello.encode();
        b[31] = 1;
        let err = Hello::decode(&b).unwrap_err().to_string();
        assert!(err.contains("zero reserved bytes"), "{err}");
        let none = Hello {
            channel: 0,
            channels: 0,
            session: 7,
        };
        let err = Hello::decode(&none.encode()).unwrap_err().to_string();
        assert!(err.contains("non-zero count"), "{err}");
    }
}
