//! Transfers over real QUIC streams on loopback, against a scripted host: each test plays the
//! host's side of the file streams (`iim_proto::file`) by hand, including the ways it can cut
//! a transfer off, and checks what the client makes of it.

#![allow(clippy::unwrap_used)]

use super::*;
use sha2::Digest as _;
use std::sync::Arc;

const TIMEOUT: Duration = Duration::from_secs(10);

fn sha(bytes: &[u8]) -> Sha256 {
    sha2::Sha256::digest(bytes).into()
}

/// Some bytes that are not all the same, over more than one chunk.
fn contents(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

/// Both ends of a QUIC connection on loopback.
struct Pair {
    client: quinn::Connection,
    server: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn pair() -> Pair {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = generated.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![iim_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(crate::quic_client_config(&[cert]).unwrap());
    let connecting = client
        .connect(server.local_addr().unwrap(), "localhost")
        .unwrap();
    let accepting = async { server.accept().await.unwrap().await };
    let (client_conn, server_conn) = tokio::join!(connecting, accepting);
    Pair {
        client: client_conn.unwrap(),
        server: server_conn.unwrap(),
        _endpoints: (client, server),
    }
}

/// The host's side of the next file stream, and its request.
async fn accept(server: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream, FileRequest) {
    let (send, mut recv) = server.accept_bi().await.unwrap();
    let mut prefix = [0u8; LENGTH_PREFIX];
    recv.read_exact(&mut prefix).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    recv.read_exact(&mut body).await.unwrap();
    let mut decoder = FrameDecoder::new(MAX_ANSWER);
    decoder.push(&prefix);
    decoder.push(&body);
    (send, recv, decoder.decode().unwrap().unwrap())
}

async fn answer(send: &mut quinn::SendStream, answer: FileAnswer) {
    let bytes = iim_proto::encode_frame(&answer, MAX_ANSWER).unwrap();
    send.write_all(&bytes).await.unwrap();
}

/// A progress callback that records what it is told.
fn recorder(seen: &mut Vec<(u64, u64)>) -> impl FnMut(u64, u64) + Send + '_ {
    |done, size| seen.push((done, size))
}

#[tokio::test]
async fn an_upload_sends_what_the_host_lacks_and_returns_the_reference() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.pdf");
    let bytes = contents(2 * CHUNK + 100);
    std::fs::write(&path, &bytes).unwrap();
    let size = bytes.len() as u64;

    // A host that kept the first 1000 bytes of an upload that was cut off.
    let server = pair.server.clone();
    let host = tokio::spawn(async move {
        let (mut send, mut recv, request) = accept(&server).await;
        let FileRequest::Upload {
            size,
            sha256,
            name,
            media_type,
        } = request
        else {
            panic!("not an upload: {request:?}");
        };
        answer(&mut send, FileAnswer::Ready { offset: 1000 }).await;
        let rest = recv.read_to_end(usize::MAX).await.unwrap();
        answer(&mut send, FileAnswer::Stored { sha256 }).await;
        send.finish().unwrap();
        (size, sha256, name, media_type, rest)
    });
    let mut seen = Vec::new();
    let file = upload(
        &pair.client,
        TIMEOUT,
        &path,
        "application/pdf",
        &mut recorder(&mut seen),
    )
    .await
    .unwrap();
    let (announced, sha256, name, media_type, rest) = host.await.unwrap();
    assert_eq!(
        (announced, sha256, name.as_str(), media_type.as_str()),
        (size, sha(&bytes), "report.pdf", "application/pdf")
    );
    assert_eq!(rest, bytes[1000..]);
    assert_eq!(
        file,
        FileRef {
            file: hex(&sha(&bytes)),
            name: "report.pdf".into(),
            size,
            media_type: "application/pdf".into(),
        }
    );
    assert_eq!(seen.first(), Some(&(1000, size)));
    assert_eq!(seen.last(), Some(&(size, size)));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
}

#[tokio::test]
async fn a_file_the_host_has_is_not_sent_again() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.txt");
    std::fs::write(&path, b"hello").unwrap();
    let server = pair.server.clone();
    let host = tokio::spawn(async move {
        let (mut send, mut recv, request) = accept(&server).await;
        let FileRequest::Upload { sha256, .. } = request else {
            panic!("not an upload");
        };
        answer(&mut send, FileAnswer::Stored { sha256 }).await;
        send.finish().unwrap();
        // Nothing follows the request.
        recv.read_to_end(usize::MAX).await.unwrap()
    });
    let mut seen = Vec::new();
    let file = upload(&pair.client, TIMEOUT, &path, "", &mut recorder(&mut seen))
        .await
        .unwrap();
    assert_eq!(file.size, 5);
    assert_eq!(seen, [(5, 5)]);
    assert!(host.await.unwrap().is_empty());
}

