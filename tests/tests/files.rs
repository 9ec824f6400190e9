//! Files, end to end over the wire protocol alone: uploads and downloads on streams of their
//! own (`docs/protocol.md`, "File streams"), written here from the document with raw QUIC
//! streams on a logged-in connection, against the real `iim-host` binary.
//!
//! Also: a 50 MiB file through a lossy, reordering UDP path (`iim_e2e::lossy`), with the client
//! library's transfers (`Connection` and `Device`, `upload_file` and `download_file`) cut off
//! and resumed.

use anyhow::Context as _;
use iim_client::proto::body::{FILE_KIND, FileRef};
use iim_client::proto::file::{FileAnswer, FileRequest, Sha256, hex};
use iim_client::proto::{
    DeviceId, ErrorCode, FrameDecoder, MessageKind, SessionMode, UserId, encode_frame,
};
use iim_client::{
    ClientConfig, ClientError, Connection, Credentials, Device, DownloadedFile, Event,
    new_client_id,
};
use iim_e2e::lossy::{Impairment, LossyPath};
use iim_e2e::*;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// A phone whose network went away leaves its upload's stream open on the host until the
/// idle timeout; the same user's new upload of the file takes over at once, from what the
/// first wrote. Another user's upload of the same file meanwhile is told it is busy.
#[tokio::test]
async fn the_same_user_s_new_upload_takes_over_one_left_hanging() -> Result {
    let host = HostProcess::start_chat_only_with_config(LIMITS)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (old_phone, _) = host.online(&alice, "phone").await?;
    let bytes = content(3 << 20, 9);
    let id = sha256(&bytes);
    let mut hanging = FileStream::upload(&old_phone, &bytes, "clip.mp4").await?;
    assert_eq!(hanging.answer().await?, FileAnswer::Ready { offset: 0 });
    hanging.send.write_all(&bytes[..1 << 20]).await?;
    // Neither the stream nor the connection ends: the bytes stop, as on a dead network.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (b, _) = host.online(&bob, "laptop").await?;
    let mut other = FileStream::upload(&b, &bytes, "clip.mp4").await?;
    assert_eq!(
        refused_code(&other.answer().await?),
        Some(ErrorCode::UNAVAILABLE)
    );

    let (new_phone, _) = host.online(&alice, "tablet").await?;
    let started = Instant::now();
    let mut again = FileStream::upload(&new_phone, &bytes, "clip.mp4").await?;
    let FileAnswer::Ready { offset } = again.answer().await? else {
        anyhow::bail!("the new upload did not take over");
    };
    assert!(
        offset > 0 && offset <= 1 << 20,
        "it goes on from what the first wrote, not {offset}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "taken over at once, not after the idle timeout: {:?}",
        started.elapsed()
    );
    let stored = again.finish_with(&bytes[offset as usize..]).await?;
    assert_eq!(stored, FileAnswer::Stored { sha256: id });
    // The first stream was told why it ended.
    assert_eq!(
        refused_code(&hanging.answer().await?),
        Some(ErrorCode::UNAVAILABLE)
    );
    let (size, _, got) = download(&new_phone, id, 0).await?.expect("alice downloads");
    assert_eq!((size, got == bytes), (bytes.len() as u64, true));
    Ok(())
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

    // Fewer bytes than announced: kept, and the next upload goes on from them. The host
    // encrypts its files (storage.encrypt, the default): it keeps what came up to the end of
    // its last whole chunk of 64 KiB (less than that never reaches its disk) and says so.
    let mut stream = FileStream::upload(&a, &bytes, "data.bin").await?;
    assert_eq!(stream.answer().await?, FileAnswer::Ready { offset: 0 });
    let answer = stream.finish_with(&bytes[..70_000]).await?;
    match &answer {
        FileAnswer::Refused { code, message } => {
            assert_eq!(*code, ErrorCode::INVALID_ARGUMENT);
            assert!(
                message.contains("70000 of the announced 100000")
                    && message.contains("goes on from byte 65536"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    upload_whole(&a, &bytes, 65_536).await?;

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

/// The file the lossy-path test sends: half the host's default limit.
const LARGE: usize = 50 << 20;

/// A host that notices a connection lost without a word within 12 s (the client's keep-alives
/// come every 10 s), not 30: until it does, it holds that connection's upload, and another
/// upload of the same file is refused with `unavailable`.
const QUICK_IDLE: &str = "[limits]\nidle_timeout_secs = 12\n";

/// A client configuration for `host` whose connections go through `path`: patient enough for
/// its losses, and a device whose tries of a busy transfer (0.5 s apart, then 1, 2 and 3 s:
/// 15.5 s for [`iim_client::TRANSFER_ATTEMPTS`], and each hashes the file first) outlast a
/// [`QUICK_IDLE`] host's noticing.
fn through(host: &HostProcess, path: &LossyPath) -> anyhow::Result<ClientConfig> {
    let mut config = host.client_config()?;
    config.server = path.addr();
    config.connect_timeout = Duration::from_secs(15);
    config.request_timeout = Duration::from_secs(15);
    config.reconnect_first = Duration::from_millis(500);
    config.reconnect_max = Duration::from_secs(3);
    Ok(config)
}

/// A new connection made with `config`, `user` logged in on it as `device`; a receive
/// session's backlog (there is none) taken.
async fn logged_in(
    config: &ClientConfig,
    user: &UserId,
    device: &str,
    mode: SessionMode,
) -> anyhow::Result<Connection> {
    let conn = within("connect", Connection::connect(config)).await??;
    let device = DeviceId::new(device)?;
    within("login", conn.login(user, PASSWORD, &device, mode)).await??;
    if mode == SessionMode::Receive {
        let synced = next_event(&conn).await?;
        anyhow::ensure!(synced == Event::Synced { count: 0 }, "got {synced:?}");
    }
    Ok(conn)
}

/// A [`Device`] of `user` named `device` that sends only, connecting with `config`.
async fn sending_device(
    config: &ClientConfig,
    user: &UserId,
    device: &str,
) -> anyhow::Result<Device> {
    let credentials = Credentials::Password(PASSWORD.into());
    let device = DeviceId::new(device)?;
    let opening = Device::open(config, user, &device, credentials, SessionMode::SendOnly);
    Ok(within("opening a device", opening).await??)
}

/// Where a download to `out` keeps what came so far (`<out>.part`, as the client library
/// names it).
fn part_of(out: &Path) -> PathBuf {
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    PathBuf::from(part)
}

/// The case: a 50 MiB file through a lossy, duplicating, reordering path (each way,
/// 2% of the datagrams lost, 1% sent twice, 5% held back 5-30 ms), its upload and its
/// download each cut off part-way by the loss of their connection. The next upload (a
/// `Device`'s) goes on from what the host kept, `Ready{offset}` past 0, and sends only the
/// rest; the next download goes on from the `.part` on disk, exactly from its length. Bob,
/// whom the file message reached, ends up with alice's bytes, SHA-256 and all, and the
/// client checks the hash of the whole file, not only of what the last attempt brought: a
/// `.part` with one wrong byte in what was already there fails the check and is deleted.
/// Carol, who was sent nothing, is refused the file with `not_found`, as is anyone asking
/// for an id the host does not have, and may not pass the file on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_file_through_a_lossy_path_resumes_both_ways_and_reaches_only_its_recipient()
-> Result {
    /// The file's bytes, and the path's choices, are drawn from these.
    const FILE_SEED: u8 = 50;
    const PATH_SEED: u64 = 0x1f11e5;
    /// Where the first upload and the first download are cut off.
    const CUT_UPLOAD: u64 = 16 << 20;
    const CUT_DOWNLOAD: u64 = 20 << 20;
    /// The whole test fails if it has not finished by then.
    const DEADLINE: Duration = Duration::from_secs(120);
    const MEDIA: &str = "video/x-matroska";

    let started = Instant::now();
    let host = HostProcess::start_chat_only_with_config(QUICK_IDLE)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let carol = host.register("carol").await?;
    let impairment = Impairment {
        loss: 0.02,
        duplicate: 0.01,
        delay: 0.05,
        delay_ms: (5, 30),
    };
    let path = LossyPath::start(host.addr, impairment, PATH_SEED).await?;
    let config = through(&host, &path)?;
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("film.mkv");
    let bytes = content(LARGE, FILE_SEED);
    let id = sha256(&bytes);
    std::fs::write(&source, &bytes)?;
    let (bob_dir, carol_dir) = (dir.path().join("bob"), dir.path().join("carol"));
    std::fs::create_dir(&bob_dir)?;
    std::fs::create_dir(&carol_dir)?;
    let out = bob_dir.join("film.mkv");
    let mut phases = vec![("set up", started.elapsed())];
    let mut lap = {
        let mut last = Instant::now();
        move |phases: &mut Vec<_>, what| {
            phases.push((what, last.elapsed()));
            last = Instant::now();
        }
    };

    tokio::time::timeout(DEADLINE, async {
        let b = logged_in(&config, &bob, "laptop", SessionMode::Receive).await?;

        // Alice's first upload loses its connection once 16 MiB are on their way. Whether the
        // host hears of it at once depends: a client that closes its connection with a full
        // congestion window does not send CONNECTION_CLOSE (quinn-proto 0.11.19,
        // quinn-rs/quinn#2785), and the path may drop it; then the host lets go of the upload
        // only at its idle timeout.
        let a = logged_in(&config, &alice, "phone", SessionMode::SendOnly).await?;
        let quic = a.quic().clone();
        let mut sent = 0;
        let cut = a
            .upload_file(&source, MEDIA, &mut |done, _| {
                sent = done;
                if done >= CUT_UPLOAD {
                    quic.close(0u32.into(), b"cut off");
                }
            })
            .await;
        let error = cut.expect_err("the upload was cut off");
        assert!(error.is_transient(), "a cut-off upload may go on: {error}");
        assert!(
            (CUT_UPLOAD..LARGE as u64).contains(&sent),
            "{sent} bytes sent"
        );
        lap(&mut phases, "upload, cut off");

        // Her device uploads it again: the host asks only for what it lacks.
        let alice_phone = sending_device(&config, &alice, "phone").await?;
        let (mut resumed_at, mut reached) = (None, 0);
        let file = alice_phone
            .upload_file(&source, MEDIA, &mut |done, _| {
                resumed_at.get_or_insert(done);
                reached = done;
            })
            .await?;
        let resumed_at = resumed_at.expect("the host answered Ready");
        eprintln!("the upload was cut off after {sent} bytes; the host went on from {resumed_at}");
        assert!(
            resumed_at > 0 && resumed_at <= sent,
            "the upload went on from what the first one sent, not from {resumed_at}"
        );
        assert_eq!(reached, LARGE as u64);
        let expected = FileRef {
            file: hex(&id),
            name: "film.mkv".into(),
            size: LARGE as u64,
            media_type: MEDIA.into(),
        };
        assert_eq!(file, expected);
        drop(a);
        lap(&mut phases, "upload, resumed");

        // A file message to bob alone.
        let to_bob = alice_phone.submit(
            new_client_id(),
            MessageKind::Custom(FILE_KIND.into()),
            std::slice::from_ref(&bob),
            &file.to_json(),
        );
        let accepted = within("the file message", to_bob).await??;
        let message = next_message(&b).await?;
        assert_eq!(message.id, accepted.id);
        assert_eq!(message.kind, MessageKind::Custom(FILE_KIND.into()));
        assert_eq!(message.to, std::slice::from_ref(&bob));
        let reference = FileRef::from_json(&message.body)?;
        assert_eq!(reference, expected);

        // Bob's first download loses its connection once 20 MiB came: they stay in the
        // `.part`, exactly, and nothing is at `out`.
        let quic = b.quic().clone();
        let mut came = 0;
        let cut = b
            .download_file(&id, &out, &mut |done, _| {
                came = done;
                if done >= CUT_DOWNLOAD {
                    quic.close(0u32.into(), b"cut off");
                }
            })
            .await;
        let error = cut.expect_err("the download was cut off");
        assert!(
            error.is_transient(),
            "a cut-off download may go on: {error}"
        );
        let kept = std::fs::read(part_of(&out))?;
        assert_eq!(kept.len() as u64, came, "the .part holds what came");
        assert!(
            (CUT_DOWNLOAD..LARGE as u64).contains(&came),
            "{came} bytes came"
        );
        assert!(
            kept[..] == bytes[..kept.len()],
            "the .part is the file's start"
        );
        assert!(!out.exists());
        drop((b, kept));
        lap(&mut phases, "download, cut off");

        // His device downloads it again, from there, and checks the whole file's SHA-256.
        let bob_laptop = sending_device(&config, &bob, "laptop").await?;
        let mut resumed_from = None;
        let got = bob_laptop
            .download_file(&id, &out, &mut |done, _| {
                resumed_from.get_or_insert(done);
            })
            .await?;
        eprintln!("the download was cut off after {came} bytes; it went on from {resumed_from:?}");
        assert_eq!(
            resumed_from,
            Some(came),
            "the download went on from the .part"
        );
        let want = DownloadedFile {
            path: out.clone(),
            name: "film.mkv".into(),
            media_type: MEDIA.into(),
            size: LARGE as u64,
        };
        assert_eq!(got, want);
        let whole = std::fs::read(&out)?;
        assert_eq!(hex(&sha256(&whole)), reference.file, "bob has alice's file");
        assert!(whole == bytes, "bob has alice's bytes");
        assert!(!part_of(&out).exists());
        drop(whole);
        lap(&mut phases, "download, resumed");

        // The hash covers what an earlier attempt left too: a `.part` with one wrong byte
        // near its start, completed by the host's last MiB, is refused and deleted.
        let forged = bob_dir.join("forged.mkv");
        let mut tampered = bytes[..LARGE - (1 << 20)].to_vec();
        tampered[1000] ^= 0xff;
        std::fs::write(part_of(&forged), &tampered)?;
        drop(tampered);
        let error = bob_laptop
            .download_file(&id, &forged, &mut |_, _| {})
            .await
            .expect_err("a wrong byte in the .part");
        assert!(matches!(error, ClientError::Corrupt { .. }), "{error:?}");
        assert!(!part_of(&forged).exists() && !forged.exists());
        lap(&mut phases, "a forged .part");

        // Carol was sent nothing: refused the file, as is an id the host does not have,
        // before any byte, and she may not pass the file on.
        let c = logged_in(&config, &carol, "tablet", SessionMode::SendOnly).await?;
        let carol_out = carol_dir.join("film.mkv");
        let mut moved = false;
        let refused = c
            .download_file(&id, &carol_out, &mut |_, _| moved = true)
            .await;
        assert_eq!(code_of(refused)?, ErrorCode::NOT_FOUND);
        let unknown = [0x5a; 32];
        let refused = c
            .download_file(&unknown, &carol_out, &mut |_, _| moved = true)
            .await;
        assert_eq!(code_of(refused)?, ErrorCode::NOT_FOUND);
        let refused = bob_laptop
            .download_file(&unknown, &bob_dir.join("unknown"), &mut |_, _| moved = true)
            .await;
        assert_eq!(code_of(refused)?, ErrorCode::NOT_FOUND);
        assert!(!moved, "a refused download reports no progress");
        assert_eq!(
            std::fs::read_dir(&carol_dir)?.count(),
            0,
            "carol got nothing"
        );
        assert_eq!(
            code_of(send_file_message(&c, &alice, &reference).await)?,
            ErrorCode::NOT_FOUND
        );
        lap(&mut phases, "refusals");
        alice_phone.close().await;
        bob_laptop.close().await;
        anyhow::Ok(())
    })
    .await
    .context("the lossy-path file test did not finish in time")??;

    let (seen, dropped, duplicated, delayed) = path.counts().snapshot();
    eprintln!(
        "{seen} datagrams through the path: {dropped} dropped, {duplicated} duplicated, \
         {delayed} held back; {phases:?}, {:?} in all",
        started.elapsed()
    );
    assert!(
        dropped > 0 && duplicated > 0 && delayed > 0,
        "the path did not impair the traffic"
    );
    Ok(())
}
