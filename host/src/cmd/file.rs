//! File streams: an upload into the blob store, or a download from it, on a bidirectional
//! stream of its own beside the session's (`iim_proto::file`, `docs/protocol.md`).
//!
//! One task per stream. The session hands it the connection's identity when the stream
//! opened; a stream opened before authentication is refused. Blob I/O runs on blocking
//! threads, a chunk at a time, so that a file is streamed and never held in memory whole.

use super::Refusal;
use crate::Host;
use crate::blobs::{Begun, BlobError, FileId};
use crate::clock::now_ms;
use crate::metrics::label;
use crate::store::FileRecord;
use iim_proto::body::{FILE_KIND, FileRef};
use iim_proto::file::{FileAnswer, FileRequest, Sha256, check_file_name, check_media_type};
use iim_proto::peer::FilePart;
use iim_proto::session::Identity;
use iim_proto::{ErrorCode, FrameDecoder, MessageKind, UserId};
use prometheus_client::metrics::counter::Counter;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// Bytes written to or read from the blob store at a time.
const CHUNK: usize = 256 * 1024;

/// Chunks a transfer's disk side may run ahead of (or behind) its network side.
const WRITE_AHEAD: usize = 4;

/// How long a client has to send a file stream's request once it opened the stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a newer upload waits for the one it takes over to let go of the file.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Serves one file stream until its transfer ends, refusing it with a `Refused` answer (and
/// the end of the stream) if it cannot be done.
pub async fn serve(
    host: Arc<Host>,
    who: Option<Identity>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let outcome = match who {
        None => Err(Refusal::new(
            ErrorCode::NOT_AUTHENTICATED,
            "open file streams once the session's stream is authenticated",
        )),
        Some(who) => transfer(&host, &who, &mut send, &mut recv).await,
    };
    if let Err(refusal) = outcome {
        tracing::debug!(code = %refusal.code, message = %refusal.message, "file stream refused");
        let answer = FileAnswer::Refused {
            code: refusal.code,
            message: refusal.message,
        };
        // Nothing more is read from a refused stream.
        let _ = recv.stop(0u32.into());
        let _ = write_answer(&host, &mut send, &answer).await;
    }
    let _ = send.finish();
}

async fn transfer(
    host: &Host,
    who: &Identity,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), Refusal> {
    let (request, rest) = read_request(host, recv).await?;
    match request {
        FileRequest::Upload {
            size,
            sha256,
            name,
            media_type,
        } => {
            check_file_name(&name).map_err(invalid)?;
            check_media_type(&media_type).map_err(invalid)?;
            let record = FileRecord {
                size,
                name,
                media_type,
                uploader: who.user.clone(),
                stored_at: now_ms(),
            };
            upload(host, send, recv, rest, sha256, record).await
        }
        FileRequest::Download { sha256, offset } => {
            if !rest.is_empty() {
                return Err(Refusal::new(
                    ErrorCode::MALFORMED,
                    "bytes after a download request",
                ));
            }
            download(host, &who.user, send, sha256, offset).await
        }
    }
}

/// The stream's request, and the bytes that came after it (the start of an upload's file).
async fn read_request(
    host: &Host,
    recv: &mut quinn::RecvStream,
) -> Result<(FileRequest, Vec<u8>), Refusal> {
    let mut decoder = FrameDecoder::new(host.config.limits.max_frame);
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match decoder.decode::<FileRequest>() {
            Ok(Some(request)) => return Ok((request, decoder.into_rest())),
            Ok(None) => {}
            Err(e) => return Err(Refusal::new(ErrorCode::MALFORMED, e.to_string())),
        }
        match tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => decoder.push(&buf[..n]),
            Ok(Ok(None)) => {
                return Err(Refusal::new(
                    ErrorCode::MALFORMED,
                    "the stream finished before its request",
                ));
            }
            Ok(Err(e)) => return Err(Refusal::new(ErrorCode::INTERNAL, e.to_string())),
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!("no request within {} s", REQUEST_TIMEOUT.as_secs()),
                ));
            }
        }
    }
}

