//! File transfers: each file travels on a bidirectional QUIC stream of its own, beside the
//! session's stream (`iim_proto::file`, `docs/protocol.md`, "File streams").
//!
//! An upload is hashed first (the request names the file by its SHA-256), then sent from the
//! offset the host names: what an earlier, cut-off upload of the same bytes left there. A
//! download is appended to `<out>.part`, whose length is where the next attempt goes on from,
//! and becomes `<out>` only once it is whole and its SHA-256 is the one asked for.
//!
//! Nothing here holds a file in memory whole: files are read, written and hashed a chunk at a
//! time, and the hashing runs on a blocking thread.
//!
//! **Invariant**: a `.part` file only ever holds a prefix of the file it is named for, as far
//! as the client knows; whatever fails the final check is deleted, not kept to resume from.

use crate::ClientError;
use crate::driver::{connection_error, read_error};
use iim_proto::body::FileRef;
use iim_proto::codec::LENGTH_PREFIX;
use iim_proto::file::{FileAnswer, FileRequest, Sha256, check_file_name, check_media_type, hex};
use iim_proto::{CodecError, ErrorCode, FrameDecoder};
use std::io::{Read as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

/// What a transfer reports as it goes: bytes done so far (the part a resumed transfer already
/// had included) and the file's size.
pub(crate) type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Bytes read from or written to a file at a time.
const CHUNK: usize = 256 * 1024;

/// The largest answer frame taken from the host. Answers are a few hundred bytes; the limit
/// keeps a confused host from making the client buffer more.
const MAX_ANSWER: u32 = 64 * 1024;

/// A file a download saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadedFile {
    /// Where it is now.
    pub path: PathBuf,
    /// Its name, as its uploader gave it.
    pub name: String,
    /// Its media type, as its uploader gave it (may be empty).
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Where a download goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Destination<'a> {
    /// This path, whatever the file's name; `<path>.part` until it is whole.
    File(&'a Path),
    /// This directory, under the name the host sends; `<dir>/<id>.part` until it is whole
    /// (the name is not known before the host answers, and the `.part` must be found again
    /// by the next attempt before that).
    Directory(&'a Path),
}

impl Destination<'_> {
    /// The `.part` file of a download of `sha256` to here.
    pub(crate) fn part(&self, sha256: &Sha256) -> PathBuf {
        match self {
            Destination::File(path) => part_path(path),
            Destination::Directory(dir) => dir.join(format!("{}.part", hex(sha256))),
        }
    }

    /// Where the file named `name` goes. Into a directory, the name must be a plain file name
    /// (it comes from whoever uploaded the file) and nothing may be there yet: a download
    /// does not overwrite a file it did not name.
    fn target(&self, name: &str) -> Result<PathBuf, ClientError> {
        match self {
            Destination::File(path) => Ok(path.to_path_buf()),
            Destination::Directory(dir) => {
                check_file_name(name).map_err(|reason| {
                    ClientError::Protocol(format!("the host sent the file name {name:?}: {reason}"))
                })?;
                let target = dir.join(name);
                if target.exists() {
                    return Err(file_error(
                        &target,
                        "exists already; download to another path".into(),
                    ));
                }
                Ok(target)
            }
        }
    }
}

/// `<path>.part`: where a download to `path` keeps what came so far.
pub(crate) fn part_path(path: &Path) -> PathBuf {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    PathBuf::from(part)
}

fn file_error(path: &Path, reason: String) -> ClientError {
    ClientError::File {
        path: path.display().to_string(),
        reason,
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |e| file_error(path, e.to_string())
}

/// Uploads the file at `path` on a stream of `conn`; see [`crate::Connection::upload_file`].
/// `timeout` bounds each wait for the host: an answer, or room to send the next chunk.
pub(crate) async fn upload(
    conn: &quinn::Connection,
    timeout: Duration,
    path: &Path,
    media_type: &str,
    progress: Progress<'_>,
) -> Result<FileRef, ClientError> {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| file_error(path, "has no file name in UTF-8".into()))?
        .to_owned();
    check_file_name(&name).map_err(|reason| file_error(path, reason))?;
    check_media_type(media_type).map_err(|reason| file_error(path, reason))?;
    let before = Snapshot::of(path).await?;
    let (sha256, size) = hash_file(path).await?;
    if size != before.len {
        return Err(changed(path));
    }
    let file = FileRef {
        file: hex(&sha256),
        name: name.clone(),
        size,
        media_type: media_type.to_owned(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(connection_error)?;
    let request = FileRequest::Upload {
        size,
        sha256,
        name,
        media_type: media_type.to_owned(),
    };
    write_request(&mut send, &request, timeout).await?;
    let offset = match read_answer(&mut recv, timeout).await? {
        FileAnswer::Ready { offset } if offset <= size => offset,
        FileAnswer::Stored { sha256: stored } => {
            // The host had the file already: nothing to send.
            check_stored(&sha256, &stored)?;
            progress(size, size);
            return Ok(file);
        }
        other => return Err(unexpected(other)),
    };
    progress(offset, size);
    let mut chunks = Chunks::open(path, offset, size, before).await?;
    // The host may refuse while the bytes go (a quota, a disk that failed): its answer is
    // watched for all along, and ends the sending at once.
    let next_answer = read_frame(&mut recv);
    tokio::pin!(next_answer);
    let sent = {
        let sending = async {
            while let Some(chunk) = chunks.next().await? {
                match tokio::time::timeout(timeout, send.write_all(chunk)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(quinn::WriteError::Stopped(_))) => return Err(Sending::Stopped),
                    Ok(Err(e)) => return Err(Sending::Failed(write_error(e))),
                    Err(_) => return Err(Sending::Failed(ClientError::Timeout(timeout))),
                }
                progress(chunks.pos, size);
            }
            Ok(())
        };
        tokio::select! {
            answer = &mut next_answer => Err(Sending::Answered(answer)),
            sent = sending => sent,
        }
    };
    match sent {
        Ok(()) => {}
        Err(Sending::Answered(answer)) => {
            let _ = send.reset(0u32.into());
            return Err(match answer? {
                FileAnswer::Refused { code, message } => ClientError::Refused { code, message },
                other => ClientError::Protocol(format!(
                    "the host answered {other:?} before the file's last byte"
                )),
            });
        }
        // The host stopped reading: its refusal says why.
        Err(Sending::Stopped) => {
            return Err(
                match tokio::time::timeout(timeout, &mut next_answer).await {
                    Ok(Ok(FileAnswer::Refused { code, message })) => {
                        ClientError::Refused { code, message }
                    }
                    Ok(Err(e)) => e,
                    _ => ClientError::ConnectionLost(
                        "the host stopped reading the file without saying why".into(),
                    ),
                },
            );
        }
        Err(Sending::Failed(e)) => {
            // Not a complete file: the host must not take the stream's end as one.
            let _ = send.reset(0u32.into());
            return Err(e);
        }
    }
    // Finishing tells the host the file is whole: harmless if the stream is gone already (the
    // answer's wait says so).
    let _ = send.finish();
    match tokio::time::timeout(timeout, &mut next_answer)
        .await
        .map_err(|_| ClientError::Timeout(timeout))??
    {
        FileAnswer::Stored { sha256: stored } => {
            check_stored(&sha256, &stored)?;
            Ok(file)
        }
        other => Err(unexpected(other)),
    }
}

/// Why sending an upload's bytes stopped early.
enum Sending {
    /// The host answered first (or reading its answer failed).
    Answered(Result<FileAnswer, ClientError>),
    /// The host stopped reading (`STOP_SENDING`); its answer says why.
    Stopped,
    /// Reading the file, or writing it to the stream, failed.
    Failed(ClientError),
}

impl From<ClientError> for Sending {
    fn from(e: ClientError) -> Self {
        Sending::Failed(e)
    }
}

fn write_error(e: quinn::WriteError) -> ClientError {
    match e {
        quinn::WriteError::ConnectionLost(lost) => connection_error(lost),
        e => ClientError::ConnectionLost(format!("the file stream: {e}")),
    }
}

fn check_stored(sent: &Sha256, stored: &Sha256) -> Result<(), ClientError> {
    if sent != stored {
        return Err(ClientError::Protocol(format!(
            "the host stored {} for the upload of {}",
            hex(stored),
            hex(sent)
        )));
    }
    Ok(())
}

fn changed(path: &Path) -> ClientError {
    file_error(
        path,
        "changed while it was uploaded; upload it again once it stays the same".into(),
    )
}

/// What says a file changed: its length and the time it was last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    len: u64,
    modified: Option<SystemTime>,
}

impl Snapshot {
    async fn of(path: &Path) -> Result<Self, ClientError> {
        let meta = tokio::fs::metadata(path).await.map_err(io_error(path))?;
        if !meta.is_file() {
            return Err(file_error(path, "is not a file".into()));
        }
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// An upload's bytes, from the host's offset to the size that was hashed, a chunk at a time;
/// fails if the file is not what was hashed any more (as far as its size and time say: its
/// bytes are the host's to check).
struct Chunks<'a> {
    path: &'a Path,
    file: tokio::fs::File,
    /// The position of the next chunk.
    pos: u64,
    size: u64,
    before: Snapshot,
    buf: Vec<u8>,
}

impl<'a> Chunks<'a> {
    async fn open(
        path: &'a Path,
        offset: u64,
        size: u64,
        before: Snapshot,
    ) -> Result<Self, ClientError> {
        let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(io_error(path))?;
        Ok(Self {
            path,
            file,
            pos: offset,
            size,
            before,
            buf: vec![0; CHUNK],
        })
    }

    /// The next chunk; `None` once the file's end came where it was when it was hashed.
    async fn next(&mut self) -> Result<Option<&[u8]>, ClientError> {
        let path = self.path;
        if self.pos == self.size {
            // Bytes past the size, or another time of writing, mean another file than the one
            // hashed; the host would refuse it or store the wrong bytes under the name.
            let more = self
                .file
                .read(&mut self.buf[..1])
                .await
                .map_err(io_error(path))?;
            if more > 0 || Snapshot::of(path).await? != self.before {
                return Err(changed(path));
            }
            return Ok(None);
        }
        let want = usize::try_from(self.size - self.pos).map_or(CHUNK, |left| left.min(CHUNK));
        let n = self
            .file
            .read(&mut self.buf[..want])
            .await
            .map_err(io_error(path))?;
        if n == 0 {
            return Err(changed(path));
        }
        self.pos += n as u64;
        Ok(Some(&self.buf[..n]))
    }
}

/// Downloads `sha256` on a stream of `conn` to `to`; see [`crate::Connection::download_file`].
pub(crate) async fn download(
    conn: &quinn::Connection,
    timeout: Duration,
    sha256: &Sha256,
    to: Destination<'_>,
    progress: Progress<'_>,
) -> Result<DownloadedFile, ClientError> {
    let part = to.part(sha256);
    let offset = PartFile::offset(&part).await?;
    match download_from(conn, timeout, sha256, to, &part, offset, progress).await {
        // The host refuses an offset past the file's end: the `.part` cannot be this file's
        // (one left by another download to the same path). Start over, once.
        Err(ClientError::Refused { code, .. })
            if code == ErrorCode::INVALID_ARGUMENT && offset > 0 =>
        {
            tracing::info!(part = %part.display(), "the host refused to resume; downloading afresh");
            tokio::fs::remove_file(&part)
                .await
                .map_err(io_error(&part))?;
            download_from(conn, timeout, sha256, to, &part, 0, progress).await
        }
        done => done,
    }
}

async fn download_from(
    conn: &quinn::Connection,
    timeout: Duration,
    sha256: &Sha256,
    to: Destination<'_>,
    part: &Path,
    offset: u64,
    progress: Progress<'_>,
) -> Result<DownloadedFile, ClientError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(connection_error)?;
    let request = FileRequest::Download {
        sha256: *sha256,
        offset,
    };
    write_request(&mut send, &request, timeout).await?;
    // Nothing more goes to the host on this stream.
    let _ = send.finish();
    let (size, start, name, media_type) = match read_answer(&mut recv, timeout).await? {
        FileAnswer::Sending {
            size,
            offset: start,
            name,
            media_type,
        } if start <= offset && start <= size => (size, start, name, media_type),
        other => return Err(unexpected(other)),
    };
    let target = to.target(&name)?;
    let mut file = PartFile::open(part, sha256, start, size).await?;
    progress(start, size);
    let mut buf = vec![0; CHUNK];
    loop {
        let read = match tokio::time::timeout(timeout, recv.read(&mut buf)).await {
            Ok(Ok(read)) => read,
            // Cut off: the `.part` holds every byte that came (`append` returns only once
            // they are in it), so the next attempt, in this process or another, goes on
            // from there.
            Ok(Err(e)) => return Err(read_error(e)),
            Err(_) => return Err(ClientError::Timeout(timeout)),
        };
        let Some(n) = read else { break };
        file.append(&buf[..n]).await?;
        progress(file.len, size);
    }
    file.finish(&target).await?;
    Ok(DownloadedFile {
        path: target,
        name,
        media_type,
        size,
    })
}

/// A download's `.part` file, appended to as the bytes come.
pub(crate) struct PartFile {
    path: PathBuf,
    file: tokio::fs::File,
    sha256: Sha256,
    /// Bytes in it.
    len: u64,
    /// The file's size.
    size: u64,
    /// The SHA-256 of what is in it so far: the bytes are hashed as they come, not read back.
    hasher: sha2::Sha256,
}

impl PartFile {
    /// Where a download to `path` goes on from: the length of what an earlier one left.
    pub(crate) async fn offset(path: &Path) -> Result<u64, ClientError> {
        match tokio::fs::metadata(path).await {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(file_error(path, e.to_string())),
        }
    }

    /// Opens (or makes) the `.part` of `sha256`, of `size` bytes, to take the bytes from
    /// `start` on: what it holds past `start` is cut off.
    pub(crate) async fn open(
        path: &Path,
        sha256: &Sha256,
        start: u64,
        size: u64,
    ) -> Result<Self, ClientError> {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .await
            .map_err(io_error(path))?;
        let len = file.metadata().await.map_err(io_error(path))?.len();
        if len < start {
            return Err(file_error(
                path,
                format!("has {len} bytes, fewer than the {start} to go on from"),
            ));
        }
        file.set_len(start).await.map_err(io_error(path))?;
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(io_error(path))?;
        // What an earlier download left is hashed once, here; the rest as it comes.
        let owned = path.to_owned();
        let (hasher, _) = tokio::task::spawn_blocking(move || hash_prefix(&owned, start))
            .await
            .map_err(|e| file_error(path, format!("hashing failed: {e}")))?
            .map_err(io_error(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            sha256: *sha256,
            len: start,
            size,
            hasher,
        })
    }

    /// Appends bytes that came, and returns once they are in the file, so that a download
    /// cut off or dropped at any point leaves a `.part` holding every byte counted. More
    /// than the file's size means another file: the `.part` is deleted.
    pub(crate) async fn append(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        if self.len + bytes.len() as u64 > self.size {
            let reason = format!("more than its {} bytes came", self.size);
            return Err(self.discard(reason).await);
        }
        // A tokio file writes on a thread of its own: the bytes are hashed while it does,
        // and `flush` waits for it.
        self.file
            .write_all(bytes)
            .await
            .map_err(io_error(&self.path))?;
        sha2::Digest::update(&mut self.hasher, bytes);
        self.file.flush().await.map_err(io_error(&self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Ends the download: checks that every byte came and that they are the file's, then
    /// renames the `.part` to `target`. Bytes that are not the file's are deleted; a
    /// download that is merely short is kept, to go on from.
    pub(crate) async fn finish(mut self, target: &Path) -> Result<(), ClientError> {
        let path = self.path.clone();
        self.file.flush().await.map_err(io_error(&path))?;
        if self.len < self.size {
            // Its bytes are good as far as the client can tell: the next attempt goes on.
            return Err(ClientError::ConnectionLost(format!(
                "the host ended the file after {} of its {} bytes",
                self.len, self.size
            )));
        }
        // Renamed into place only once on the disk, so that a crash leaves the `.part` (to
        // be checked again) rather than a file that is not whole.
        self.file.sync_all().await.map_err(io_error(&path))?;
        let actual: Sha256 = sha2::Digest::finalize(std::mem::take(&mut self.hasher)).into();
        if self.len != self.size || actual != self.sha256 {
            let reason = format!("its SHA-256 is {}, not the one asked for", hex(&actual));
            return Err(self.discard(reason).await);
        }
        drop(self.file);
        tokio::fs::rename(&path, target)
            .await
            .map_err(|e| file_error(target, format!("cannot move {} here: {e}", path.display())))
    }

    /// Deletes the `.part`, and says why.
    async fn discard(&self, reason: String) -> ClientError {
        let reason = match tokio::fs::remove_file(&self.path).await {
            Ok(()) => format!("{reason}; the partial download was deleted"),
            Err(e) => format!(
                "{reason}; delete {} before downloading again (cannot: {e})",
                self.path.display()
            ),
        };
        ClientError::Corrupt {
            file: hex(&self.sha256),
            reason,
        }
    }
}

/// The SHA-256 of the file at `path`, and its length, read a chunk at a time on a blocking
/// thread.
async fn hash_file(path: &Path) -> Result<(Sha256, u64), ClientError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || sha256_of(&owned))
        .await
        .map_err(|e| file_error(path, format!("hashing failed: {e}")))?
        .map_err(io_error(path))
}

/// The SHA-256 state after the first `len` bytes of the file at `path` (all of it if it is
/// shorter), and how many bytes that was.
fn hash_prefix(path: &Path, len: u64) -> std::io::Result<(sha2::Sha256, u64)> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    if len == 0 {
        return Ok((hasher, 0));
    }
    let mut file = std::fs::File::open(path)?.take(len);
    let mut buf = vec![0; CHUNK];
    let mut read = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok((hasher, read)),
            Ok(n) => {
                hasher.update(&buf[..n]);
                read += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn sha256_of(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let (hasher, len) = hash_prefix(path, u64::MAX)?;
    Ok((sha2::Digest::finalize(hasher).into(), len))
}

async fn write_request(
    send: &mut quinn::SendStream,
    request: &FileRequest,
    timeout: Duration,
) -> Result<(), ClientError> {
    let bytes = iim_proto::encode_frame(request, iim_proto::DEFAULT_MAX_FRAME)
        .map_err(|e| ClientError::TooLarge(e.to_string()))?;
    tokio::time::timeout(timeout, send.write_all(&bytes))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
        .map_err(write_error)
}

/// The host's next answer, within `timeout`.
async fn read_answer(
    recv: &mut quinn::RecvStream,
    timeout: Duration,
) -> Result<FileAnswer, ClientError> {
    tokio::time::timeout(timeout, read_frame(recv))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// The host's next answer. Exactly its bytes are read: a download's file follows at once.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<FileAnswer, ClientError> {
    let mut decoder = FrameDecoder::new(MAX_ANSWER);
    let mut prefix = [0u8; LENGTH_PREFIX];
    read_exact(recv, &mut prefix).await?;
    decoder.push(&prefix);
    // Refuses a length over the limit before anything is allocated for it.
    if let Some(answer) = decoder.decode().map_err(malformed)? {
        return Ok(answer);
    }
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    read_exact(recv, &mut body).await?;
    decoder.push(&body);
    decoder
        .decode()
        .map_err(malformed)?
        .ok_or_else(|| ClientError::Protocol("an answer shorter than its length".into()))
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), ClientError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        // The host ends the stream without a word when it lets go of the connection.
        quinn::ReadExactError::FinishedEarly(_) => {
            ClientError::ConnectionLost("the host ended the file stream before answering".into())
        }
        quinn::ReadExactError::ReadError(e) => read_error(e),
    })
}

