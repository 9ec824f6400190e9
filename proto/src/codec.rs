//! Frames on a byte stream: a 4-byte big-endian length, then the frame encoded with postcard.
//!
//! [`FrameDecoder`] is sans-IO: the driver pushes whatever bytes arrived and pulls whole frames.
//! The length is checked against the limit before any of the body is buffered, so a peer
//! cannot make the other side allocate more than the limit.

use serde::{Serialize, de::DeserializeOwned};

/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;

/// The most room a [`FrameDecoder`] keeps once it has decoded everything it was given: an
/// idle stream does not hold the buffer of its last burst.
const KEPT_CAPACITY: usize = 4096;

/// Why bytes could not be turned into a frame, or a frame into bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The length prefix announces a frame larger than the limit.
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The frame's bytes are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame was empty: a length prefix of zero.
    #[error("empty frame")]
    Empty,
}

/// Encodes `frame` with its length prefix; refuses a frame larger than `max`.
pub fn encode_frame<T: Serialize>(frame: &T, max: u32) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; LENGTH_PREFIX];
    let mut out = postcard::to_extend(frame, std::mem::take(&mut out))
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    let len = out.len() - LENGTH_PREFIX;
    if len > max as usize {
        return Err(CodecError::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    out[..LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Encodes `ServerFrame::Deliver { seq, message }` without owning the message: a delivery
/// shared by several sessions (and kept for retransmission) is not copied to be sent.
pub fn encode_deliver(
    seq: u64,
    message: &crate::frame::Message,
    max: u32,
) -> Result<Vec<u8>, CodecError> {
    encode_frame(&DeliverRef { seq, message }, max)
}

/// `ServerFrame::Deliver` by reference: the same bytes, as the test below checks.
struct DeliverRef<'a> {
    seq: u64,
    message: &'a crate::frame::Message,
}

/// The index of `Deliver` among the variants of `ServerFrame`.
const DELIVER_VARIANT: u32 = 5;

impl Serialize for DeliverRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant;
        let mut variant =
            serializer.serialize_struct_variant("ServerFrame", DELIVER_VARIANT, "Deliver", 2)?;
        variant.serialize_field("seq", &self.seq)?;
        variant.serialize_field("message", self.message)?;
        variant.end()
    }
}

