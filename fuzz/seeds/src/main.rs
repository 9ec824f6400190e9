//! Writes the seed corpus of the fuzz targets, `fuzz/corpus/<target>/seed-*`, from the
//! protocol's own encoders (frames as `docs/protocol.md` shows them) and the configuration
//! files the documentation shows:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml -p iim-fuzz-seeds
//! ```
//!
//! A seed starts with the header its target reads (`fuzz_targets/*.rs`): for the frame
//! targets, a byte choosing the frame type and limits and a byte choosing the chunking. What
//! the fuzzer found and kept (its corpus files are named by their SHA-1) is left alone.
//! `e2e_bodies`' seeds are sealed with the identities in `fuzz/keys/`, made the first time.
//! `plugin_imports` has no seeds here: its input is the `Arbitrary` form of its arguments,
//! which only the fuzzer writes well.

use iim_proto::file::{FileAnswer, FileRequest};
use iim_proto::peer::{Envelope, ExchangeFrame, FilePart, HostFrame, RelayRow, ServerInfo};
use iim_proto::*;
use serde::Serialize;
use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let mut seeds = Seeds::default();
    client_frames(&mut seeds);
    seeds.write(&corpus.join("client_frames"))?;
    let mut seeds = Seeds::default();
    peer_frames(&mut seeds);
    seeds.write(&corpus.join("peer_frames"))?;
    let mut seeds = Seeds::default();
    for (name, text) in CONFIGS {
        seeds.add(name, text.as_bytes().to_vec());
    }
    seeds.write(&corpus.join("config"))?;
    let mut seeds = Seeds::default();
    e2e_bodies(&mut seeds, &corpus.join("../keys"))?;
    seeds.write(&corpus.join("e2e_bodies"))?;
    Ok(())
}

/// The identity of `user`'s `device` kept in `dir` (made and written the first time): the
/// `e2e_bodies` target opens envelopes with the same ones.
fn identity(dir: &Path, user: &str, device: &str) -> std::io::Result<iim_e2ee::DeviceIdentity> {
    let path = dir.join(format!("{user}-{device}.identity"));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(iim_e2ee::DeviceIdentity::from_bytes(&bytes).expect("a kept identity loads"));
    }
    let made =
        iim_e2ee::DeviceIdentity::generate(user, device, 1_700_000_000_000).expect("an identity");
    std::fs::create_dir_all(dir)?;
    std::fs::write(&path, made.to_bytes().expect("an identity saves"))?;
    Ok(made)
}

/// `e2e_bodies`: header byte 0 even (every parser) or odd (bob's phone opens a 1:1 envelope
/// from alice's phone): envelopes, a card, group messages (a welcome, a commit, an
/// application message).
fn e2e_bodies(seeds: &mut Seeds, keys: &Path) -> std::io::Result<()> {
    const PARSE: u8 = 0;
    const OPEN: u8 = 1;
    let alice = identity(keys, "alice", "phone")?;
    let bob = identity(keys, "bob", "phone")?;
    let cards = [alice.card().expect("a card"), bob.card().expect("a card")];
    let with = |kind: u8, body: &[u8]| [&[kind][..], body].concat();
    for (name, text) in [("short", &b"hi"[..]), ("long", &[b'x'; 600][..])] {
        let sealed = iim_e2ee::seal(&alice, &["bob".to_owned()], &cards, text)
            .expect("a seed envelope seals");
        seeds.add(&format!("direct-{name}"), with(OPEN, &sealed));
        seeds.add(&format!("direct-{name}-parsed"), with(PARSE, &sealed));
    }
    seeds.add("card", with(PARSE, &cards[0].to_bytes().expect("a card")));
    let mut creator = iim_e2ee::Device::new(alice);
    let mut member = iim_e2ee::Device::new(bob);
    let package = member.key_packages(1).expect("a key package").remove(0);
    creator.create_group("team").expect("a group");
    let (commit, welcome) = creator
        .add("team", &[(cards[1].clone(), package)])
        .expect("bob added");
    let hello = creator.encrypt("team", b"hello").expect("encrypted");
    for (name, body) in [
        ("welcome", welcome),
        ("commit", commit),
        ("application", hello),
    ] {
        seeds.add(&format!("group-{name}"), with(PARSE, &body));
    }
    Ok(())
}