fn malformed(e: CodecError) -> ClientError {
    ClientError::Protocol(format!("the host's answer on a file stream: {e}"))
}

/// The error for an answer that is not the one expected: the host's refusal, or a protocol
/// error.
fn unexpected(answer: FileAnswer) -> ClientError {
    match answer {
        FileAnswer::Refused { code, message } => ClientError::Refused { code, message },
        other => ClientError::Protocol(format!("unexpected answer on a file stream: {other:?}")),
    }
}

#[cfg(test)]
mod on_streams;

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn sha(bytes: &[u8]) -> Sha256 {
        sha2::Sha256::digest(bytes).into()
    }

    /// Some bytes that are not all the same, over more than one chunk.
    fn contents(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_part_file_sits_beside_its_target_or_is_named_by_the_id() {
        assert_eq!(
            part_path(Path::new("/tmp/x/report.pdf")),
            Path::new("/tmp/x/report.pdf.part")
        );
        let id = [0xab; 32];
        assert_eq!(
            Destination::File(Path::new("out.bin")).part(&id),
            Path::new("out.bin.part")
        );
        assert_eq!(
            Destination::Directory(Path::new("/dl")).part(&id),
            Path::new("/dl").join(format!("{}.part", "ab".repeat(32)))
        );
    }

    #[test]
    fn a_download_into_a_directory_takes_only_a_plain_new_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let to = Destination::Directory(dir.path());
        assert_eq!(to.target("a.txt").expect("plain"), dir.path().join("a.txt"));
        for bad in ["../a", "a/b", "..", ""] {
            assert!(
                matches!(to.target(bad), Err(ClientError::Protocol(_))),
                "{bad:?}"
            );
        }
        std::fs::write(dir.path().join("a.txt"), b"mine").expect("write");
        assert!(matches!(to.target("a.txt"), Err(ClientError::File { .. })));
        // A path the caller named is theirs to overwrite.
        let named = dir.path().join("a.txt");
        assert_eq!(
            Destination::File(&named).target("other").expect("named"),
            named
        );
    }

    #[tokio::test]
    async fn a_cut_off_download_goes_on_from_its_part_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("big.bin");
        let part = part_path(&out);
        let bytes = contents(3 * CHUNK + 17);
        let id = sha(&bytes);
        assert_eq!(PartFile::offset(&part).await.expect("offset"), 0);

        // The first attempt gets 1000 bytes, then the connection is lost.
        let mut first = PartFile::open(&part, &id, 0, bytes.len() as u64)
            .await
            .expect("open");
        first.append(&bytes[..600]).await.expect("append");
        first.append(&bytes[600..1000]).await.expect("append");
        drop(first);
        assert_eq!(PartFile::offset(&part).await.expect("offset"), 1000);

        // The next goes on from there.
        let mut second = PartFile::open(&part, &id, 1000, bytes.len() as u64)
            .await
            .expect("open");
        second.append(&bytes[1000..]).await.expect("append");
        second.finish(&out).await.expect("whole and checked");
        assert_eq!(std::fs::read(&out).expect("read"), bytes);
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn a_host_that_starts_earlier_than_asked_overwrites_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("f");
        let part = part_path(&out);
        let bytes = contents(100);
        std::fs::write(&part, &bytes[..60]).expect("write");
        let mut file = PartFile::open(&part, &sha(&bytes), 40, 100)
            .await
            .expect("open");
        file.append(&bytes[40..]).await.expect("append");
        file.finish(&out).await.expect("whole");
        assert_eq!(std::fs::read(&out).expect("read"), bytes);
    }

    #[tokio::test]
    async fn bytes_that_are_not_the_file_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("f");
        let part = part_path(&out);
        let bytes = contents(100);

        // A stale `.part` of some other file, then the rest of this one.
        std::fs::write(&part, [0u8; 50]).expect("write");
        let mut file = PartFile::open(&part, &sha(&bytes), 50, 100)
            .await
            .expect("open");
        file.append(&bytes[50..]).await.expect("append");
        let e = file.finish(&out).await.expect_err("fails its check");
        assert!(matches!(&e, ClientError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("deleted"), "{e}");
        assert!(!e.is_transient());
        assert!(!part.exists() && !out.exists());

        // More bytes than the size.
        let mut file = PartFile::open(&part, &sha(&bytes), 0, 100)
            .await
            .expect("open");
        file.append(&bytes[..90]).await.expect("append");
        let e = file.append(&[1; 11]).await.expect_err("too many");
        assert!(matches!(e, ClientError::Corrupt { .. }), "{e:?}");
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn a_short_download_is_kept_to_go_on_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("f");
        let part = part_path(&out);
        let bytes = contents(100);
        let mut file = PartFile::open(&part, &sha(&bytes), 0, 100)
            .await
            .expect("open");
        file.append(&bytes[..70]).await.expect("append");
        let e = file.finish(&out).await.expect_err("short");
        // Retried, from where it stopped.
        assert!(e.is_transient(), "{e:?}");
        assert_eq!(PartFile::offset(&part).await.expect("offset"), 70);
        assert!(!out.exists());
    }

    #[tokio::test]
    async fn an_upload_sends_from_the_offset_and_notices_a_changed_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("up.bin");
        let bytes = contents(2 * CHUNK + 5);
        std::fs::write(&path, &bytes).expect("write");
        let (id, size) = hash_file(&path).await.expect("hash");
        assert_eq!((id, size), (sha(&bytes), bytes.len() as u64));

        let before = Snapshot::of(&path).await.expect("snapshot");
        let mut chunks = Chunks::open(&path, 1000, size, before).await.expect("open");
        let mut sent = Vec::new();
        while let Some(chunk) = chunks.next().await.expect("chunk") {
            assert!(chunk.len() <= CHUNK);
            sent.extend_from_slice(chunk);
        }
        assert_eq!(sent, bytes[1000..]);

        // Longer than when it was hashed.
        let mut chunks = Chunks::open(&path, 0, size - 1, before)
            .await
            .expect("open");
        let e = loop {
            match chunks.next().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a longer file went unnoticed"),
                Err(e) => break e,
            }
        };
        assert!(
            e.to_string().contains("changed while it was uploaded"),
            "{e}"
        );

        // Shorter.
        let mut chunks = Chunks::open(&path, 0, size, before).await.expect("open");
        std::fs::write(&path, &bytes[..10]).expect("write");
        let e = loop {
            match chunks.next().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("a shorter file went unnoticed"),
                Err(e) => break e,
            }
        };
        assert!(matches!(e, ClientError::File { .. }), "{e:?}");
    }

    #[test]
    fn answers_and_refusals_become_errors_that_keep_the_code() {
        let e = unexpected(FileAnswer::Refused {
            code: ErrorCode::NOT_FOUND,
            message: "no file".into(),
        });
        assert_eq!(e.code(), Some(ErrorCode::NOT_FOUND));
        assert_eq!(e.to_string(), "no file (not_found)");
        assert!(matches!(
            unexpected(FileAnswer::Ready { offset: 0 }),
            ClientError::Protocol(_)
        ));
        // A busy file (another connection still uploads it) is worth trying again.
        assert!(
            unexpected(FileAnswer::Refused {
                code: ErrorCode::UNAVAILABLE,
                message: "busy".into(),
            })
            .is_transient()
        );
    }
}
