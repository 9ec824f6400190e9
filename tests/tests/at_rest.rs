//! Encryption at rest (docs/security.md), against the real `iim-host` binary: what a copy of
//! a data directory shows with and without its key file, a store kept in the clear encrypted
//! when encryption is turned on, and a key rotation under traffic.

use anyhow::{Context as _, ensure};
use iim_client::proto::body::{FILE_KIND, FileRef, PUSH_KIND, PushReply, PushRequest};
use iim_client::proto::{MessageKind, SessionMode, UserId};
use iim_client::{Device, Update, new_client_id};
use iim_e2e::gateway::Gateway;
use iim_e2e::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

type Result<T = ()> = anyhow::Result<T>;

/// In every message body of these tests.
const BODY_MARK: &str = "QZX-body-for-bob";
/// In the push token a plugin stores (a plugin value).
const TOKEN_MARK: &str = "QZX-push-token-of-bobs-phone";
/// In the content of the file sent.
const FILE_MARK: &str = "QZX-file-content";
/// In the name of the file sent.
const NAME_MARK: &str = "QZX-file-name";

/// A host with the chat plugin and the push plugin (which keeps each device's push token in
/// its storage), posting to `gateway`.
fn push_host(gateway: &Gateway) -> Result<HostProcess> {
    let toml = gateway.push_config();
    let (chat, push) = (default_plugin("chat")?, default_plugin("push")?);
    HostProcess::start_with(
        "",
        Plugins::Configured(&[("chat", &chat, ""), ("push", &push, &toml)]),
    )
}

/// Registers `phone` for push with [`TOKEN_MARK`] and waits for the plugin's answer.
async fn register_for_push(phone: &Device, user: &UserId) -> Result {
    let kind = MessageKind::Custom(PUSH_KIND.into());
    let body = PushRequest::Register {
        token: TOKEN_MARK.into(),
        always: false,
    }
    .to_json();
    phone
        .submit(
            new_client_id(),
            kind.clone(),
            std::slice::from_ref(user),
            &body,
        )
        .await?;
    loop {
        let update = within("the push plugin's answer", phone.next())
            .await?
            .context("the device ended")??;
        if let Update::Message { seq, message } = update {
            phone.ack(seq);
            if message.kind == kind {
                let reply = PushReply::from_json(&message.body)?;
                ensure!(matches!(reply, PushReply::Registered { .. }), "{reply:?}");
                return Ok(());
            }
        }
    }
}

/// A file of about 300 KiB whose content repeats [`FILE_MARK`], named after [`NAME_MARK`].
fn marked_file(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join(format!("{NAME_MARK}.txt"));
    let bytes: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("{FILE_MARK} {i:05}\n").into_bytes())
        .collect();
    std::fs::write(&path, &bytes)?;
    Ok((path, bytes))
}

/// What [`send_to`] sent: the file, its bytes, the texts, and the last text's id.
struct Sent {
    file: FileRef,
    content: Vec<u8>,
    texts: Vec<String>,
    last_id: u64,
}

/// `laptop` uploads a [`marked_file`] (written in `scratch`), sends it to `bob`, then `n` chat
/// messages marked [`BODY_MARK`].
async fn send_to(laptop: &Device, bob: &UserId, scratch: &Path, n: usize) -> Result<Sent> {
    let (path, content) = marked_file(scratch)?;
    let file = laptop
        .upload_file(&path, "text/plain", &mut |_, _| {})
        .await?;
    laptop
        .submit(
            new_client_id(),
            MessageKind::Custom(FILE_KIND.into()),
            std::slice::from_ref(bob),
            &file.to_json(),
        )
        .await?;
    let (mut texts, mut last_id) = (Vec::new(), 0);
    for i in 0..n {
        let text = format!("{BODY_MARK} {i}");
        let accepted = laptop
            .submit(
                new_client_id(),
                MessageKind::Chat,
                std::slice::from_ref(bob),
                text.as_bytes(),
            )
            .await?;
        last_id = accepted.id.0;
        texts.push(text);
    }
    Ok(Sent {
        file,
        content,
        texts,
        last_id,
    })
}

/// The texts of the chat messages among `messages`, in order.
fn chat_texts(messages: &[iim_client::proto::Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.kind == MessageKind::Chat)
        .map(text)
        .collect()
}