/// Named seeds, written as `seed-<name>`.
#[derive(Default)]
struct Seeds(Vec<(String, Vec<u8>)>);

impl Seeds {
    fn add(&mut self, name: &str, bytes: Vec<u8>) {
        self.0.push((name.to_owned(), bytes));
    }

    /// A stream of `frames` behind the header `[kind, chunking]`.
    fn stream<T: Serialize>(&mut self, name: &str, kind: u8, chunking: u8, frames: &[T]) {
        let mut bytes = vec![kind, chunking];
        for frame in frames {
            bytes.extend(encode_frame(frame, 1 << 24).expect("a seed frame encodes"));
        }
        self.add(name, bytes);
    }

    fn write(self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, bytes) in self.0 {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        Ok(())
    }
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("a valid name")
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).expect("a valid name")
}

fn group(name: &str) -> Address {
    Address::Group(GroupId::new(name).expect("a valid name"))
}

fn message(id: u64, kind: MessageKind, to: Vec<Address>, body: &[u8]) -> Message {
    Message {
        id: MessageId(id),
        kind,
        from: user("alice"),
        from_device: device("phone"),
        to,
        body: body.to_vec(),
        sent_at: 1_700_000_000_000,
    }
}

/// `client_frames`: header byte 0 chooses `ClientFrame`, `ServerFrame`, `FileRequest`,
/// `FileAnswer` (its low two bits) and the limit (the next two: the default, 1024, 100, 8).
fn client_frames(seeds: &mut Seeds) {
    const CLIENT: u8 = 0;
    const SERVER: u8 = 1;
    const FILE_REQUEST: u8 = 2;
    const FILE_ANSWER: u8 = 3;
    const LIMIT_100: u8 = 2 << 2;

    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        agent: "cli".into(),
    };
    let login = ClientFrame::Login {
        req: 1,
        user: user("alice"),
        password: "correct horse".into(),
        device: device("phone"),
        mode: SessionMode::Receive,
    };
    let submit = ClientFrame::Submit {
        req: 7,
        client_id: 300,
        kind: MessageKind::Chat,
        to: vec![user("bob").into()],
        body: b"hi".to_vec(),
    };
    let client = [
        ("hello", hello.clone()),
        (
            "register",
            ClientFrame::Register {
                req: 1,
                user: user("alice"),
                password: "pw".into(),
            },
        ),
        ("login", login.clone()),
        (
            "authenticate",
            ClientFrame::Authenticate {
                req: 2,
                user: user("alice"),
                device: device("tablet"),
                token: "0123456789abcdef".into(),
                mode: SessionMode::Paged,
            },
        ),
        ("logout", ClientFrame::Logout { req: 3 }),
        (
            "relation",
            ClientFrame::Relation {
                req: 4,
                kind: RelationKind::Friend,
                op: RelationOp::Add(user("bob")),
            },
        ),
        ("submit", submit.clone()),
        (
            "submit-group",
            ClientFrame::Submit {
                req: 8,
                client_id: 301,
                kind: MessageKind::Custom(GROUP_KIND.into()),
                to: vec![group("team")],
                body: br#"{"op":"create"}"#.to_vec(),
            },
        ),
        ("ack", ClientFrame::Ack { seq: 1 << 40 }),
        ("fetch", ClientFrame::Fetch { req: 9, max: 50 }),
        (
            "submit-expiring",
            ClientFrame::SubmitExpiring {
                req: 10,
                client_id: 302,
                kind: MessageKind::Presence,
                to: vec![user("bob").into(), user("carol").into()],
                body: Vec::new(),
                ttl_secs: 60,
            },
        ),
    ];
    for (name, frame) in &client {
        seeds.stream(
            &format!("client-{name}"),
            CLIENT,
            0,
            std::slice::from_ref(frame),
        );
    }
    let session = [hello, login, submit.clone(), ClientFrame::Ack { seq: 1 }];
    seeds.stream("client-session", CLIENT, 7, &session);
    seeds.stream("client-session-limit-100", CLIENT | LIMIT_100, 3, &session);

    let deliver = ServerFrame::Deliver {
        seq: 3,
        message: message(
            5,
            MessageKind::Chat,
            vec![user("bob").into()],
            "hé".as_bytes(),
        ),
    };
    let server = [
        (
            "welcome",
            ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame: DEFAULT_MAX_FRAME,
                max_body: DEFAULT_MAX_BODY,
                server: "h1".into(),
            },
        ),
        ("ok", ServerFrame::Ok { req: 1 }),
        (
            "logged-in",
            ServerFrame::LoggedIn {
                req: 1,
                token: "0123456789abcdef".into(),
            },
        ),
        (
            "users",
            ServerFrame::Users {
                req: 4,
                users: vec![user("bob"), user("carol")],
            },
        ),
        (
            "accepted",
            ServerFrame::Accepted {
                req: 7,
                client_id: 300,
                id: MessageId(5),
                sent_at: 1_700_000_000_000,
            },
        ),
        ("deliver", deliver.clone()),
        (
            "deliver-group",
            ServerFrame::Deliver {
                seq: 4,
                message: message(
                    6,
                    MessageKind::Custom("poll".into()),
                    vec![group("team")],
                    &[0, 1, 2],
                ),
            },
        ),
        ("synced", ServerFrame::Synced { count: 2 }),
        (
            "error",
            ServerFrame::error(Some(7), ErrorCode::UNKNOWN_USER, "no"),
        ),
        (
            "backlog",
            ServerFrame::Backlog {
                count: 2,
                bytes: 11,
                ids: vec![MessageId(8), MessageId(9)],
            },
        ),
        (
            "page",
            ServerFrame::Page {
                req: 6,
                count: 2,
                remaining: 0,
            },
        ),
        (
            "redirect",
            ServerFrame::Redirect {
                req: 1,
                server: "h2".into(),
                addr: "127.0.0.1:7448".into(),
            },
        ),
    ];
    for (name, frame) in &server {
        seeds.stream(
            &format!("server-{name}"),
            SERVER,
            0,
            std::slice::from_ref(frame),
        );
    }
    let frames: Vec<ServerFrame> = server.iter().map(|(_, frame)| frame.clone()).collect();
    seeds.stream("server-all", SERVER, 11, &frames);

    let sha256 = [0xab; 32];
    let upload = FileRequest::Upload {
        size: 5,
        sha256,
        name: "notes.txt".into(),
        media_type: "text/plain".into(),
    };
    seeds.stream(
        "file-upload",
        FILE_REQUEST,
        0,
        std::slice::from_ref(&upload),
    );
    // An upload's request and the first bytes of the file behind it, in the same read.
    let mut with_bytes = vec![FILE_REQUEST, 5];
    with_bytes.extend(encode_frame(&upload, DEFAULT_MAX_FRAME).expect("encodes"));
    with_bytes.extend(b"hello");
    seeds.add("file-upload-and-bytes", with_bytes);
    seeds.stream(
        "file-download",
        FILE_REQUEST,
        0,
        &[FileRequest::Download {
            sha256,
            offset: 4096,
        }],
    );
    let answers = [
        FileAnswer::Ready { offset: 0 },
        FileAnswer::Stored { sha256 },
        FileAnswer::Sending {
            size: 5,
            offset: 0,
            name: "notes.txt".into(),
            media_type: "text/plain".into(),
        },
        FileAnswer::Refused {
            code: ErrorCode::NOT_FOUND,
            message: "no such file".into(),
        },
    ];
    seeds.stream("file-answers", FILE_ANSWER, 2, &answers);
}

