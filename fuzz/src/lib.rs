//! What the fuzz targets share: the checks of a framed stream, which the client's and the
//! peers' targets run on their own frame types.
//!
//! A stream is decoded twice, pushed whole and pushed in chunks as a driver would get it from
//! the network, and the two must agree. Every frame that comes out must encode again within
//! the same limit and decode to itself; and whatever the bytes, the decoder never holds more
//! than one frame's limit once it has said that it needs more.

use iim_proto::codec::{CodecError, FrameDecoder, LENGTH_PREFIX, encode_frame};
use serde::{Serialize, de::DeserializeOwned};
use std::fmt::Debug;

/// Where decoding a stream stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every byte was a whole frame, or the rest is the start of one.
    NeedMore {
        /// The bytes after the last frame (a file stream's first bytes of the file).
        rest: Vec<u8>,
    },
    /// The stream is broken: the caller closes it.
    Failed(CodecError),
}

/// The limits of one decoder: `first` for its first frame, `rest` once that is in (the peer
/// link reads a small `Join` first, then raises the limit).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Limit of the first frame.
    pub first: u32,
    /// Limit of every frame after it.
    pub rest: u32,
}

impl Limits {
    /// The same limit for every frame.
    pub fn one(max: u32) -> Self {
        Self {
            first: max,
            rest: max,
        }
    }
}

/// Checks a whole stream of `T` frames (see the module's comment); `chunking` chooses the
/// sizes of the pieces of the second decoding. Returns the frames and where decoding stopped.
pub fn check_stream<T>(stream: &[u8], limits: Limits, chunking: u8) -> (Vec<T>, End)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let whole = decode(stream, limits, &mut std::iter::once(stream.len()));
    let mut sizes = chunk_sizes(chunking);
    let chunked = decode(stream, limits, &mut sizes);
    assert_eq!(whole, chunked, "the chunking changed what was decoded");
    let (frames, end) = whole;
    for (i, frame) in frames.iter().enumerate() {
        let max = if i == 0 { limits.first } else { limits.rest };
        check_round_trip(frame, max);
    }
    (frames, end)
}

/// A frame encodes within the limit it was decoded under (the encoder writes the shortest form
/// of every value, so never more bytes than were read), and decodes to itself.
pub fn check_round_trip<T>(frame: &T, max: u32)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = match encode_frame(frame, max) {
        Ok(bytes) => bytes,
        Err(e) => panic!("{frame:?} was decoded under a limit of {max} but does not encode: {e}"),
    };
    let mut decoder = FrameDecoder::new(max);
    decoder.push(&bytes);
    assert_eq!(decoder.decode::<T>().ok().flatten().as_ref(), Some(frame));
    assert_eq!(decoder.buffered(), 0);
}

/// Decodes `stream`, pushed in pieces of the sizes `sizes` gives (the last piece takes what is
/// left), pulling every frame after each push as the drivers do.
fn decode<T>(stream: &[u8], limits: Limits, sizes: &mut dyn Iterator<Item = usize>) -> (Vec<T>, End)
where
    T: DeserializeOwned,
{
    let mut decoder = FrameDecoder::new(limits.first);
    let mut frames = Vec::new();
    let mut left = stream;
    loop {
        let size = sizes.next().unwrap_or(left.len()).min(left.len());
        let (piece, after) = left.split_at(size);
        decoder.push(piece);
        left = after;
        loop {
            let max = if frames.is_empty() {
                limits.first
            } else {
                limits.rest
            };
            let held = decoder.buffered();
            match decoder.decode::<T>() {
                Ok(Some(frame)) => {
                    let taken = held - decoder.buffered();
                    assert!(
                        taken > LENGTH_PREFIX && taken <= LENGTH_PREFIX + max as usize,
                        "a frame of {taken} bytes with its prefix, under a limit of {max}"
                    );
                    frames.push(frame);
                    decoder.set_max(limits.rest);
                }
                Ok(None) => {
                    // The limit holds: with every whole frame taken out, what is held is less
                    // than one frame of the limit and its prefix.
                    assert!(
                        decoder.buffered() < LENGTH_PREFIX + max as usize,
                        "{} bytes held, none of them a whole frame, under a limit of {max}",
                        decoder.buffered()
                    );
                    break;
                }
                Err(e) => {
                    if let CodecError::FrameTooLarge { len, max: told } = &e {
                        assert!(*len > u64::from(*told) && *told == max, "{e}");
                    }
                    // An error is final: the bytes stay, and asking again gives it again.
                    assert_eq!(decoder.buffered(), held);
                    assert_eq!(decoder.decode::<T>().err(), Some(e.clone()));
                    return (frames, End::Failed(e));
                }
            }
        }
        if left.is_empty() {
            return (
                frames,
                End::NeedMore {
                    rest: decoder.into_rest(),
                },
            );
        }
    }
}

/// Piece sizes from 1 to 16 bytes, from a seed: small enough that a length prefix, a varint
/// or a name is often cut.
fn chunk_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut state = u32::from(seed) | 0x100;
    std::iter::repeat_with(move || {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        ((state >> 16) % 16) as usize + 1
    })
}

/// Splits a fuzzer's input into a header of `N` bytes (zeros where the input is shorter) and
/// the rest.
pub fn header<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut header = [0u8; N];
    let n = data.len().min(N);
    header[..n].copy_from_slice(&data[..n]);
    (header, &data[n..])
}