#[tokio::test]
async fn a_refusal_while_the_bytes_go_is_the_error_with_its_code() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    // Larger than the stream's flow-control window: the client is still sending.
    std::fs::write(&path, contents(16 * 1024 * 1024)).unwrap();
    let server = pair.server.clone();
    tokio::spawn(async move {
        let (mut send, mut recv, _) = accept(&server).await;
        answer(&mut send, FileAnswer::Ready { offset: 0 }).await;
        let mut got = 0;
        while got < 100_000 {
            got += recv
                .read_chunk(CHUNK, true)
                .await
                .unwrap()
                .unwrap()
                .bytes
                .len();
        }
        recv.stop(0u32.into()).unwrap();
        let refused = FileAnswer::Refused {
            code: ErrorCode::BODY_TOO_LARGE,
            message: "over your quota".into(),
        };
        answer(&mut send, refused).await;
        send.finish().unwrap();
        // Kept until the client has read the answer.
        server.closed().await;
    });
    let e = upload(&pair.client, TIMEOUT, &path, "", &mut |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { code, message }
            if *code == ErrorCode::BODY_TOO_LARGE && message == "over your quota"),
        "{e:?}"
    );
    assert!(!e.is_transient());
}

#[tokio::test]
async fn an_upload_cut_off_by_a_lost_connection_is_worth_another_try() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    std::fs::write(&path, contents(16 * 1024 * 1024)).unwrap();
    let server = pair.server.clone();
    tokio::spawn(async move {
        let (mut send, mut recv, _) = accept(&server).await;
        answer(&mut send, FileAnswer::Ready { offset: 0 }).await;
        recv.read_chunk(CHUNK, true).await.unwrap();
        server.close(0u32.into(), b"gone");
    });
    let e = upload(&pair.client, TIMEOUT, &path, "", &mut |_, _| {})
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
}

#[tokio::test]
async fn a_name_the_protocol_refuses_is_not_sent() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a\nb");
    std::fs::write(&path, b"x").unwrap();
    let e = upload(&pair.client, TIMEOUT, &path, "", &mut |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::File { .. }), "{e:?}");
    let e = upload(
        &pair.client,
        TIMEOUT,
        &dir.path().join("missing"),
        "",
        &mut |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ClientError::File { .. }), "{e:?}");
}

/// A host that serves `bytes` (named `report.pdf`) from the offset each request asks for,
/// once per request in `plan`: `Some(n)` cuts the stream off (a reset) after `n` bytes, once
/// `got` says the client has them (a reset drops what is still on its way).
fn serve_downloads(
    server: quinn::Connection,
    bytes: Vec<u8>,
    plan: Vec<Option<usize>>,
    got: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut offsets = Vec::new();
        for cut in plan {
            let (mut send, _recv, request) = accept(&server).await;
            let FileRequest::Download { sha256, offset } = request else {
                panic!("not a download: {request:?}");
            };
            assert_eq!(sha256, sha(&bytes));
            offsets.push(offset);
            if offset > bytes.len() as u64 {
                let refused = FileAnswer::Refused {
                    code: ErrorCode::INVALID_ARGUMENT,
                    message: "offset past the end".into(),
                };
                answer(&mut send, refused).await;
                send.finish().unwrap();
                continue;
            }
            let sending = FileAnswer::Sending {
                size: bytes.len() as u64,
                offset,
                name: "report.pdf".into(),
                media_type: "application/pdf".into(),
            };
            answer(&mut send, sending).await;
            let rest = &bytes[offset as usize..];
            match cut {
                None => {
                    send.write_all(rest).await.unwrap();
                    send.finish().unwrap();
                    // Kept until the client has read it all.
                    let _ = send.stopped().await;
                }
                Some(n) => {
                    send.write_all(&rest[..n.min(rest.len())]).await.unwrap();
                    got.notified().await;
                    send.reset(ErrorCode::INTERNAL.0.into()).unwrap();
                }
            }
        }
        offsets
    })
}

