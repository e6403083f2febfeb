//! `VFIO_USER_VERSION`: the version pair and the JSON capabilities each side offers, with the
//! spec's defaults for absent fields and its negotiation rules (the reply keeps the major,
//! never raises the minor, and offers a subset of what was proposed).

use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::wire::{Version, read_struct};

/// The protocol major version.
pub const MAJOR: u16 = 0;
/// The highest minor version vmig speaks.
pub const MINOR: u16 = 2;
/// `max_msg_fds` when absent.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// `max_data_xfer_size` when absent.
pub const DEFAULT_MAX_DATA_XFER_SIZE: u64 = 1 << 20;
/// `max_dma_maps` when absent.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// `pgsizes` when absent.
pub const DEFAULT_PGSIZES: u64 = vmig_primitives::PAGE_SIZE;
/// Longest JSON accepted.
pub const MAX_JSON: usize = 64 << 10;

/// The `twin_socket` capability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinSocket {
    /// Whether the sender supports (client) or enabled (server) twin-socket mode.
    #[serde(default)]
    pub supported: bool,
    /// Server: the index of the client end among the reply's descriptors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// The v1 `migration` capability: dirty bitmaps of `DIRTY_PAGES` / unmap-with-bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCap {
    /// Page size of dirty bitmaps.
    pub pgsize: u64,
    /// Largest bitmap in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The capabilities object; `None` is "absent" (the spec's default applies).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most descriptors the sender can receive with one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Largest data transfer (region access, DMA access, migration data) the sender receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u64>,
    /// DMA page sizes (OR of powers of two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Most DMA mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// Twin-socket mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocket>,
    /// `VFIO_USER_REGION_WRITE_MULTI` support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
    /// v1 dirty-bitmap parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCap>,
}

impl Capabilities {
    /// `max_msg_fds` with its default.
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }

    /// `max_data_xfer_size` with its default.
    pub fn max_data_xfer_size(&self) -> u64 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }

    /// `pgsizes` with its default.
    pub fn pgsizes(&self) -> u64 {
        self.pgsizes.unwrap_or(DEFAULT_PGSIZES)
    }

    /// `max_dma_maps` with its default.
    pub fn max_dma_maps(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }

    /// Whether twin-socket mode is on.
    pub fn twin_socket(&self) -> bool {
        self.twin_socket.is_some_and(|t| t.supported)
    }

    /// Whether `REGION_WRITE_MULTI` may be used.
    pub fn write_multiple(&self) -> bool {
        self.write_multiple.unwrap_or(false)
    }
}

#[derive(Serialize, Deserialize)]
struct VersionJson {
    #[serde(default)]
    capabilities: Capabilities,
}

/// A `VFIO_USER_VERSION` payload that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("VFIO_USER_VERSION: {0}")]
pub struct VersionError(pub String);

/// Encodes a `VFIO_USER_VERSION` payload: the pair, then the JSON with its NUL.
pub fn encode(major: u16, minor: u16, caps: &Capabilities) -> Vec<u8> {
    let mut out = Version { major, minor }.as_bytes().to_vec();
    let json = serde_json::to_vec(&VersionJson {
        capabilities: caps.clone(),
    })
    .unwrap_or_else(|_| b"{}".to_vec());
    out.extend_from_slice(&json);
    out.push(0);
    out
}

/// Decodes a `VFIO_USER_VERSION` payload. The JSON is optional; when present it must be UTF-8,
/// NUL-terminated, an object, and each known capability must have the spec's type (unknown
/// capabilities are ignored).
pub fn decode(payload: &[u8]) -> Result<(Version, Capabilities), VersionError> {
    let version = read_struct::<Version>(payload).ok_or_else(|| {
        VersionError(format!(
            "a payload of {} bytes: expected at least the 4-byte major/minor pair",
            payload.len()
        ))
    })?;
    let rest = &payload[size_of::<Version>()..];
    if rest.is_empty() {
        return Ok((version, Capabilities::default()));
    }
    if rest.len() > MAX_JSON {
        return Err(VersionError(format!(
            "{} bytes of JSON: at most {MAX_JSON} accepted",
            rest.len()
        )));
    }
    let Some((&0, json)) = rest.split_last() else {
        return Err(VersionError("the JSON is not NUL-terminated".into()));
    };
    let json = std::str::from_utf8(json)
        .map_err(|e| VersionError(format!("the JSON is not UTF-8: {e}")))?;
    let json = json.trim_end_matches('\0');
    if json.trim().is_empty() {
        return Ok((version, Capabilities::default()));
    }
    let parsed: VersionJson =
        serde_json::from_str(json).map_err(|e| VersionError(format!("capabilities JSON: {e}")))?;
    Ok((version, parsed.capabilities))
}

/// The server's answer to a client's proposal: the same major, the lower minor, and `offered`
/// limited to what the client proposed where the spec says a reply must be a subset.
pub fn answer(
    proposed: Version,
    client: &Capabilities,
    offered: &Capabilities,
) -> Result<(Version, Capabilities), VersionError> {
    if proposed.major != MAJOR {
        return Err(VersionError(format!(
            "major version {}: this server speaks {MAJOR}",
            proposed.major
        )));
    }
    let mut caps = offered.clone();
    // Only enable twin-socket mode and write-multiple when the client asked for them.
    if !client.twin_socket() {
        caps.twin_socket = None;
    }
    if !client.write_multiple() {
        caps.write_multiple = None;
    }
    if client.migration.is_none() {
        caps.migration = None;
    }
    Ok((
        Version {
            major: MAJOR,
            minor: proposed.minor.min(MINOR),
        },
        caps,
    ))
}