/// `peer_frames`: header byte 0 chooses `HostFrame` or `ExchangeFrame` (its low bit) and the
/// limits (the next two: the link's, 1024, 64 then 4096, 8).
fn peer_frames(seeds: &mut Seeds) {
    const HOST: u8 = 0;
    const EXCHANGE: u8 = 1;

    let envelope = Envelope {
        message: message(
            (1 << peer::ID_BITS) + 5,
            MessageKind::Chat,
            vec![user("bob").into(), user("dave").into()],
            b"hi",
        ),
        expires_at: Some(1_700_000_060_000),
        rows: vec![
            RelayRow {
                server: "h2".into(),
                users: vec![user("bob").into()],
            },
            RelayRow {
                server: "h3".into(),
                users: vec![user("dave").into()],
            },
        ],
    };
    let join = HostFrame::Join {
        version: peer::PEER_VERSION,
        server: "h1".into(),
        addr: "127.0.0.1:7447".into(),
        secret: "a long shared secret".into(),
        credential: "0123456789abcdef".into(),
        directory_since: 0,
        relayed_in: 0,
    };
    let part = FilePart::Data {
        size: 5,
        name: "notes.txt".into(),
        media_type: "text/plain".into(),
        offset: 0,
        bytes: b"hello".to_vec(),
    };
    let host = [
        ("join", join.clone()),
        (
            "claim",
            HostFrame::Claim {
                req: 1,
                user: user("alice").into(),
            },
        ),
        (
            "lookup",
            HostFrame::Lookup {
                req: 2,
                users: vec![user("dave").into(), group("team")],
            },
        ),
        (
            "relay",
            HostFrame::Relay {
                seq: 1,
                envelope: envelope.clone(),
            },
        ),
        ("ack", HostFrame::Ack { seq: 3 }),
        (
            "presence",
            HostFrame::Presence {
                entries: vec![(user("alice"), 2), (user("bob"), 0)],
            },
        ),
        (
            "file-get",
            HostFrame::FileGet {
                req: 3,
                server: "h2".into(),
                sha256: [0xab; 32],
                offset: 0,
            },
        ),
        (
            "file-part",
            HostFrame::FilePart {
                req: 4,
                to: "h2".into(),
                part: part.clone(),
            },
        ),
    ];
    for (name, frame) in &host {
        seeds.stream(
            &format!("host-{name}"),
            HOST,
            0,
            std::slice::from_ref(frame),
        );
    }
    let link: Vec<HostFrame> = host.iter().map(|(_, frame)| frame.clone()).collect();
    seeds.stream("host-link", HOST, 9, &link);

    let servers = vec![
        ServerInfo {
            id: "h1".into(),
            number: 1,
            addr: "127.0.0.1:7447".into(),
            up: true,
        },
        ServerInfo {
            id: "h2".into(),
            number: 2,
            addr: "127.0.0.1:7448".into(),
            up: false,
        },
    ];
    let exchange = [
        (
            "joined",
            ExchangeFrame::Joined {
                number: 1,
                servers: servers.clone(),
                relayed_out: 0,
            },
        ),
        (
            "directory",
            ExchangeFrame::Directory {
                version: 2,
                entries: vec![
                    (user("bob").into(), "h2".into()),
                    (group("team"), "h1".into()),
                ],
            },
        ),
        ("servers", ExchangeFrame::Servers { servers }),
        (
            "claimed",
            ExchangeFrame::Claimed {
                req: 1,
                home: "h1".into(),
            },
        ),
        (
            "found",
            ExchangeFrame::Found {
                req: 2,
                homes: vec![(user("dave").into(), "h3".into())],
            },
        ),
        ("relay", ExchangeFrame::Relay { seq: 1, envelope }),
        ("ack", ExchangeFrame::Ack { seq: 1 }),
        (
            "presence",
            ExchangeFrame::Presence {
                entries: vec![(user("dave"), 1)],
            },
        ),
        (
            "error",
            ExchangeFrame::Error {
                code: ErrorCode::NOT_AUTHENTICATED,
                message: "wrong secret".into(),
            },
        ),
        (
            "file-get",
            ExchangeFrame::FileGet {
                req: 3,
                by: "h2".into(),
                sha256: [0xab; 32],
                offset: 0,
            },
        ),
        ("file-part", ExchangeFrame::FilePart { req: 3, part }),
        (
            "file-refused",
            ExchangeFrame::FilePart {
                req: 5,
                part: FilePart::Refused {
                    code: ErrorCode::NOT_FOUND,
                    message: "no such file".into(),
                },
            },
        ),
    ];
    for (name, frame) in &exchange {
        seeds.stream(
            &format!("exchange-{name}"),
            EXCHANGE,
            0,
            std::slice::from_ref(frame),
        );
    }
    let link: Vec<ExchangeFrame> = exchange.iter().map(|(_, frame)| frame.clone()).collect();
    seeds.stream("exchange-link", EXCHANGE, 4, &link);
}

