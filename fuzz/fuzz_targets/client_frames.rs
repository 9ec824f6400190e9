//! The frames of a client connection, as a host and a client read them off a stream:
//! `ClientFrame`s (what a host receives), `ServerFrame`s (what a client receives), and the
//! `FileRequest`s and `FileAnswer`s of file streams.
//!
//! Input: a byte choosing the frame type and the decoder's limit, a byte choosing how the
//! stream is cut into pieces, then the stream. Checked (`iim_fuzz::check_stream`): decoding is
//! the same whatever the pieces; an error is an error (never a panic) and is final; the limit
//! on a frame's length holds, before its body is buffered; every frame decoded encodes again
//! within the limit and decodes to itself. And for a `Deliver`, the encoder that borrows the
//! message writes the same bytes as the frame's own.

#![no_main]

use iim_fuzz::{Limits, check_stream, header};
use iim_proto::file::{FileAnswer, FileRequest, check_file_name, check_media_type};
use iim_proto::{ClientFrame, DEFAULT_MAX_FRAME, ServerFrame, encode_deliver, encode_frame};
use libfuzzer_sys::fuzz_target;

/// The decoder's limits: the default, and small ones that most frames cross.
const MAX_FRAMES: [u32; 4] = [DEFAULT_MAX_FRAME, 1024, 100, 8];

fuzz_target!(|data: &[u8]| {
    let ([kind, chunking], stream) = header::<2>(data);
    let max = MAX_FRAMES[usize::from(kind >> 2) % MAX_FRAMES.len()];
    let limits = Limits::one(max);
    match kind % 4 {
        0 => {
            let (frames, _) = check_stream::<ClientFrame>(stream, limits, chunking);
            for frame in &frames {
                let _ = (frame.req(), frame.allowed_early());
            }
        }
        1 => {
            let (frames, _) = check_stream::<ServerFrame>(stream, limits, chunking);
            for frame in frames {
                if let ServerFrame::Deliver { seq, message } = &frame {
                    assert_eq!(
                        encode_deliver(*seq, message, max),
                        encode_frame(&frame, max),
                        "a delivery encoded by reference is not the frame's bytes"
                    );
                }
            }
        }
        2 => {
            let (frames, _) = check_stream::<FileRequest>(stream, limits, chunking);
            for frame in &frames {
                if let FileRequest::Upload {
                    name, media_type, ..
                } = frame
                {
                    let _ = (check_file_name(name), check_media_type(media_type));
                }
            }
        }
        _ => {
            check_stream::<FileAnswer>(stream, limits, chunking);
        }
    }
});
