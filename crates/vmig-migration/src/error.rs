//! The engine's error type.

use std::io;

/// Why a migration (or a step of one) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The peer sent something that is not a valid vmig migration stream, or not what the
    /// protocol expects at this point.
    #[error("migration stream: {0}")]
    Stream(String),
    /// A record's JSON payload could not be encoded or decoded.
    #[error("migration stream: {what}: {source}")]
    Json {
        /// Which record, and what was wrong with it.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Guest memory refused a page the stream carried.
    #[error("migration stream: {what}: {source}")]
    Memory {
        /// Which page, and what was done with it.
        what: String,
        /// The VM's error.
        #[source]
        source: vmig_kvm::KvmError,
    },
    /// A dirty bitmap could not be made.
    #[error(transparent)]
    Bitmap(#[from] vmig_dirty::DirtyError),
    /// The destination refused the migration (the reason is the destination's).
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The VM failed (KVM, vCPU state, guest memory).
    #[error("VM: {0}")]
    Vm(#[from] vmig_kvm::KvmError),
    /// A device failed (vfio-user or kernel VFIO), or cannot do what was asked.
    #[error("device {device}: {}", without_name(.device, .source))]
    Device {
        /// The device's name.
        device: String,
        /// What went wrong.
        #[source]
        source: DeviceFailure,
    },
    /// What the source and the destination hold differs after the final copy.
    #[error("verification failed: {0}")]
    Verification(String),
    /// The migration was cancelled (`migrate-cancel`, or its timeout with the cancel strategy).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A parameter or a request is out of range or out of order.
    #[error("{0}")]
    Invalid(String),
}

/// What went wrong with a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFailure {
    /// A call to the device failed.
    #[error(transparent)]
    Op(#[from] crate::device::DeviceOpError),
    /// Connecting to a vfio-user device, or its setup, failed.
    #[error(transparent)]
    Attach(#[from] crate::device::AttachError),
    /// Its interrupts could not be wired into the guest.
    #[error("wiring its interrupts: {0}")]
    Interrupts(#[source] InterruptError),
    /// KVM refused what the device needs (the KVM VFIO device, an irqfd).
    #[error(transparent)]
    Vm(#[from] vmig_kvm::KvmError),
    /// Its guest driver failed.
    #[error(transparent)]
    Driver(Box<dyn std::error::Error + Send + Sync>),
    /// The engine's own finding (it cannot migrate, it is given twice, its answer is out of
    /// range).
    #[error("{0}")]
    Refused(String),
}

/// Why a device's interrupts could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The device refused or failed.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceOpError),
    /// KVM could not make the irqfd.
    #[error(transparent)]
    Vm(#[from] vmig_kvm::KvmError),
}

/// `failure` as words, less the device's name where the failure already starts with it (the
/// kernel backend's errors do): the name is said once.
fn without_name(device: &str, failure: &DeviceFailure) -> String {
    let text = failure.to_string();
    match text
        .strip_prefix(device)
        .and_then(|rest| rest.strip_prefix(": "))
    {
        Some(rest) => rest.to_owned(),
        None => text,
    }
}

impl MigrationError {
    /// Device `device` cannot do what was asked, for the reason `message`.
    pub fn device(device: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Device {
            device: device.into(),
            source: DeviceFailure::Refused(message.into()),
        }
    }

    /// Device `device`'s guest driver failed with `error`.
    pub fn driver(
        device: impl Into<String>,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Device {
            device: device.into(),
            source: DeviceFailure::Driver(error.into()),
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, MigrationError>;

/// Maps an I/O error, saying what was being done.
pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// Maps an error of device `name` (a vfio-user client's or kernel VFIO's), keeping it.
pub(crate) fn device_error<E: Into<DeviceFailure>>(
    name: &str,
) -> impl FnOnce(E) -> MigrationError + '_ {
    move |e| MigrationError::Device {
        device: name.to_string(),
        source: e.into(),
    }
}

impl From<vmig_vfio_user::client::ClientError> for DeviceFailure {
    fn from(e: vmig_vfio_user::client::ClientError) -> Self {
        Self::Op(e.into())
    }
}

impl From<vmig_vfio::VfioError> for DeviceFailure {
    fn from(e: vmig_vfio::VfioError) -> Self {
        Self::Op(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_error_names_its_device_once() {
        let named = MigrationError::device("5daf-uuid", "5daf-uuid: writing device state: EFAULT");
        assert_eq!(
            named.to_string(),
            "device 5daf-uuid: writing device state: EFAULT"
        );
        let unnamed = MigrationError::device("0000:01:00.0", "cannot migrate");
        assert_eq!(unnamed.to_string(), "device 0000:01:00.0: cannot migrate");
        // Only a whole name followed by ": " is dropped.
        let prefix = MigrationError::device("dev", "device gone");
        assert_eq!(prefix.to_string(), "device dev: device gone");
    }
}
