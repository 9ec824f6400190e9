//! Files, end to end over the wire protocol alone: uploads and downloads on streams of their
//! own (`docs/protocol.md`, "File streams"), written here from the document with raw QUIC
//! streams on a logged-in connection, against the real `iim-host` binary.

use iim_client::proto::body::{FILE_KIND, FileRef};
use iim_client::proto::file::{FileAnswer, FileRequest, Sha256, hex};
use iim_client::proto::{ErrorCode, FrameDecoder, MessageKind, UserId, encode_frame};
use iim_client::{Connection, new_client_id};
use iim_e2e::*;
use sha2::Digest;
use std::time::Duration;

type Result = anyhow::Result<()>;

/// A host whose files may be 8 MiB at most.
const LIMITS: &str = "[limits]\nmax_file = 8388608\n";

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn sha256(bytes: &[u8]) -> Sha256 {
    sha2::Sha256::digest(bytes).into()
}

/// A file stream with its request sent.
struct FileStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl FileStream {
    async fn open(conn: &Connection, request: &FileRequest) -> anyhow::Result<Self> {
        let (mut send, recv) = within("opening a file stream", conn.quic().open_bi()).await??;
        send.write_all(&encode_frame(request, 1024)?).await?;
        Ok(Self { send, recv })
    }

    async fn upload(conn: &Connection, bytes: &[u8], name: &str) -> anyhow::Result<Self> {
        let request = FileRequest::Upload {
            size: bytes.len() as u64,
            sha256: sha256(bytes),
            name: name.into(),
            media_type: "application/octet-stream".into(),
        };
        Self::open(conn, &request).await
    }

    /// The next answer: one frame, read exactly (raw bytes may follow it).
    async fn answer(&mut self) -> anyhow::Result<FileAnswer> {
        let mut prefix = [0u8; 4];
        within("an answer's length", self.recv.read_exact(&mut prefix)).await??;
        let mut frame = vec![0u8; u32::from_be_bytes(prefix) as usize];
        within("an answer", self.recv.read_exact(&mut frame)).await??;
        let mut decoder = FrameDecoder::new(1 << 16);
        decoder.push(&prefix);
        decoder.push(&frame);
        decoder
            .decode()?
            .ok_or_else(|| anyhow::anyhow!("half an answer"))
    }

    /// Sends `bytes` and the end of the stream, and returns the host's last answer.
    async fn finish_with(mut self, bytes: &[u8]) -> anyhow::Result<FileAnswer> {
        // Bounded by the stream's flow control: a refusal stops the stream, and the write
        // then fails, which is fine; the answer says why.
        let _ = within("sending a file", self.send.write_all(bytes)).await?;
        let _ = self.send.finish();
        self.answer().await
    }
}

