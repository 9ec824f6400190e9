//! The transport of the link between a host and its exchange, both ends: its QUIC settings,
//! and one framed bidirectional stream ([`PeerStream`]) whose frames are read on a task of
//! their own.

use iim_proto::{CodecError, FrameDecoder, encode_frame};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Largest frame between a host and the exchange: a message of the largest frame a host may
/// configure (1 MiB) and the rows of the most users one send may name (100,000 names of at
/// most 64 bytes).
pub const PEER_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// Largest first frame (`Join`) the exchange reads from a connection it does not know yet.
pub const JOIN_MAX_FRAME: u32 = 16 * 1024;

/// Why a link's stream failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer sent bytes that are not a frame.
    #[error("bad frame from {peer}: {source}")]
    Frame {
        /// Who sent it.
        peer: &'static str,
        /// What was wrong.
        source: CodecError,
    },
    /// A frame to send does not fit the link (a host bug: envelopes are checked when they are
    /// made).
    #[error("a frame does not fit the link: {0}")]
    Encode(CodecError),
    /// Reading failed: the connection is gone.
    #[error("link lost: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed: the connection is gone.
    #[error("link lost: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer finished its stream.
    #[error("{0} closed the link")]
    Closed(&'static str),
}

/// QUIC transport settings of the link between a host and the exchange, both sides.
pub fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // A host or exchange that is gone (killed, cut off) is noticed within seconds: a host
    // then counts as down and what is for it is held.
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Duration::from_secs(5).try_into().ok());
    transport
}

/// Reads and decodes the frames `peer` sends on `recv`, on a task of its own; the first error
/// ends them. With a `gate`, the first frame may be at most [`JOIN_MAX_FRAME`] bytes and
/// nothing more is read until the gate opens (the peer is known): a connection that has not
/// joined makes the reader hold one small frame, no more. The frames are queued without
/// bound otherwise, so that neither side's loop can block the other's writes (relays are
/// bounded by the window).
fn read_frames<F: serde::de::DeserializeOwned + Send + 'static>(
    mut recv: quinn::RecvStream,
    peer: &'static str,
    mut gate: Option<oneshot::Receiver<()>>,
) -> mpsc::UnboundedReceiver<Result<F, PeerError>> {
    let (tx, frames) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let first_max = if gate.is_some() {
            JOIN_MAX_FRAME
        } else {
            PEER_MAX_FRAME
        };
        let mut decoder = FrameDecoder::new(first_max);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            loop {
                match decoder.decode::<F>() {
                    Ok(Some(frame)) => {
                        if tx.send(Ok(frame)).is_err() {
                            return;
                        }
                        if let Some(gate) = gate.take() {
                            if gate.await.is_err() {
                                return;
                            }
                            decoder.set_max(PEER_MAX_FRAME);
                        }
                    }
                    Ok(None) => break,
                    Err(source) => {
                        let _ = tx.send(Err(PeerError::Frame { peer, source }));
                        return;
                    }
                }
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.push(&buf[..n]),
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            }
        }
    });
    frames
}

/// One end of the link between a host and the exchange: the connection, its stream to write
/// frames to, and the frames the other side sent (`In`).
pub struct PeerStream<In> {
    /// The connection.
    pub conn: quinn::Connection,
    /// Its stream, to write to.
    pub send: quinn::SendStream,
    frames: mpsc::UnboundedReceiver<Result<In, PeerError>>,
    peer: &'static str,
}

impl<In: serde::de::DeserializeOwned + Send + 'static> PeerStream<In> {
    /// The stream of `conn` to and from `peer` (for messages); see [`read_frames`] for `gate`.
    pub fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: &'static str,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Self {
        Self {
            conn,
            send,
            frames: read_frames(recv, peer, gate),
            peer,
        }
    }

    /// Writes one frame.
    pub async fn write(&mut self, frame: &impl serde::Serialize) -> Result<(), PeerError> {
        let bytes = encode_frame(frame, PEER_MAX_FRAME).map_err(PeerError::Encode)?;
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    /// The next frame the other side sent.
    pub async fn next(&mut self) -> Result<In, PeerError> {
        match self.frames.recv().await {
            Some(frame) => frame,
            None => Err(PeerError::Closed(self.peer)),
        }
    }
}
