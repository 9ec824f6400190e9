//! File streams: a file travels on a bidirectional stream of its own, never in a frame of the
//! control stream (`docs/protocol.md`, "File streams").
//!
//! On an authenticated connection the client opens one more bidirectional stream per file and
//! sends one [`FileRequest`] frame on it (framed as on the control stream). The host answers
//! with one [`FileAnswer`] frame; then the raw bytes of the file follow, from the client for
//! an upload (from the offset the host named to the announced size, then the end of the
//! stream), from the host for a download (from the asked offset to the end, then the end of
//! the stream). An upload ends with a second answer, [`FileAnswer::Stored`] or
//! [`FileAnswer::Refused`].

use serde::{Deserialize, Serialize};

/// A file's SHA-256: what names it.
pub type Sha256 = [u8; 32];

/// The longest file name, in bytes.
pub const MAX_FILE_NAME: usize = 255;
/// The longest media type, in bytes.
pub const MAX_MEDIA_TYPE: usize = 127;

/// The first frame on a file stream, from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileRequest {
    /// Store a file. Answered by [`FileAnswer::Ready`] (send the bytes from its offset), or by
    /// [`FileAnswer::Stored`] at once if the host has the file already.
    Upload {
        /// Its size in bytes.
        size: u64,
        /// The SHA-256 of its bytes; the host checks it.
        sha256: Sha256,
        /// Its name (1 to [`MAX_FILE_NAME`] bytes, no `/`, no control characters).
        name: String,
        /// Its media type (`image/png`; at most [`MAX_MEDIA_TYPE`] bytes, may be empty).
        media_type: String,
    },
    /// Fetch a file the user may read, from `offset` on. Answered by
    /// [`FileAnswer::Sending`] and the bytes.
    Download {
        /// The file.
        sha256: Sha256,
        /// Where to start (what an earlier, cut-off download already has).
        offset: u64,
    },
}

/// The host's answers on a file stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileAnswer {
    /// Send the file's bytes from `offset` (what an earlier upload of the same file left)
    /// to its end, then end the stream.
    Ready {
        /// The first byte wanted.
        offset: u64,
    },
    /// The file is stored, whole and verified, and the uploader may reference it.
    Stored {
        /// Its SHA-256.
        sha256: Sha256,
    },
    /// The file's bytes from `offset` to `size` follow, then the end of the stream.
    Sending {
        /// The file's size.
        size: u64,
        /// Where the bytes start.
        offset: u64,
        /// Its name, as uploaded.
        name: String,
        /// Its media type, as uploaded.
        media_type: String,
    },
    /// The request is refused (or the upload failed); the host ends the stream.
    Refused {
        /// Why, as on the control stream.
        code: crate::ErrorCode,
        /// For people.
        message: String,
    },
}

/// Checks a file name: 1 to [`MAX_FILE_NAME`] bytes, no `/` or `\\`, no control characters,
/// not `.` or `..`.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_FILE_NAME {
        return Err(format!("a file name has 1 to {MAX_FILE_NAME} bytes"));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(
            "a file name has no `/`, `\\` or control characters and is not `.` or `..`".into(),
        );
    }
    Ok(())
}

/// Checks a media type: at most [`MAX_MEDIA_TYPE`] bytes of visible ASCII and spaces.
pub fn check_media_type(media_type: &str) -> Result<(), String> {
    if media_type.len() > MAX_MEDIA_TYPE
        || !media_type
            .bytes()
            .all(|b| b == b' ' || b.is_ascii_graphic())
    {
        return Err(format!(
            "a media type has at most {MAX_MEDIA_TYPE} bytes of visible ASCII"
        ));
    }
    Ok(())
}

/// A SHA-256 in lower-case hex, as file ids are written.
pub fn hex(sha256: &Sha256) -> String {
    use std::fmt::Write as _;
    sha256.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Reads a file id written as 64 hex digits.
pub fn parse_hex(text: &str) -> Option<Sha256> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn file_frames_have_the_documented_bytes() {
        // docs/protocol.md, "File streams": a download of the file whose id is 32 bytes of 0xab,
        // from offset 300.
        let frame = FileRequest::Download {
            sha256: [0xab; 32],
            offset: 300,
        };
        let bytes = crate::encode_frame(&frame, 1024).unwrap();
        let mut expected = vec![0, 0, 0, 35, 1];
        expected.extend([0xab; 32]);
        expected.extend([0xac, 0x02]);
        assert_eq!(bytes, expected);
        let ready = crate::encode_frame(&FileAnswer::Ready { offset: 5 }, 1024).unwrap();
        assert_eq!(ready, [0, 0, 0, 2, 0, 5]);
    }

    #[test]
    fn names_and_ids_are_checked() {
        assert!(check_file_name("report.pdf").is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb", &"x".repeat(256)] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_media_type("image/png").is_ok());
        assert!(check_media_type("").is_ok());
        assert!(check_media_type("text/plain; charset=utf-8").is_ok());
        assert!(check_media_type("image/p\u{e9}ng").is_err());
        assert!(check_media_type("text/plain\n").is_err());
        let id = [7u8; 32];
        assert_eq!(parse_hex(&hex(&id)), Some(id));
        assert_eq!(parse_hex(&hex(&id).to_uppercase()), Some(id));
        assert_eq!(parse_hex("07"), None);
        assert_eq!(parse_hex(&"zz".repeat(32)), None);
    }
}