/// `config`: a host's configuration files as the documentation shows them, and a plugin's.
const CONFIGS: &[(&str, &str)] = &[
    ("empty", ""),
    (
        "host",
        r#"listen = "127.0.0.1:7447"
data_dir = "iim-data"
server_id = "h1"

[tls]
names = ["chat.example.com"]

[limits]
max_frame = 65536
max_body = 32768
max_hashing = 2
hashing_queue = 0
retransmit_initial_ms = 2000
retransmit_max_ms = 16000
retransmit_budget = 6
message_ttl_secs = 0
file_streams = 4

[plugins]
dir = "plugins"
instances = 4
max_send_users = 1000

[storage]
encrypt = true
key_file = "/etc/iim/data.key"
"#,
    ),
    (
        "network-host",
        r#"role = "host"
server_id = "h1"
listen = "0.0.0.0:7447"

[network]
secret = "a long shared secret"
exchange = "127.0.0.1:7400"
exchange_cert = "net/exchange/cert.pem"
exchange_name = "localhost"
advertise = "h1.example.com:7447"
"#,
    ),
    (
        "exchange",
        r#"role = "exchange"
listen = "127.0.0.1:7400"
data_dir = "net/exchange"

[network]
secret = "a long shared secret"
"#,
    ),
    (
        "every-key",
        r#"role = "host"
listen = "127.0.0.1:7447"
data_dir = "iim-data"
server_id = "h1"

[tls]
names = []

[limits]
max_frame = 65536
max_body = 32768
session_queue = 4096
handshake_timeout_secs = 10
auth_timeout_secs = 60
max_connections = 10000
max_hashing = 4
hashing_queue = 256
idle_timeout_secs = 60
write_timeout_secs = 30
max_in_flight = 1024
retransmit_initial_ms = 2000
retransmit_max_ms = 16000
retransmit_budget = 6
submit_rate = 1000
submit_burst = 2000
auth_rate = 2
auth_burst = 10
message_ttl_secs = 2592000
max_file = 104857600
file_streams = 4
file_quota = 1073741824
file_ttl_secs = 2592000
file_sweep_secs = 60

[plugins]
watch_interval_ms = 500
call_timeout_ms = 1000
max_memory_mib = 128
max_attempts = 3
queue = 4096
instances = 8
max_send_users = 10000

[network]

[storage]
encrypt = true
"#,
    ),
    (
        "invalid-data-dir",
        r#"data_dir = "/"
[tls]
cert = "cert.pem"
"#,
    ),
    (
        "plugin",
        r#"max_body = 64
policy = "friends"

[host]
instances = 1
max_memory_mib = 96
call_timeout_ms = 2000
allowed_outbound_hosts = ["https://push.example.com", "https://*.example.com:8443"]
http_timeout_ms = 5000
http_max_body_kib = 64
http_ca_file = "ca.pem"
"#,
    ),
];