/// Every file under `dir` that holds one of `marks`, by mark.
fn leaks(dir: &Path, marks: &[&str]) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut found = BTreeMap::new();
    for mark in marks {
        let files = files_containing(dir, mark.as_bytes())?;
        if !files.is_empty() {
            found.insert((*mark).to_owned(), files);
        }
    }
    Ok(found)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            files.extend(snapshot(&entry.path())?);
        } else if entry.file_type()?.is_file() {
            files.insert(entry.path(), std::fs::read(entry.path())?);
        }
    }
    Ok(files)
}

/// A key file with one key of its own: valid, but not the store's.
fn other_key_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("other.key");
    let key: String = (0..32)
        .map(|i| format!("{:02x}", (i * 37 + 11) as u8))
        .collect();
    std::fs::write(
        &path,
        format!("current = 1\n\n[[keys]]\nid = 1\nkey = \"{key}\"\ncreated_at = 0\n"),
    )?;
    Ok(path)
}

/// Stops `host` cleanly (its store flushed) and waits for it.
async fn stop(host: &mut HostProcess) -> Result {
    host.terminate()?;
    let status = within("the host's exit", host.wait()).await??;
    ensure!(status.success(), "the host exited with {status}");
    Ok(())
}

/// What a thief of the disk gets: nothing. Bob's messages, a file sent to him and his push
/// token are written by a real host; then its data directory is scanned for them, copied, and
/// the copy started without its key file (refused, unchanged), with another key file
/// (refused, unchanged) and with its own (bob reads everything, the file too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_data_directory_reveals_nothing_without_its_key_and_everything_with_it() -> Result
{
    let gateway = Gateway::start(false).await?;
    let mut host = push_host(&gateway)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let phone = host.device(&bob, "phone", SessionMode::Receive).await?;
    register_for_push(&phone, &bob).await?;
    phone.close().await;

    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    let scratch = tempfile::tempdir()?;
    let sent = send_to(&laptop, &bob, scratch.path(), 20).await?;
    // Bob's phone was told of what waits (the push plugin handled the waiting notices).
    gateway.wait_for(1, Duration::from_secs(20)).await?;
    laptop.close().await;
    stop(&mut host).await?;

    let marks = [BODY_MARK, TOKEN_MARK, FILE_MARK, NAME_MARK];
    let found = leaks(host.data_dir(), &marks)?;
    ensure!(
        found.is_empty(),
        "in the clear in the data directory: {found:#?}"
    );

    // Without its key file, or with another one: refused, and nothing changes.
    let copy = tempfile::tempdir()?;
    copy_dir(host.data_dir(), copy.path())?;
    let before = snapshot(copy.path())?;
    let keys = tempfile::tempdir()?;
    let missing = refused_to_start_on(copy.path(), &keys.path().join("none.key"))?;
    ensure!(
        missing.contains("is encrypted and its data key file") && missing.contains("missing"),
        "{missing}"
    );
    let wrong = refused_to_start_on(copy.path(), &other_key_file(keys.path())?)?;
    ensure!(wrong.contains("does not open this store"), "{wrong}");
    ensure!(
        snapshot(copy.path())? == before,
        "a refused start changed the data directory"
    );
    ensure!(
        !keys.path().join("none.key").exists(),
        "no key file is made for an encrypted store"
    );

    // With it: everything is there.
    let copied = HostProcess::start_on(copy, Some(&host.key_file()))?;
    let (conn, backlog) = copied.online(&bob, "phone").await?;
    let texts = chat_texts(&backlog);
    assert_eq!(texts, sent.texts);
    let file_message = backlog
        .iter()
        .find(|m| m.kind == MessageKind::Custom(FILE_KIND.into()))
        .context("the file message")?;
    let got = FileRef::from_json(&file_message.body)?;
    assert_eq!(got, sent.file);
    let out = scratch.path().join("downloaded");
    conn.download_file(&got.sha256().context("a file id")?, &out, &mut |_, _| {})
        .await?;
    ensure!(
        std::fs::read(&out)? == sent.content,
        "the file came back changed"
    );
    Ok(())
}