#[tokio::test]
async fn a_download_cut_off_goes_on_from_its_part_file() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("saved.pdf");
    let bytes = contents(3 * CHUNK + 7);
    let size = bytes.len() as u64;
    let id = sha(&bytes);
    let got = Arc::new(tokio::sync::Notify::new());
    let plan = vec![Some(500_000), None];
    let host = serve_downloads(pair.server.clone(), bytes.clone(), plan, got.clone());

    let e = download(
        &pair.client,
        TIMEOUT,
        &id,
        Destination::File(&out),
        &mut |done, _| {
            if done == 500_000 {
                got.notify_one();
            }
        },
    )
    .await
    .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    let kept = std::fs::metadata(part_path(&out)).unwrap().len();
    assert_eq!(kept, 500_000);
    assert_eq!(
        std::fs::read(part_path(&out)).unwrap(),
        bytes[..kept as usize]
    );

    let mut seen = Vec::new();
    let file = download(
        &pair.client,
        TIMEOUT,
        &id,
        Destination::File(&out),
        &mut recorder(&mut seen),
    )
    .await
    .unwrap();
    assert_eq!(host.await.unwrap(), [0, kept]);
    assert_eq!(
        file,
        DownloadedFile {
            path: out.clone(),
            name: "report.pdf".into(),
            media_type: "application/pdf".into(),
            size,
        }
    );
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    assert!(!part_path(&out).exists());
    assert_eq!(seen.first(), Some(&(kept, size)));
    assert_eq!(seen.last(), Some(&(size, size)));
}

#[tokio::test]
async fn a_download_into_a_directory_takes_the_uploaders_name() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = contents(1000);
    let id = sha(&bytes);
    let host = serve_downloads(
        pair.server.clone(),
        bytes.clone(),
        vec![None],
        Arc::default(),
    );
    let file = download(
        &pair.client,
        TIMEOUT,
        &id,
        Destination::Directory(dir.path()),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    host.await.unwrap();
    assert_eq!(file.path, dir.path().join("report.pdf"));
    assert_eq!(std::fs::read(&file.path).unwrap(), bytes);
    assert!(!Destination::Directory(dir.path()).part(&id).exists());
}

#[tokio::test]
async fn a_part_file_of_another_file_is_started_over() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let bytes = contents(1000);
    // Longer than the file: the host refuses to go on from its end.
    std::fs::write(part_path(&out), vec![9u8; 1500]).unwrap();
    let plan = vec![None, None];
    let host = serve_downloads(pair.server.clone(), bytes.clone(), plan, Arc::default());
    download(
        &pair.client,
        TIMEOUT,
        &sha(&bytes),
        Destination::File(&out),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(host.await.unwrap(), [1500, 0]);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

#[tokio::test]
async fn bytes_that_are_not_the_file_fail_the_download_and_are_deleted() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let bytes = contents(1000);
    let mut wrong = bytes.clone();
    wrong[500] ^= 1;
    // The host sends the wrong bytes under the id of the right ones.
    let id = sha(&bytes);
    let server = pair.server.clone();
    tokio::spawn(async move {
        let (mut send, _recv, _) = accept(&server).await;
        let sending = FileAnswer::Sending {
            size: 1000,
            offset: 0,
            name: "f".into(),
            media_type: String::new(),
        };
        answer(&mut send, sending).await;
        send.write_all(&wrong).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
    });
    let e = download(
        &pair.client,
        TIMEOUT,
        &id,
        Destination::File(&out),
        &mut |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ClientError::Corrupt { file, .. } if *file == hex(&id)),
        "{e:?}"
    );
    assert!(!out.exists() && !part_path(&out).exists());
}

#[tokio::test]
async fn a_file_that_is_not_there_is_refused_with_its_code() {
    let pair = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f");
    let server = pair.server.clone();
    tokio::spawn(async move {
        let (mut send, _recv, _) = accept(&server).await;
        let refused = FileAnswer::Refused {
            code: ErrorCode::NOT_FOUND,
            message: "no file that you may read".into(),
        };
        answer(&mut send, refused).await;
        send.finish().unwrap();
        let _ = send.stopped().await;
    });
    let e = download(
        &pair.client,
        TIMEOUT,
        &[1; 32],
        Destination::File(&out),
        &mut |_, _| {},
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NOT_FOUND));
    assert!(!e.is_transient());
    assert!(!out.exists());
}