/// Reassembles frames from the bytes of a stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the bytes not yet decoded start in `buf`: a decoded frame's bytes are dropped
    /// when more are pushed, not moved out one frame at a time.
    start: usize,
    max: u32,
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max` bytes.
    pub fn new(max: u32) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Changes the limit, for frames not yet decoded (after the peer announced its own).
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The bytes held after the last returned frame: on a file stream, the first bytes of the
    /// file that came with the frame before them.
    pub fn into_rest(mut self) -> Vec<u8> {
        self.buf.drain(..self.start);
        self.buf
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    ///
    /// After an error the stream cannot be resynchronised; the caller closes it.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        let held = &self.buf[self.start..];
        if held.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX];
        prefix.copy_from_slice(&held[..LENGTH_PREFIX]);
        let len = u32::from_be_bytes(prefix);
        if len > self.max {
            return Err(CodecError::FrameTooLarge {
                len: u64::from(len),
                max: self.max,
            });
        }
        if len == 0 {
            return Err(CodecError::Empty);
        }
        let end = LENGTH_PREFIX + len as usize;
        if held.len() < end {
            return Ok(None);
        }
        let (frame, rest) = postcard::take_from_bytes::<T>(&held[LENGTH_PREFIX..end])
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CodecError::Malformed(format!(
                "{} trailing bytes after the frame",
                rest.len()
            )));
        }
        self.start += end;
        if self.start == self.buf.len() {
            // Everything decoded: start over, and give back the room of a burst now, not at
            // the next push (an idle stream may see none for hours).
            self.buf.clear();
            if self.buf.capacity() > KEPT_CAPACITY {
                self.buf = Vec::new();
            }
            self.start = 0;
        }
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::*;
    use crate::name::{DeviceId, UserId};
    use proptest::prelude::*;

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("valid name")
    }

    fn samples() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Hello {
                version: 1,
                agent: "test".into(),
            },
            ClientFrame::Register {
                req: 1,
                user: user("alice"),
                password: "pw".into(),
            },
            ClientFrame::Login {
                req: 2,
                user: user("alice"),
                password: "pw".into(),
                device: DeviceId::new("phone").expect("valid"),
                mode: SessionMode::Receive,
            },
            ClientFrame::Relation {
                req: 3,
                kind: RelationKind::Colleague,
                op: RelationOp::Add(user("bob")),
            },
            ClientFrame::Submit {
                req: 4,
                client_id: 99,
                kind: MessageKind::Custom("poll".into()),
                to: vec![user("bob").into(), user("carol").into()],
                body: b"hello".to_vec(),
            },
            ClientFrame::Ack { seq: 7 },
            ClientFrame::Authenticate {
                req: 5,
                user: user("bob"),
                device: DeviceId::new("tablet").expect("valid"),
                token: "t".into(),
                mode: SessionMode::Paged,
            },
            ClientFrame::Fetch { req: 6, max: 50 },
        ]
    }

    #[test]
    fn round_trips_every_sample() {
        let mut decoder = FrameDecoder::new(1024);
        for frame in samples() {
            decoder.push(&encode_frame(&frame, 1024).expect("encode"));
        }
        for frame in samples() {
            assert_eq!(decoder.decode::<ClientFrame>(), Ok(Some(frame)));
        }
        assert_eq!(decoder.decode::<ClientFrame>(), Ok(None));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = vec![
            ServerFrame::Welcome {
                version: 1,
                max_frame: 10,
                max_body: 5,
                server: "h1".into(),
            },
            ServerFrame::Deliver {
                seq: 3,
                message: Message {
                    id: MessageId(5),
                    kind: MessageKind::Chat,
                    from: user("alice"),
                    from_device: DeviceId::new("d1").expect("valid"),
                    to: vec![user("bob").into()],
                    body: "hé".as_bytes().to_vec(),
                    sent_at: 1_700_000_000_000,
                },
            },
            ServerFrame::error(Some(3), ErrorCode::UNKNOWN_USER, "no user zed"),
            ServerFrame::Backlog {
                count: 2,
                bytes: 11,
                ids: vec![MessageId(8), MessageId(9)],
            },
            ServerFrame::Page {
                req: 6,
                count: 2,
                remaining: 0,
            },
        ];
        for frame in frames {
            let bytes = encode_frame(&frame, 1024).expect("encode");
            let mut decoder = FrameDecoder::new(1024);
            decoder.push(&bytes);
            assert_eq!(decoder.decode::<ServerFrame>(), Ok(Some(frame)));
        }
    }

    #[test]
    fn a_delivery_by_reference_is_the_same_bytes_as_the_frame() {
        let message = Message {
            id: MessageId(5),
            kind: MessageKind::Custom("poll".into()),
            from: user("alice"),
            from_device: DeviceId::new("d1").expect("valid"),
            to: vec![user("bob").into(), user("carol").into()],
            body: vec![7; 300],
            sent_at: 1_700_000_000_000,
        };
        let owned = ServerFrame::Deliver {
            seq: 1 << 40,
            message: message.clone(),
        };
        assert_eq!(
            encode_deliver(1 << 40, &message, 1024),
            encode_frame(&owned, 1024)
        );
        assert!(matches!(
            encode_deliver(1, &message, 100),
            Err(CodecError::FrameTooLarge { max: 100, .. })
        ));
    }

    #[test]
    fn refuses_oversized_length_before_buffering_body() {
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&101u32.to_be_bytes());
        assert_eq!(
            decoder.decode::<ClientFrame>(),
            Err(CodecError::FrameTooLarge { len: 101, max: 100 })
        );
    }

    #[test]
    fn refuses_oversized_frame_on_encode() {
        let frame = ClientFrame::Submit {
            req: 1,
            client_id: 1,
            kind: MessageKind::Chat,
            to: vec![user("bob").into()],
            body: vec![0; 200],
        };
        assert!(matches!(
            encode_frame(&frame, 100),
            Err(CodecError::FrameTooLarge { max: 100, .. })
        ));
    }

    #[test]
    fn refuses_garbage_and_trailing_bytes() {
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            decoder.decode::<ClientFrame>(),
            Err(CodecError::Malformed(_))
        ));

        // A valid Ack followed by a stray byte inside the same length.
        let mut body = postcard::to_stdvec(&ClientFrame::Ack { seq: 1 }).expect("encode");
        body.push(0);
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&bytes);
        assert!(matches!(
            decoder.decode::<ClientFrame>(),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_empty_frame_and_invalid_names() {
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&[0, 0, 0, 0]);
        assert_eq!(decoder.decode::<ClientFrame>(), Err(CodecError::Empty));

        // A Register whose user name breaks the name rules is malformed, not a register.
        #[derive(serde::Serialize)]
        enum Raw {
            _Hello,
            Register {
                req: u64,
                user: String,
                password: String,
            },
        }
        let raw = Raw::Register {
            req: 1,
            user: "../etc".into(),
            password: "x".into(),
        };
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&encode_frame(&raw, 100).expect("encode"));
        assert!(matches!(
            decoder.decode::<ClientFrame>(),
            Err(CodecError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new(256);
            decoder.push(&bytes);
            for _ in 0..64 {
                match decoder.decode::<ClientFrame>() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn frames_split_anywhere_reassemble(split in 0usize..200, body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let frame = ClientFrame::Submit {
                req: 9,
                client_id: 3,
                kind: MessageKind::Chat,
                to: vec![user("bob").into()],
                body,
            };
            let bytes = encode_frame(&frame, 1024).expect("encode");
            let split = split.min(bytes.len());
            let mut decoder = FrameDecoder::new(1024);
            decoder.push(&bytes[..split]);
            let first = decoder.decode::<ClientFrame>().expect("no error");
            if split < bytes.len() {
                prop_assert_eq!(first, None);
                decoder.push(&bytes[split..]);
                prop_assert_eq!(decoder.decode::<ClientFrame>().expect("no error"), Some(frame));
            } else {
                prop_assert_eq!(first, Some(frame));
            }
        }

        #[test]
        fn a_stream_of_frames_pushed_in_any_pieces_decodes_in_order(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..40),
            cuts in proptest::collection::vec(1usize..700, 1..60),
            tail in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let frames: Vec<ClientFrame> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, body)| ClientFrame::Submit {
                    req: i as u64,
                    client_id: i as u64,
                    kind: MessageKind::Chat,
                    to: vec![user("bob").into()],
                    body,
                })
                .collect();
            let mut stream: Vec<u8> = frames
                .iter()
                .flat_map(|f| encode_frame(f, 1024).expect("encode"))
                .collect();
            // The start of a frame that never ends: held, never decoded.
            stream.extend_from_slice(&tail);
            let mut decoder = FrameDecoder::new(1024);
            let mut decoded = Vec::new();
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            while at < stream.len() {
                let end = (at + cut.next().copied().unwrap_or(1)).min(stream.len());
                decoder.push(&stream[at..end]);
                at = end;
                while let Some(frame) = decoder.decode::<ClientFrame>().expect("no error") {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert_eq!(decoder.buffered(), tail.len());
            prop_assert_eq!(decoder.into_rest(), tail);
        }
    }
}

#[cfg(test)]
mod wire_examples {
    //! The byte-exact examples of `docs/protocol.md`, so the document cannot drift from the code.
    use super::*;
    use crate::frame::*;
    use crate::name::UserId;

    #[test]
    fn hello_bytes() {
        let hello = ClientFrame::Hello {
            version: 1,
            agent: "cli".into(),
        };
        assert_eq!(
            encode_frame(&hello, 1024).expect("encode"),
            [0, 0, 0, 6, 0x00, 0x01, 0x03, b'c', b'l', b'i']
        );
    }

    #[test]
    fn submit_bytes() {
        let submit = ClientFrame::Submit {
            req: 7,
            client_id: 300,
            kind: MessageKind::Chat,
            to: vec![UserId::new("bob").expect("valid").into()],
            body: b"hi".to_vec(),
        };
        assert_eq!(
            encode_frame(&submit, 1024).expect("encode"),
            [
                0, 0, 0, 13,   // length
                0x06, // Submit
                0x07, // req
                0xac, 0x02, // client_id 300
                0x00, // Chat
                0x01, 0x03, b'b', b'o', b'b', // to: ["bob"]
                0x02, b'h', b'i', // body
            ]
        );
    }

    #[test]
    fn error_bytes() {
        let error = ServerFrame::error(Some(7), ErrorCode::UNKNOWN_USER, "no");
        assert_eq!(
            encode_frame(&error, 1024).expect("encode"),
            [0, 0, 0, 7, 0x07, 0x01, 0x07, 0x09, 0x02, b'n', b'o']
        );
    }
}