/// Takes an upload: answers `Ready` with where to go on from, writes what comes until the
/// stream ends, then checks and keeps the file and answers `Stored`. A transfer cut off
/// leaves what arrived for the next upload of the same file.
async fn upload(
    host: &Host,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    rest: Vec<u8>,
    sha256: Sha256,
    record: FileRecord,
) -> Result<(), Refusal> {
    let id = FileId::from_digest(&sha256);
    let (blobs, size) = (host.blobs.clone(), record.size);
    // A file stored here already costs its uploader nothing: only a new one is counted.
    let quota = host.config.limits.file_quota;
    if quota > 0 && blobs.size(&id)?.is_none() {
        let used = host.store.files.usage(&record.uploader)?;
        if used.saturating_add(size) > quota {
            return Err(Refusal::new(
                ErrorCode::QUOTA_EXCEEDED,
                format!(
                    "a file of {size} bytes would take you past your quota: {used} of {quota} bytes used"
                ),
            ));
        }
    }
    let begun = {
        let (blobs, id) = (blobs.clone(), id.clone());
        blocking(move || blobs.upload(&id, size)).await
    };
    let begun = match begun {
        // The same user's earlier upload of it, perhaps on a connection that is gone: it is
        // stopped, and this one goes on from what it wrote.
        Err(busy)
            if busy.code == ErrorCode::UNAVAILABLE && host.uploads.stop(&id, &record.uploader) =>
        {
            let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let (blobs, id) = (blobs.clone(), id.clone());
                match blocking(move || blobs.upload(&id, size)).await {
                    Err(busy)
                        if busy.code == ErrorCode::UNAVAILABLE
                            && tokio::time::Instant::now() < deadline => {}
                    begun => break begun?,
                }
            }
        }
        begun => begun?,
    };
    let mut upload = match begun {
        Begun::Complete { size: stored } => {
            if stored != size {
                return Err(invalid(format!(
                    "the file with this SHA-256 has {stored} bytes, not {size}"
                )));
            }
            return stored_answer(host, send, sha256, &record).await;
        }
        Begun::Partial(upload) => upload,
    };
    write_answer(
        host,
        send,
        &FileAnswer::Ready {
            offset: upload.offset(),
        },
    )
    .await?;
    // The disk and the hash work on a thread of their own while the next bytes are read:
    // the network and the disk overlap, a few chunks apart at most.
    let (offset, size) = (upload.offset(), upload.size());
    let (chunks, mut to_write) = tokio::sync::mpsc::channel::<Vec<u8>>(WRITE_AHEAD);
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(bytes) = to_write.blocking_recv() {
            upload.write(&bytes)?;
        }
        Ok::<_, BlobError>(upload)
    });
    let mut pending = rest;
    let mut received = pending.len() as u64;
    let (number, taken_over) = host.uploads.start(&id, &record.uploader);
    let cut_off = loop {
        if offset + received > size {
            break Some(Refusal::from(BlobError::Overrun { size }));
        }
        if pending.len() >= CHUNK && chunks.send(std::mem::take(&mut pending)).await.is_err() {
            // The writer stopped on an error, which it returns below.
            break None;
        }
        let read = tokio::select! {
            read = recv.read_chunk(CHUNK, true) => read,
            () = taken_over.notified() => break Some(Refusal::new(
                ErrorCode::UNAVAILABLE,
                "a newer upload of this file by you took over",
            )),
        };
        match read {
            Ok(Some(chunk)) => {
                received += chunk.bytes.len() as u64;
                pending.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => break None,
            // Cut off: what arrived is kept for the next upload to go on from.
            Err(e) => break Some(Refusal::new(ErrorCode::INTERNAL, e.to_string())),
        }
    };
    host.uploads.end(&id, number);
    file_measures("upload").0.inc_by(received);
    let overrun = offset + received > size;
    if !pending.is_empty() && !overrun {
        let _ = chunks.send(pending).await;
    }
    drop(chunks);
    let written = writer
        .await
        .map_err(|_| Refusal::new(ErrorCode::INTERNAL, "the host failed"))?;
    if let Some(refusal) = cut_off {
        return Err(refusal);
    }
    let upload = written?;
    blocking(move || upload.finish()).await?;
    stored_answer(host, send, sha256, &record).await?;
    file_measures("upload").1.inc();
    Ok(())
}

/// The metrics of `direction` (`upload`, `download`): bytes, and transfers finished.
fn file_measures(direction: &'static str) -> (Counter, Counter) {
    let metrics = crate::metrics::metrics();
    let direction = label("direction", direction);
    (
        metrics.file_bytes.get_or_create_owned(&direction),
        metrics.file_transfers.get_or_create_owned(&direction),
    )
}

/// Records the stored file (the uploader may read it), makes that durable, and says so.
async fn stored_answer(
    host: &Host,
    send: &mut quinn::SendStream,
    sha256: Sha256,
    record: &FileRecord,
) -> Result<(), Refusal> {
    host.store.files.stored(&sha256, record)?;
    host.store.flush().await?;
    write_answer(host, send, &FileAnswer::Stored { sha256 }).await
}