/// A host that kept its store in the clear (`storage.encrypt = false`) encrypts it the first
/// time it starts with encryption on: nothing is left in the clear, nothing is lost, message
/// ids go on above the old ones, and the store no longer opens with encryption off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_kept_in_the_clear_is_encrypted_when_encryption_is_turned_on() -> Result {
    let clear = "[storage]\nencrypt = false\n";
    let mut host = HostProcess::start_chat_only_with_config(clear)?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    let scratch = tempfile::tempdir()?;
    let sent = send_to(&laptop, &bob, scratch.path(), 50).await?;
    laptop.close().await;
    stop(&mut host).await?;
    // The scan finds what is in the clear: it can fail.
    let found = leaks(host.data_dir(), &[BODY_MARK, FILE_MARK])?;
    ensure!(found.len() == 2, "in the clear, both are found: {found:#?}");
    ensure!(
        !host.key_file().exists(),
        "no key file while encryption is off"
    );

    host.rewrite_config("")?;
    host.restart()?;
    ensure!(host.key_file().exists(), "a key file is made");
    ensure!(
        host.log().contains("encrypting a store kept in the clear"),
        "{}",
        host.log()
    );
    let (conn, backlog) = host.online(&bob, "phone").await?;
    let texts = chat_texts(&backlog);
    assert_eq!(texts, sent.texts);
    ensure!(
        backlog[0].kind == MessageKind::Custom(FILE_KIND.into()),
        "the file message first: {:?}",
        backlog[0]
    );
    let out = scratch.path().join("downloaded");
    conn.download_file(
        &sent.file.sha256().context("a file id")?,
        &out,
        &mut |_, _| {},
    )
    .await?;
    ensure!(
        std::fs::read(&out)? == sent.content,
        "the file came back changed"
    );
    let laptop = host.device(&alice, "laptop", SessionMode::SendOnly).await?;
    let next = laptop
        .submit(
            new_client_id(),
            MessageKind::Chat,
            std::slice::from_ref(&bob),
            b"after",
        )
        .await?;
    ensure!(
        next.id.0 > sent.last_id,
        "ids go on: {} after {}",
        next.id.0,
        sent.last_id
    );
    laptop.close().await;
    conn.close().await;
    stop(&mut host).await?;
    let found = leaks(host.data_dir(), &[BODY_MARK, FILE_MARK, NAME_MARK])?;
    ensure!(found.is_empty(), "left in the clear: {found:#?}");

    host.rewrite_config(clear)?;
    let refused = refused_to_start_on(host.data_dir(), &host.key_file())?;
    ensure!(
        refused.contains("the store is encrypted and storage.encrypt is off"),
        "{refused}"
    );
    Ok(())
}

/// `admin rotate-key` while Alice sends Bob messages without pause: every message arrives once,
/// in order; what the old key sealed (a backlog waiting for Carol, a file) is re-encrypted, so
/// that after the re-encryption the old key can leave the key file and everything still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_under_traffic_loses_nothing_and_the_old_key_is_then_not_needed() -> Result {
    let TwoUsers {
        mut host,
        alice,
        bob,
        a,
        b,
    } = TwoUsers::start().await?;
    let carol = host.register("carol").await?;
    let scratch = tempfile::tempdir()?;
    let (path, content) = marked_file(scratch.path())?;
    let file = a.upload_file(&path, "text/plain", &mut |_, _| {}).await?;
    let mut sent = Vec::new();
    for i in 0..300 {
        let text = format!("{BODY_MARK} {i}");
        a.submit(
            new_client_id(),
            MessageKind::Chat,
            std::slice::from_ref(&carol),
            text.as_bytes(),
        )
        .await?;
        sent.push(text);
    }
    let status = under_load((a, b, bob), MessageKind::Chat, async {
        let reply = host.admin("rotate-key").await?;
        ensure!(reply.contains("data key 2 of"), "{reply}");
        within("the re-encryption", async {
            loop {
                let status = host.admin("key-status").await?;
                if status.contains("reencryption done") {
                    return anyhow::Ok(status);
                }
                ensure!(!status.contains("reencryption failed"), "{status}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await?
    })
    .await??;
    ensure!(
        status.contains("current 2\n") && status.contains("in_use 2\n"),
        "{status}"
    );

    stop(&mut host).await?;
    keep_only_key(&host.key_file(), 2)?;
    host.restart()?;
    let (conn, backlog) = host.online(&carol, "phone").await?;
    assert_eq!(backlog.iter().map(text).collect::<Vec<_>>(), sent);
    let out = scratch.path().join("downloaded");
    // Alice uploaded it: she may read it.
    let (alice_conn, _) = host.online(&alice, "tablet").await?;
    alice_conn
        .download_file(&file.sha256().context("a file id")?, &out, &mut |_, _| {})
        .await?;
    ensure!(
        std::fs::read(&out)? == content,
        "the file came back changed"
    );
    conn.close().await;
    Ok(())
}
