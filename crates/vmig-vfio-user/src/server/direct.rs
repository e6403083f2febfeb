//! A session without a connection: [`Server::direct_session`] opens one as a client's
//! negotiation would (a fresh IOMMU, the device's IRQs, the device connected), and
//! [`DirectSession::answer`] hands it one message as bytes, decoded and dispatched exactly as
//! a connected client's messages are, and returns what the reply would carry. It is the entry
//! of the fuzz targets that drive the server's request handling in-process (and of tests that
//! want no socket). There is no client behind it: the device's message-based DMA fails
//! ([`ClientDmaError::NoClient`](super::ClientDmaError)), and the descriptors a reply would
//! carry are dropped.

use std::sync::Weak;

use super::dma::ClientMemory;
use super::{Device, Refusal, ServeError, Server, Session, request};

/// A session of a [`Server`] whose messages come from the caller as bytes.
pub struct DirectSession<'a, D: Device> {
    server: &'a Server<D>,
    session: Session,
}

impl<D: Device> Server<D> {
    /// Opens a session without a connection (the fuzz targets' entry); the device is connected
    /// to it until it is dropped. Open none while a client is served: the device has one
    /// client at a time.
    pub fn direct_session(&self) -> Result<DirectSession<'_, D>, ServeError> {
        let session = self.open_session(ClientMemory {
            endpoint: Weak::new(),
            max_xfer: usize::try_from(self.config.max_data_xfer_size).unwrap_or(usize::MAX),
        })?;
        Ok(DirectSession {
            server: self,
            session,
        })
    }
}

impl<D: Device> DirectSession<'_, D> {
    /// Answers `message`, a 16-byte header and then the payload (its `msg_size` is not
    /// checked, as [`request::decode_bytes`] reads it): the payload of the reply, or the
    /// refusal an error reply would carry (its errno, and what was wrong).
    pub fn answer(&mut self, message: &[u8]) -> Result<Vec<u8>, Refusal> {
        let request = request::decode_bytes(message, self.server.config.max_data_xfer_size)?;
        self.server
            .handle(&mut self.session, request)
            .map(|reply| reply.payload)
    }
}

impl<D: Device> Drop for DirectSession<'_, D> {
    /// The session ends as a client's does: the device stops using its DMA and IRQs.
    fn drop(&mut self) {
        self.server.device().disconnect();
    }
}