/// Sends a file the user may read, from `offset` on.
async fn download(
    host: &Host,
    user: &UserId,
    send: &mut quinn::SendStream,
    sha256: Sha256,
    offset: u64,
) -> Result<(), Refusal> {
    let not_found = || {
        Refusal::new(
            ErrorCode::NOT_FOUND,
            format!(
                "no file {} that you may read on this host",
                iim_proto::file::hex(&sha256)
            ),
        )
    };
    if !host.store.files.may_read(user, &sha256)? {
        return Err(not_found());
    }
    if host.store.files.get(&sha256)?.is_none() {
        fetch(host, sha256).await?;
    }
    let record = host.store.files.get(&sha256)?.ok_or_else(not_found)?;
    let (blobs, id) = (host.blobs.clone(), FileId::from_digest(&sha256));
    let (mut reader, size) = blocking(move || blobs.read(&id, offset))
        .await?
        .ok_or_else(not_found)?;
    if offset > size {
        return Err(invalid(format!(
            "offset {offset} is past the end of the file ({size} bytes)"
        )));
    }
    let sending = FileAnswer::Sending {
        size,
        offset,
        name: record.name,
        media_type: record.media_type,
    };
    write_answer(host, send, &sending).await?;
    // From here on the stream carries the file's bytes: a failure resets it instead of
    // answering, and the client goes on from what it has.
    // The disk is read (and the file decrypted, if the store encrypts its files) on a thread
    // of its own, a few chunks ahead of the network; each chunk goes to QUIC as it is, without
    // another copy. A part of the file that does not open (altered on disk) is a read error:
    // the stream is reset, and nothing but the file's own bytes is ever sent.
    let (chunks, mut to_send) = tokio::sync::mpsc::channel(WRITE_AHEAD);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut chunk = Vec::with_capacity(CHUNK);
            match (&mut reader).take(CHUNK as u64).read_to_end(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {
                    if chunks.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = chunks.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let timeout = Duration::from_secs(host.config.limits.write_timeout_secs);
    let (sent_bytes, downloads) = file_measures("download");
    while let Some(read) = to_send.recv().await {
        let chunk = match read {
            Ok(chunk) => bytes::Bytes::from(chunk),
            Err(e) => {
                tracing::error!(error = %e, "reading a file to send");
                let _ = send.reset(u32::from(ErrorCode::INTERNAL.0).into());
                return Ok(());
            }
        };
        let len = chunk.len() as u64;
        match tokio::time::timeout(timeout, send.write_chunk(chunk)).await {
            Ok(Ok(())) => {
                sent_bytes.inc_by(len);
            }
            // The client went away or stopped reading: nothing to tell it.
            Ok(Err(_)) | Err(_) => {
                let _ = send.reset(u32::from(ErrorCode::TOO_SLOW.0).into());
                return Ok(());
            }
        }
    }
    downloads.inc();
    Ok(())
}

/// Fetches file `sha256`, which a user here may read but another host has, from the host that
/// numbered the message naming it, over the network: once, however many users ask at once
/// (the others wait for it), resumed from what an earlier, cut-off fetch left, checked
/// against its SHA-256 and kept like an upload. Nothing if the file is not another host's.
async fn fetch(host: &Host, sha256: Sha256) -> Result<(), Refusal> {
    let Some(network) = &host.network else {
        return Ok(());
    };
    let Some((id, sender)) = host.store.files.named_by(&sha256)? else {
        return Ok(());
    };
    let number = id >> iim_proto::peer::ID_BITS;
    let Some(origin) = network
        .directory
        .servers()
        .into_iter()
        .find(|s| u64::from(s.number) == number && s.id != network.server())
    else {
        return Ok(());
    };
    network
        .fetching(sha256, async {
            // Fetched by another download while this one waited.
            if host.store.files.get(&sha256)?.is_some() {
                return Ok(());
            }
            fetch_from(host, network, &origin.id, sha256, &sender).await?;
            tracing::info!(file = %iim_proto::file::hex(&sha256), from = %origin.id, "fetched a file from another host");
            Ok(())
        })
        .await
}

async fn fetch_from(
    host: &Host,
    network: &crate::network::Network,
    server: &str,
    sha256: Sha256,
    sender: &UserId,
) -> Result<(), Refusal> {
    let part = |offset| async move {
        match network.fetch_part(server, sha256, offset).await {
            Ok(FilePart::Data {
                size,
                name,
                media_type,
                offset: at,
                bytes,
            }) if at == offset => Ok((size, name, media_type, bytes)),
            Ok(FilePart::Data { offset: at, .. }) => Err(Refusal::new(
                ErrorCode::UNAVAILABLE,
                format!("{server} sent the file from {at}, not {offset}"),
            )),
            Ok(FilePart::Refused { code, message }) => {
                Err(Refusal::new(code, format!("{server}: {message}")))
            }
            Err(e) => Err(Refusal::new(
                ErrorCode::UNAVAILABLE,
                format!("cannot fetch the file from {server}: {e}"),
            )),
        }
    };
    let (size, name, media_type, first) = part(0).await?;
    let (blobs, id) = (host.blobs.clone(), FileId::from_digest(&sha256));
    if let Begun::Partial(mut upload) = blocking(move || blobs.upload(&id, size)).await? {
        // The first part is from the start: of use only if nothing of the file is here yet.
        let mut next = (upload.offset() == 0).then_some(first);
        while upload.offset() < size {
            let have = upload.offset();
            let bytes = match next.take() {
                Some(bytes) => bytes,
                None => part(have).await?.3,
            };
            if bytes.is_empty() {
                return Err(Refusal::new(
                    ErrorCode::UNAVAILABLE,
                    format!("{server} sent no more of the file at {have} of {size} bytes"),
                ));
            }
            upload = blocking(move || {
                upload.write(&bytes)?;
                Ok(upload)
            })
            .await?;
        }
        blocking(move || upload.finish()).await?;
    }
    let record = FileRecord {
        size,
        name,
        media_type,
        uploader: sender.clone(),
        stored_at: now_ms(),
    };
    host.store.files.fetched(&sha256, &record)?;
    host.store.flush().await?;
    Ok(())
}

/// Checks a `file` message as it is submitted: its body is a file reference, and the sender
/// may read the file it names, whose size it states right. Other kinds pass.
pub fn check_message(
    host: &Host,
    sender: &UserId,
    kind: &MessageKind,
    body: &[u8],
) -> Result<(), Refusal> {
    if !matches!(kind, MessageKind::Custom(k) if k == FILE_KIND) {
        return Ok(());
    }
    let file = FileRef::from_json(body)
        .map_err(|e| invalid(format!("a file message's body is a file reference: {e}")))?;
    let sha256 = file
        .sha256()
        .ok_or_else(|| invalid(format!("not a file id: {:?}", file.file)))?;
    let record = match host.store.files.may_read(sender, &sha256)? {
        true => host.store.files.get(&sha256)?,
        false => None,
    };
    let record = record.ok_or_else(|| {
        Refusal::new(
            ErrorCode::NOT_FOUND,
            format!("no file {} that you may read on this host", file.file),
        )
    })?;
    if record.size != file.size {
        return Err(invalid(format!(
            "file {} has {} bytes, not {}",
            file.file, record.size, file.size
        )));
    }
    Ok(())
}

async fn write_answer(
    host: &Host,
    send: &mut quinn::SendStream,
    answer: &FileAnswer,
) -> Result<(), Refusal> {
    let bytes = iim_proto::encode_frame(answer, host.config.limits.max_frame)
        .map_err(|e| Refusal::new(ErrorCode::INTERNAL, e.to_string()))?;
    let timeout = Duration::from_secs(host.config.limits.write_timeout_secs);
    match tokio::time::timeout(timeout, send.write_all(&bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Refusal::new(ErrorCode::INTERNAL, e.to_string())),
        Err(_) => Err(Refusal::new(
            ErrorCode::TOO_SLOW,
            "the client stopped reading",
        )),
    }
}

/// Runs blob-store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Refusal::new(ErrorCode::INTERNAL, "the host failed"))?
        .map_err(Refusal::from)
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::INVALID_ARGUMENT, message)
}

impl From<BlobError> for Refusal {
    fn from(e: BlobError) -> Self {
        let code = match &e {
            BlobError::BadId(_)
            | BlobError::Overrun { .. }
            | BlobError::Incomplete { .. }
            | BlobError::HashMismatch { .. } => ErrorCode::INVALID_ARGUMENT,
            BlobError::TooLarge { .. } => ErrorCode::BODY_TOO_LARGE,
            BlobError::Busy(_) => ErrorCode::UNAVAILABLE,
            BlobError::Io { .. }
            | BlobError::Unreadable { .. }
            | BlobError::KeyMissing { .. }
            | BlobError::Encrypted(_) => {
                tracing::error!(error = %e, "blob store");
                return Refusal::new(ErrorCode::INTERNAL, "the host could not store the file");
            }
        };
        Refusal::new(code, e.to_string())
    }
}