fn refused_code(answer: &FileAnswer) -> Option<ErrorCode> {
    match answer {
        FileAnswer::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

/// Uploads `bytes` whole; the offset the host asked for must be `from`.
async fn upload_whole(conn: &Connection, bytes: &[u8], from: u64) -> anyhow::Result<()> {
    let mut stream = FileStream::upload(conn, bytes, "data.bin").await?;
    match stream.answer().await? {
        FileAnswer::Ready { offset } if offset == from => {}
        other => anyhow::bail!("expected Ready{{offset: {from}}}, got {other:?}"),
    }
    let stored = stream.finish_with(&bytes[from as usize..]).await?;
    anyhow::ensure!(
        stored
            == FileAnswer::Stored {
                sha256: sha256(bytes)
            },
        "expected Stored, got {stored:?}"
    );
    Ok(())
}

/// Downloads the file from `offset`: its announced size and the bytes that came.
async fn download(
    conn: &Connection,
    sha256: Sha256,
    offset: u64,
) -> anyhow::Result<std::result::Result<(u64, String, Vec<u8>), FileAnswer>> {
    let mut stream = FileStream::open(conn, &FileRequest::Download { sha256, offset }).await?;
    let _ = stream.send.finish();
    match stream.answer().await? {
        FileAnswer::Sending {
            size,
            offset: from,
            name,
            ..
        } => {
            anyhow::ensure!(from == offset, "the bytes start at {from}, not {offset}");
            let bytes = within("a download", stream.recv.read_to_end(64 << 20)).await??;
            Ok(Ok((size, name, bytes)))
        }
        other => Ok(Err(other)),
    }
}

/// Sends a `file` message from `conn` to `to`.
async fn send_file_message(
    conn: &Connection,
    to: &UserId,
    file: &FileRef,
) -> std::result::Result<iim_client::Accepted, iim_client::ClientError> {
    conn.submit(
        new_client_id(),
        MessageKind::Custom(FILE_KIND.into()),
        std::slice::from_ref(to),
        &file.to_json(),
    )
    .await
}

#[tokio::test]
async fn an_upload_cut_off_resumes_and_only_the_users_sent_the_file_may_download_it() -> Result {
    let mut host = HostProcess::start_chat_only_with_config(LIMITS)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "laptop").await?;
    let (c, _) = host.online(&carol, "tablet").await?;
    let bytes = content(3 << 20, 7);
    let id = sha256(&bytes);

    // The first upload is cut off after 1 MiB: the stream is reset, as a lost connection
    // would leave it.
    let mut first = FileStream::upload(&a, &bytes, "holiday.mp4").await?;
    assert_eq!(first.answer().await?, FileAnswer::Ready { offset: 0 });
    first.send.write_all(&bytes[..1 << 20]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.send.reset(0u32.into())?;

    // The next upload of the same bytes goes on from what arrived, once the host let go of
    // the first (until then it says another upload is running).
    let mut offset = None;
    for _ in 0..50 {
        let mut again = FileStream::upload(&a, &bytes, "holiday.mp4").await?;
        match again.answer().await? {
            FileAnswer::Ready { offset: at } => {
                offset = Some(at);
                let stored = again.finish_with(&bytes[at as usize..]).await?;
                assert_eq!(stored, FileAnswer::Stored { sha256: id });
                break;
            }
            FileAnswer::Refused { code, .. } if code == ErrorCode::UNAVAILABLE => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let offset = offset.expect("the first upload was let go of");
    assert!(
        offset > 0 && offset <= 1 << 20,
        "the second upload went on from what the first sent, not {offset}"
    );

    // Uploaded again whole, it is answered Stored at once.
    let mut third = FileStream::upload(&a, &bytes, "other-name.mp4").await?;
    assert_eq!(third.answer().await?, FileAnswer::Stored { sha256: id });

    // Alice may download what she uploaded, from any offset.
    let (size, name, got) = download(&a, id, 0).await?.expect("alice downloads");
    assert_eq!((size, name.as_str()), (bytes.len() as u64, "holiday.mp4"));
    assert!(got == bytes, "the downloaded bytes are the uploaded ones");

    // Bob may not, until a file message reaches him.
    let refused = download(&b, id, 0).await?.expect_err("not sent to bob yet");
    assert_eq!(refused_code(&refused), Some(ErrorCode::NOT_FOUND));
    let file = FileRef {
        file: hex(&id),
        name: "holiday.mp4".into(),
        size: bytes.len() as u64,
        media_type: "video/mp4".into(),
    };
    let sent = send_file_message(&a, &bob, &file).await?;
    let got_message = next_message(&b).await?;
    assert_eq!(got_message.id, sent.id);
    assert_eq!(got_message.kind, MessageKind::Custom(FILE_KIND.into()));
    assert_eq!(FileRef::from_json(&got_message.body)?, file);
    let (_, _, half) = download(&b, id, 2 << 20).await?.expect("bob downloads");
    assert!(
        half == bytes[2 << 20..],
        "a download goes on from its offset"
    );
    let (_, _, whole) = download(&b, id, 0).await?.expect("bob downloads");
    assert_eq!(sha256(&whole), id);

    // Carol was sent nothing: she can neither download it nor pass it on.
    let refused = download(&c, id, 0).await?.expect_err("carol may not");
    assert_eq!(refused_code(&refused), Some(ErrorCode::NOT_FOUND));
    assert_eq!(
        code_of(send_file_message(&c, &alice, &file).await)?,
        ErrorCode::NOT_FOUND
    );

    // Stored means durable: after kill -9 the file is whole and still bob's to read.
    drop((a, b, c));
    host.kill9()?;
    host.restart()?;
    let (b, _) = host.online(&bob, "laptop").await?;
    let (_, _, after) = download(&b, id, 0)
        .await?
        .expect("bob downloads after a crash");
    assert!(after == bytes, "the file survived kill -9 whole");
    Ok(())
}

#[tokio::test]
async fn bad_uploads_downloads_and_file_messages_get_clear_errors_and_change_nothing() -> Result {
    let host = HostProcess::start_chat_only_with_config(LIMITS)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let bytes = content(100_000, 3);
    let id = sha256(&bytes);

    // More bytes than announced.
    let mut stream = FileStream::upload(&a, &bytes[..50_000], "half.bin").await?;
    assert_eq!(stream.answer().await?, FileAnswer::Ready { offset: 0 });
    let answer = stream.finish_with(&bytes).await?;
    assert_eq!(
        refused_code(&answer),
        Some(ErrorCode::INVALID_ARGUMENT),
        "{answer:?}"
    );

    // Bytes that are not the announced SHA-256: thrown away, nothing stored.
    let mut wrong = bytes.clone();
    wrong[99_999] ^= 0xff;
    let mut stream = FileStream::upload(&a, &bytes, "data.bin").await?;
    assert_eq!(stream.answer().await?, FileAnswer::Ready { offset: 0 });
    let answer = stream.finish_with(&wrong).await?;
    match &answer {
        FileAnswer::Refused { code, message } => {
            assert_eq!(*code, ErrorCode::INVALID_ARGUMENT);
            assert!(message.contains("SHA-256"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let refused = download(&a, id, 0).await?.expect_err("nothing was stored");
    assert_eq!(refused_code(&refused), Some(ErrorCode::NOT_FOUND));

    // Fewer bytes than announced: kept, and the next upload goes on from them.
    let mut stream = FileStream::upload(&a, &bytes, "data.bin").await?;
    assert_eq!(stream.answer().await?, FileAnswer::Ready { offset: 0 });
    let answer = stream.finish_with(&bytes[..60_000]).await?;
    match &answer {
        FileAnswer::Refused { code, message } => {
            assert_eq!(*code, ErrorCode::INVALID_ARGUMENT);
            assert!(
                message.contains("60000 of the announced 100000"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    upload_whole(&a, &bytes, 60_000).await?;

    // Over the host's limit, a bad name, an unknown file, an offset past the end.
    let big = FileRequest::Upload {
        size: 8 * 1024 * 1024 + 1,
        sha256: [1; 32],
        name: "big.iso".into(),
        media_type: String::new(),
    };
    let mut stream = FileStream::open(&a, &big).await?;
    assert_eq!(
        refused_code(&stream.answer().await?),
        Some(ErrorCode::BODY_TOO_LARGE)
    );
    let bad_name = FileRequest::Upload {
        size: 10,
        sha256: [1; 32],
        name: "../etc/passwd".into(),
        media_type: String::new(),
    };
    let mut stream = FileStream::open(&a, &bad_name).await?;
    assert_eq!(
        refused_code(&stream.answer().await?),
        Some(ErrorCode::INVALID_ARGUMENT)
    );
    let unknown = download(&a, [9; 32], 0).await?.expect_err("no such file");
    assert_eq!(refused_code(&unknown), Some(ErrorCode::NOT_FOUND));
    let past = download(&a, id, 100_001).await?.expect_err("past the end");
    assert_eq!(refused_code(&past), Some(ErrorCode::INVALID_ARGUMENT));

    // A request that is not one.
    let (mut send, recv) = a.quic().open_bi().await?;
    send.write_all(&[0, 0, 0, 3, 9, 9, 9]).await?;
    let mut junk = FileStream { send, recv };
    assert_eq!(
        refused_code(&junk.answer().await?),
        Some(ErrorCode::MALFORMED)
    );

    // A file stream before the session's stream authenticated.
    let stranger = host.connect().await?;
    let mut early = FileStream::upload(&stranger, &bytes, "data.bin").await?;
    assert_eq!(
        refused_code(&early.answer().await?),
        Some(ErrorCode::NOT_AUTHENTICATED)
    );

    // File messages that do not reference a file rightly.
    let body_of = |file: &str, size: u64| FileRef {
        file: file.into(),
        name: "data.bin".into(),
        size,
        media_type: String::new(),
    };
    let kind = MessageKind::Custom(FILE_KIND.into());
    let not_json = a
        .submit(
            new_client_id(),
            kind.clone(),
            std::slice::from_ref(&bob),
            b"hi",
        )
        .await;
    assert_eq!(code_of(not_json)?, ErrorCode::INVALID_ARGUMENT);
    assert_eq!(
        code_of(send_file_message(&a, &bob, &body_of("cafe", 100_000)).await)?,
        ErrorCode::INVALID_ARGUMENT
    );
    assert_eq!(
        code_of(send_file_message(&a, &bob, &body_of(&hex(&id), 99)).await)?,
        ErrorCode::INVALID_ARGUMENT
    );
    assert_eq!(
        code_of(send_file_message(&a, &bob, &body_of(&hex(&[9; 32]), 1)).await)?,
        ErrorCode::NOT_FOUND
    );

    // And the session went on untouched: the file is whole, and chat works.
    let (_, _, got) = download(&a, id, 0).await?.expect("the file is there");
    assert!(got == bytes);
    a.send_text(&bob, "still here").await?;
    Ok(())
}

#[tokio::test]
async fn a_user_past_their_quota_is_refused_and_a_file_stored_already_costs_nothing() -> Result {
    let host = HostProcess::start_chat_only_with_config("[limits]\nfile_quota = 250000\n")?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    let (first, second, third) = (
        content(100_000, 1),
        content(100_000, 2),
        content(100_000, 3),
    );
    upload_whole(&a, &first, 0).await?;
    upload_whole(&a, &second, 0).await?;

    // A third would make 300,000 bytes: refused before any byte is sent.
    let mut stream = FileStream::upload(&a, &third, "third.bin").await?;
    match stream.answer().await? {
        FileAnswer::Refused { code, message } => {
            assert_eq!(code, ErrorCode::QUOTA_EXCEEDED);
            assert!(message.contains("200000 of 250000 bytes used"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let refused = download(&a, sha256(&third), 0)
        .await?
        .expect_err("not stored");
    assert_eq!(refused_code(&refused), Some(ErrorCode::NOT_FOUND));

    // Bytes the host has already cost nothing, to anyone: alice's first file again, and bob
    // uploading what alice did, are Stored at once.
    let mut again = FileStream::upload(&a, &first, "again.bin").await?;
    assert_eq!(
        again.answer().await?,
        FileAnswer::Stored {
            sha256: sha256(&first)
        }
    );
    let mut same = FileStream::upload(&b, &second, "same.bin").await?;
    assert_eq!(
        same.answer().await?,
        FileAnswer::Stored {
            sha256: sha256(&second)
        }
    );
    // Bob has his own quota: the third file fits in it.
    upload_whole(&b, &third, 0).await?;
    let (_, _, got) = download(&b, sha256(&second), 0)
        .await?
        .expect("bob may read it now");
    assert!(got == second);
    Ok(())
}

#[tokio::test]
async fn a_file_no_message_references_leaves_after_its_time_and_frees_its_quota() -> Result {
    let config = "[limits]\nfile_ttl_secs = 1\nfile_sweep_secs = 1\nfile_quota = 250000\n";
    let host = HostProcess::start_chat_only_with_config(config)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (kept, alone, expiring) = (content(100_000, 1), content(100_000, 2), content(40_000, 3));
    for bytes in [&kept, &alone, &expiring] {
        upload_whole(&a, bytes, 0).await?;
    }
    let reference = |bytes: &[u8]| FileRef {
        file: hex(&sha256(bytes)),
        name: "f.bin".into(),
        size: bytes.len() as u64,
        media_type: String::new(),
    };
    // `kept` waits in bob's inbox (30 days); `expiring` in carol's, for a second; `alone` was
    // sent to nobody.
    send_file_message(&a, &bob, &reference(&kept)).await?;
    a.submit_expiring(
        new_client_id(),
        MessageKind::Custom(FILE_KIND.into()),
        std::slice::from_ref(&carol),
        &reference(&expiring).to_json(),
        Duration::from_secs(1),
    )
    .await?;

    // Within a few seconds the two that nothing references leave.
    let gone = |bytes: Vec<u8>| {
        let a = &a;
        async move {
            for _ in 0..100 {
                if let Err(refused) = download(a, sha256(&bytes), 0).await? {
                    anyhow::ensure!(refused_code(&refused) == Some(ErrorCode::NOT_FOUND));
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::bail!("the file is still there after 10 s")
        }
    };
    gone(alone.clone()).await?;
    gone(expiring.clone()).await?;

    // The one in bob's inbox stays, for bob and for alice.
    let (b, _) = host.online(&bob, "laptop").await?;
    let (_, _, got) = download(&b, sha256(&kept), 0).await?.expect("bob reads it");
    assert!(got == kept);
    download(&a, sha256(&kept), 0)
        .await?
        .expect("alice still reads it");

    // What left no longer counts against alice's quota: 140,000 bytes fit again, and the
    // file that left is taken anew from its first byte.
    upload_whole(&a, &alone, 0).await?;
    upload_whole(&a, &expiring, 0).await?;
    Ok(())
}