/// Checks a server's reply against the client's proposal.
pub fn check_reply(proposed: Version, reply: Version) -> Result<(), VersionError> {
    if reply.major != proposed.major {
        return Err(VersionError(format!(
            "the server answered major {} to a proposal of {}",
            reply.major, proposed.major
        )));
    }
    if reply.minor > proposed.minor {
        return Err(VersionError(format!(
            "the server answered minor {} to a proposal of {}",
            reply.minor, proposed.minor
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(major: u16, minor: u16, json: &str) -> Vec<u8> {
        let mut p = Version { major, minor }.as_bytes().to_vec();
        p.extend_from_slice(json.as_bytes());
        p.push(0);
        p
    }

    #[test]
    fn decodes_what_libvfio_user_and_qemu_send() {
        // Observed libvfio-user server reply (vfio-user-digest.md §1.3).
        let (v, caps) = decode(&payload(
            0,
            2,
            r#"{"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": {"pgsize": 4096}}}"#,
        ))
        .unwrap();
        assert_eq!((v.major, v.minor), (0, 2));
        assert_eq!(caps.max_msg_fds(), 8);
        assert_eq!(caps.max_data_xfer_size(), 1 << 20);
        assert_eq!(caps.migration.unwrap().pgsize, 4096);
        assert!(!caps.twin_socket());
        // QEMU 10.1 client request.
        let (_, caps) = decode(&payload(
            0,
            0,
            r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#,
        ))
        .unwrap();
        assert_eq!(caps.max_msg_fds(), 16);
        assert_eq!(caps.max_dma_maps(), 65535);
        assert!(caps.write_multiple());
        assert_eq!(caps.migration.unwrap().max_bitmap_size, Some(268_435_456));
    }

    #[test]
    fn absent_json_and_absent_fields_take_the_spec_defaults() {
        let (_, caps) = decode(&[0, 0, 1, 0]).unwrap();
        assert_eq!(caps.max_msg_fds(), 1);
        assert_eq!(caps.max_data_xfer_size(), 1 << 20);
        assert_eq!(caps.pgsizes(), 4096);
        assert_eq!(caps.max_dma_maps(), 65535);
        let (_, caps) = decode(&payload(
            0,
            1,
            r#"{"capabilities": {"future_thing": [1, 2]}}"#,
        ))
        .unwrap();
        assert_eq!(
            caps,
            Capabilities::default(),
            "unknown capabilities are ignored"
        );
        let encoded = encode(
            0,
            2,
            &Capabilities {
                max_msg_fds: Some(16),
                ..Capabilities::default()
            },
        );
        assert_eq!(decode(&encoded).unwrap().1.max_msg_fds(), 16);
    }

    #[test]
    fn bad_payloads_say_what_was_expected() {
        for (bytes, expected) in [
            (
                vec![0u8, 0],
                "expected at least the 4-byte major/minor pair",
            ),
            (b"\0\0\x02\0{}".to_vec(), "not NUL-terminated"),
            (b"\0\0\x02\0\xff\xfe\0".to_vec(), "not UTF-8"),
            (payload(0, 2, "[1,2]"), "capabilities JSON"),
            (
                payload(0, 2, r#"{"capabilities": {"max_msg_fds": "many"}}"#),
                "capabilities JSON",
            ),
            (payload(0, 2, &" ".repeat(MAX_JSON)), "at most"),
        ] {
            let err = decode(&bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn the_answer_keeps_the_major_lowers_the_minor_and_offers_a_subset() {
        let offered = Capabilities {
            max_msg_fds: Some(8),
            twin_socket: Some(TwinSocket {
                supported: true,
                fd_index: Some(0),
            }),
            write_multiple: Some(true),
            migration: Some(MigrationCap {
                pgsize: 4096,
                max_bitmap_size: None,
            }),
            ..Capabilities::default()
        };
        let (v, caps) = answer(
            Version { major: 0, minor: 7 },
            &Capabilities::default(),
            &offered,
        )
        .unwrap();
        assert_eq!((v.major, v.minor), (0, MINOR));
        assert_eq!(caps.twin_socket, None, "not proposed, not enabled");
        assert_eq!(caps.write_multiple, None);
        assert_eq!(caps.migration, None);
        assert_eq!(caps.max_msg_fds, Some(8));
        let (v, _) = answer(
            Version { major: 0, minor: 1 },
            &Capabilities::default(),
            &offered,
        )
        .unwrap();
        assert_eq!(v.minor, 1);
        let err = answer(
            Version { major: 1, minor: 0 },
            &Capabilities::default(),
            &offered,
        )
        .unwrap_err();
        assert!(err.to_string().contains("this server speaks 0"), "{err}");
        assert!(
            check_reply(
                Version { major: 0, minor: 1 },
                Version { major: 0, minor: 2 }
            )
            .is_err()
        );
        assert!(
            check_reply(
                Version { major: 0, minor: 2 },
                Version { major: 1, minor: 0 }
            )
            .is_err()
        );
        assert!(
            check_reply(
                Version { major: 0, minor: 2 },
                Version { major: 0, minor: 1 }
            )
            .is_ok()
        );
    }
}
