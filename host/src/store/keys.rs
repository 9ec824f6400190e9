//! Every store key is encoded here, and only here.
//!
//! Names are validated to `a-z 0-9 . _ -` by `iim-proto`, so a zero byte can separate the
//! parts of a key without ambiguity. Numbers are big-endian so that sled's byte order is
//! numeric order: an inbox range scan returns messages in inbox order.

use iim_proto::{Address, DeviceId, RelationKind, UserId};

const SEP: u8 = 0;

// The `messages` and `inbox` trees hold several kinds of record each. A leading byte tells the
// kinds apart.
/// Dedup records one by one, as format 3 wrote them to sled; in memory still (the key of
/// [`dedup`]). Moved into [`DEDUP_CHUNK`] records when the store opens.
pub(crate) const DEDUP: u8 = b'd';
/// Dedup records, up to 256 client ids of a device to a record (see [`dedup_chunk`]).
const DEDUP_CHUNK: u8 = b'c';
/// Dispatch records as an earlier version wrote them (the message alone); moved to
/// [`DISPATCH`] records when the store opens.
pub(crate) const OLD_DISPATCH: u8 = b'p';
pub(crate) const DISPATCH: u8 = b'q';
pub(crate) const GROUP_APPLYING: u8 = b'o';
pub(crate) const INBOX_ENTRY: u8 = b'e';
const INBOX_ID: u8 = b'i';
const EFFECT: u8 = b'g';
pub(crate) const TTL: u8 = b't';
const EXPIRY: u8 = b'x';
pub(crate) const INBOX_HIGH: u8 = b'h';
pub(crate) const INBOX_PRUNED: u8 = b'r';
// The `files` tree: file records and readers.
const FILE: u8 = b'f';
const FILE_READER: u8 = b'a';
const FILE_USAGE: u8 = b'u';
const FILE_REF: u8 = b'r';
const FILE_REF_BY_FILE: u8 = b'c';
const FILE_TOUCHED: u8 = b't';
const FILE_SHARED: u8 = b's';
const FILE_FETCHED: u8 = b'g';
const FILE_NAMED: u8 = b'n';

fn tagged(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(rest.len() + 1);
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(SEP);
        }
        key.extend_from_slice(part);
    }
    key
}

/// The default tree: the store's format number.
pub const FORMAT: &[u8] = b"format";

/// The default tree: present when the store's sealed records are encrypted (docs/security.md).
pub const SEALED: &[u8] = b"sealed";

/// The default tree: the number sled's id generator started above when the store was copied
/// into a new database (sealing a store kept in the clear).
pub const ID_FLOOR: &[u8] = b"id-floor";

/// Whether record `key` of tree `tree` holds what users wrote, and so is sealed with the data
/// key in an encrypted store: messages (dispatch records, inbox entries, relay outboxes),
/// plugin values, dead letters, file records, the host's network credential. The rest (names,
/// positions, counters, cursors, password hashes) is what the store finds records by.
pub fn sealed(tree: &str, key: &[u8]) -> bool {
    let tag = key.first().copied();
    match tree {
        "messages" => matches!(tag, Some(DISPATCH | OLD_DISPATCH)),
        "inbox" => tag == Some(INBOX_ENTRY),
        "plugin_kv" | "dead_letters" => true,
        "files" => tag == Some(FILE),
        "network" => tag == Some(NET_OUTBOX) || key == NET_CREDENTIAL,
        // The exchange's store.
        "relay" => tag == Some(EX_OUTBOX),
        _ => false,
    }
}

/// The trees that hold sealed records (see [`sealed`]).
pub const SEALED_TREES: &[&str] = &[
    "messages",
    "inbox",
    "plugin_kv",
    "dead_letters",
    "files",
    "network",
    "relay",
];

/// `users`: user → account record.
pub fn user(user: &UserId) -> Vec<u8> {
    user.as_str().as_bytes().to_vec()
}

/// `tokens`: (user, device) → token hash.
pub fn token(user: &UserId, device: &DeviceId) -> Vec<u8> {
    join(&[user.as_str().as_bytes(), device.as_str().as_bytes()])
}

/// `devices`: (user, device) → when it logged in and was last active.
pub fn device(user: &UserId, device: &DeviceId) -> Vec<u8> {
    token(user, device)
}

/// The prefix of every key of one user in the trees keyed by (user, …): `tokens`, `devices`,
/// `cursors`, `relations`.
pub fn user_prefix(user: &UserId) -> Vec<u8> {
    let mut key = user.as_str().as_bytes().to_vec();
    key.push(SEP);
    key
}

/// The device named by a key of `tokens` or `devices` that starts with `prefix`
/// ([`user_prefix`]).
pub fn device_of(key: &[u8], prefix_len: usize) -> Option<DeviceId> {
    let name = std::str::from_utf8(key.get(prefix_len..)?).ok()?;
    DeviceId::new(name).ok()
}

/// The user a `relations` key names as the related one (its last part).
pub fn related_user(key: &[u8]) -> Option<UserId> {
    let start = key.iter().rposition(|&b| b == SEP)? + 1;
    relation_other(key, start)
}

/// `deletion_notices`: (deletion id, plugin) → (user, when).
pub fn deletion_notice(id: u64, plugin: &str) -> Vec<u8> {
    let mut key = id.to_be_bytes().to_vec();
    key.extend_from_slice(plugin.as_bytes());
    key
}

/// The parts of a [`deletion_notice`] key.
pub fn deletion_notice_parts(key: &[u8]) -> Option<(u64, String)> {
    let id: [u8; 8] = key.get(..8)?.try_into().ok()?;
    let plugin = std::str::from_utf8(key.get(8..)?).ok()?;
    Some((u64::from_be_bytes(id), plugin.to_owned()))
}

/// `relations`: (user, kind, other) → nothing.
pub fn relation(user: &UserId, kind: RelationKind, other: &UserId) -> Vec<u8> {
    let mut key = relation_prefix(user, kind);
    key.extend_from_slice(other.as_str().as_bytes());
    key
}

/// The prefix of every `relations` key of one user's list of one kind.
pub fn relation_prefix(user: &UserId, kind: RelationKind) -> Vec<u8> {
    let kind: &[u8] = match kind {
        RelationKind::Friend => b"f",
        RelationKind::Colleague => b"c",
    };
    let mut key = join(&[user.as_str().as_bytes(), kind]);
    key.push(SEP);
    key
}

/// The last part of a `relations` key: the related user's name.
pub fn relation_other(key: &[u8], prefix_len: usize) -> Option<UserId> {
    let name = std::str::from_utf8(key.get(prefix_len..)?).ok()?;
    UserId::new(name).ok()
}

/// `messages`: the prefix of the dedup records of every device of `user`.
pub fn dedup_prefix(user: &UserId) -> Vec<u8> {
    tagged(DEDUP, &user_prefix(user))
}

/// `messages`: the prefix of every dedup record kept one by one (format 3).
pub const DEDUP_PREFIX: &[u8] = &[DEDUP];

/// `messages`: the prefix of the dedup chunks of every device of `user`.
pub fn dedup_chunk_prefix(user: &UserId) -> Vec<u8> {
    tagged(DEDUP_CHUNK, &user_prefix(user))
}

/// `messages`: the prefix of every dedup chunk.
pub const DEDUP_CHUNK_PREFIX: &[u8] = &[DEDUP_CHUNK];

/// `inbox`: the prefixes of `user`'s entries and of its id records.
pub fn inbox_prefixes(user: &UserId) -> [Vec<u8>; 2] {
    [
        tagged(INBOX_ENTRY, &user_prefix(user)),
        tagged(INBOX_ID, &user_prefix(user)),
    ]
}

/// `inbox`: the prefix of every user's entries.
pub const INBOX_ENTRY_PREFIX: &[u8] = &[INBOX_ENTRY];

/// `inbox`: the prefix of every expiry record.
pub const EXPIRY_PREFIX: &[u8] = &[EXPIRY];

/// `files`: the prefixes of `user`'s file references (by message).
pub fn file_refs_of(user: &UserId) -> Vec<u8> {
    tagged(FILE_REF, &user_prefix(user))
}

/// `files`: the prefix of every reader record (file, user).
pub const FILE_READER_PREFIX: &[u8] = &[FILE_READER];

/// The user a `files` reader record names (after the tag and the 32-byte digest).
pub fn file_reader_user(key: &[u8]) -> Option<UserId> {
    let name = std::str::from_utf8(key.get(33..)?).ok()?;
    UserId::new(name).ok()
}

/// `messages`, dedup record: (user, device, client id) → (message id, sent at).
pub fn dedup(user: &UserId, device: &DeviceId, client_id: u64) -> Vec<u8> {
    tagged(
        DEDUP,
        &join(&[
            user.as_str().as_bytes(),
            device.as_str().as_bytes(),
            &client_id.to_be_bytes(),
        ]),
    )
}

/// The chunk that holds the dedup record under `dedup_key` (a key of [`dedup`]), and the
/// record's place in it (the client id's low byte): (user, device, client id / 256). A
/// client that numbers its submissions one after the other fills a chunk's 256 places, so
/// that saving them is one sled write, not 256.
pub fn dedup_chunk(dedup_key: &[u8]) -> Option<(Vec<u8>, u8)> {
    let (&low, rest) = dedup_key.split_last()?;
    if rest.first() != Some(&DEDUP) || rest.len() < 8 {
        return None;
    }
    Some((tagged(DEDUP_CHUNK, &rest[1..]), low))
}

/// The chunk of the dedup record of (user, device, client id), and its place in it: what
/// [`dedup_chunk`] gives for that record's [`dedup`] key.
pub fn dedup_chunk_of(user: &UserId, device: &DeviceId, client_id: u64) -> (Vec<u8>, u8) {
    let number = client_id.to_be_bytes();
    let key = join(&[
        user.as_str().as_bytes(),
        device.as_str().as_bytes(),
        &number[..7],
    ]);
    (tagged(DEDUP_CHUNK, &key), number[7])
}

/// `messages`, dispatch record: message id → (client id, message), for every accepted message
/// not yet in all its recipients' inboxes. The client id (none for a message that did not come
/// from a client's submission) names the dedup record that goes with it.
pub fn dispatch(id: u64) -> Vec<u8> {
    tagged(DISPATCH, &id.to_be_bytes())
}

/// `messages`, the message of a group whose effects are being applied: group → message id.
/// Written before them, so a crash that left some of them finds the record.
pub fn group_applying(group: &iim_proto::GroupId) -> Vec<u8> {
    tagged(GROUP_APPLYING, group.as_str().as_bytes())
}

/// The prefix of every [`group_applying`] record.
pub const GROUP_APPLYING_PREFIX: &[u8] = &[GROUP_APPLYING];

/// The prefix of every dispatch record, in message id order.
pub const DISPATCH_PREFIX: &[u8] = &[DISPATCH];

/// The prefix of the dispatch records of an earlier version: message id → message.
pub const OLD_DISPATCH_PREFIX: &[u8] = &[OLD_DISPATCH];

/// `messages`, effect record: (plugin, event key, index) → (message id, sent at): the id of
/// the `index`th new message a plugin sent while handling a durable event, so that handling
/// the event again after a restart sends the same message, not a second one.
pub fn effect(plugin: &str, event_key: &[u8], index: u32) -> Vec<u8> {
    tagged(
        EFFECT,
        &join(&[plugin.as_bytes(), event_key, &index.to_be_bytes()]),
    )
}

/// `plugin_kv`: (plugin, key) → value. Plugin names never hold a zero byte, so one plugin's
/// keys cannot be spelled as another's.
pub fn plugin_kv(plugin: &str, key: &str) -> Vec<u8> {
    join(&[plugin.as_bytes(), key.as_bytes()])
}

/// `dead_letters`: number → dead letter, in the order they were set aside.
pub fn dead_letter(id: u64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

/// `inbox`, entry: (user, seq) → message.
pub fn inbox(user: &UserId, seq: u64) -> Vec<u8> {
    tagged(
        INBOX_ENTRY,
        &join(&[user.as_str().as_bytes(), &seq.to_be_bytes()]),
    )
}

/// The first and one-past-last `inbox` keys of a user's entries after `after`.
pub fn inbox_range(user: &UserId, after: u64) -> (Vec<u8>, Vec<u8>) {
    let start = inbox(user, after.saturating_add(1));
    let mut end = tagged(INBOX_ENTRY, user.as_str().as_bytes());
    end.push(SEP + 1);
    (start, end)
}

/// The inbox position encoded in an `inbox` key.
pub fn inbox_seq(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// `inbox`, id record: (user, message id) → seq: whether a message is already in an inbox.
pub fn inbox_id(user: &UserId, id: u64) -> Vec<u8> {
    tagged(
        INBOX_ID,
        &join(&[user.as_str().as_bytes(), &id.to_be_bytes()]),
    )
}

/// `messages`, time-to-live record: message id → when it expires (ms since the Unix epoch),
/// for a message submitted with its own time to live.
pub fn ttl(id: u64) -> Vec<u8> {
    tagged(TTL, &id.to_be_bytes())
}

/// `inbox`, expiry record: (expires at, user, seq) → message id; in expiry order.
pub fn expiry(expires_at: u64, user: &UserId, seq: u64) -> Vec<u8> {
    tagged(
        EXPIRY,
        &join(&[
            &expires_at.to_be_bytes(),
            user.as_str().as_bytes(),
            &seq.to_be_bytes(),
        ]),
    )
}

/// `inbox`, high-water record: user → the highest position an entry taken out by expiry had,
/// so that positions are never handed out twice even when the last entries are gone.
pub fn inbox_high(user: &UserId) -> Vec<u8> {
    tagged(INBOX_HIGH, user.as_str().as_bytes())
}

/// `inbox`, prune mark: user → the position up to which [`crate::store::Store::prune`] went.
pub fn inbox_pruned(user: &UserId) -> Vec<u8> {
    tagged(INBOX_PRUNED, user.as_str().as_bytes())
}

/// The first and one-past-last `inbox` keys of the expiry records due by `now`.
pub fn expiry_due(now: u64) -> (Vec<u8>, Vec<u8>) {
    (
        vec![EXPIRY],
        tagged(EXPIRY, &now.saturating_add(1).to_be_bytes()),
    )
}

/// The number after the tag of a key made of a tag and a number (a `ttl` key).
pub fn number_after_tag(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..)?.try_into().ok()?))
}

/// The parts of an `inbox` entry's key: (user, seq).
pub fn inbox_parts(key: &[u8]) -> Option<(UserId, u64)> {
    let rest = key.strip_prefix(&[INBOX_ENTRY])?;
    let seq = inbox_seq(rest)?;
    let name = rest.get(..rest.len().checked_sub(9)?)?;
    let user = UserId::new(std::str::from_utf8(name).ok()?).ok()?;
    Some((user, seq))
}

/// The parts of a `cursors` key: (user, device).
pub fn cursor_parts(key: &[u8]) -> Option<(UserId, DeviceId)> {
    let at = key.iter().position(|&b| b == SEP)?;
    let user = UserId::new(std::str::from_utf8(&key[..at]).ok()?).ok()?;
    let device = DeviceId::new(std::str::from_utf8(&key[at + 1..]).ok()?).ok()?;
    Some((user, device))
}

/// The parts of an expiry record's key: (expires at, user, seq).
pub fn expiry_parts(key: &[u8]) -> Option<(u64, UserId, u64)> {
    let rest = key.strip_prefix(&[EXPIRY])?;
    let at: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let seq = inbox_seq(rest)?;
    let name = rest.get(9..rest.len().checked_sub(9)?)?;
    let user = UserId::new(std::str::from_utf8(name).ok()?).ok()?;
    Some((u64::from_be_bytes(at), user, seq))
}

/// `cursors`: (user, device) → the inbox position the device acknowledged.
pub fn cursor(user: &UserId, device: &DeviceId) -> Vec<u8> {
    token(user, device)
}

/// The prefix of every `cursors` key of one user.
pub fn cursor_prefix(user: &UserId) -> Vec<u8> {
    user_prefix(user)
}

// ---- networks of hosts ----

// A host's `network` tree: what it knows of its network, and its relay outbox.
const NET_HOME: u8 = b'u';
const NET_SERVER: u8 = b's';
const NET_OUTBOX: u8 = b'o';

/// `network`: this host's number in the network, given by the exchange at the first join.
pub const NET_NUMBER: &[u8] = b"n";
/// `network`: the version of the directory up to which the cache has every entry.
pub const NET_DIRECTORY_VERSION: &[u8] = b"v";
/// `network`: the credential this host shows the exchange at every join.
pub const NET_CREDENTIAL: &[u8] = b"c";
/// `network`: the highest relay outbox number the exchange acknowledged.
pub const NET_OUTBOX_ACKED: &[u8] = b"k";
/// `network`: the highest `906` number from the exchange this host made durable.
pub const NET_RELAYED_IN: &[u8] = b"a";

/// `network`, directory cache: user → home server id.
pub fn net_home(name: &Address) -> Vec<u8> {
    tagged(NET_HOME, name.to_string().as_bytes())
}

/// The prefix of every directory cache entry.
pub const NET_HOME_PREFIX: &[u8] = &[NET_HOME];

/// `network`, registry cache: server id → server info.
pub fn net_server(id: &str) -> Vec<u8> {
    tagged(NET_SERVER, id.as_bytes())
}

/// The prefix of every registry cache entry.
pub const NET_SERVER_PREFIX: &[u8] = &[NET_SERVER];

/// `network`, relay outbox: number → envelope (`905`) not yet acknowledged by the exchange.
pub fn net_outbox(seq: u64) -> Vec<u8> {
    tagged(NET_OUTBOX, &seq.to_be_bytes())
}

/// The prefix of every relay outbox entry, in number order.
pub const NET_OUTBOX_PREFIX: &[u8] = &[NET_OUTBOX];

/// The number of a relay outbox key (or of an exchange outbox key).
pub fn outbox_seq(key: &[u8]) -> Option<u64> {
    inbox_seq(key)
}

// The exchange's trees. `servers`: server id → record. `directory`: user → home server id,
// and version → user (the order in which hosts learn of users). `relay`: per target server,
// number → envelope (`906`) not yet acknowledged; per origin server, the highest `905`
// number stored.
const EX_HOME: u8 = b'u';
const EX_VERSION: u8 = b'v';
const EX_OUTBOX: u8 = b'o';
const EX_INBOUND: u8 = b'i';
const EX_ACKED: u8 = b'k';

/// The exchange's default tree: the number the next new server gets.
pub const EX_NEXT_NUMBER: &[u8] = b"next_number";

/// `servers`: server id → its record.
pub fn ex_server(id: &str) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// `directory`: user → home server id.
pub fn ex_home(name: &Address) -> Vec<u8> {
    tagged(EX_HOME, name.to_string().as_bytes())
}

/// `directory`: version → user, in version order.
pub fn ex_version(version: u64) -> Vec<u8> {
    tagged(EX_VERSION, &version.to_be_bytes())
}

/// The first and one-past-last `directory` keys of the versions after `after`.
pub fn ex_versions_after(after: u64) -> (Vec<u8>, Vec<u8>) {
    (ex_version(after.saturating_add(1)), vec![EX_VERSION + 1])
}

/// The version in a `directory` version key.
pub fn ex_version_of(key: &[u8]) -> Option<u64> {
    inbox_seq(key)
}

/// `relay`: (target server, number) → envelope.
pub fn ex_outbox(target: &str, seq: u64) -> Vec<u8> {
    tagged(EX_OUTBOX, &join(&[target.as_bytes(), &seq.to_be_bytes()]))
}

/// The first and one-past-last `relay` keys of `target`'s outbox after `after`.
pub fn ex_outbox_after(target: &str, after: u64) -> (Vec<u8>, Vec<u8>) {
    let mut end = tagged(EX_OUTBOX, target.as_bytes());
    end.push(SEP + 1);
    (ex_outbox(target, after.saturating_add(1)), end)
}

/// `relay`: target server → the highest number of its outbox it acknowledged.
pub fn ex_acked(target: &str) -> Vec<u8> {
    tagged(EX_ACKED, target.as_bytes())
}

/// `relay`: origin server → the highest `905` number from it that is stored.
pub fn ex_inbound(origin: &str) -> Vec<u8> {
    tagged(EX_INBOUND, origin.as_bytes())
}

// A host's `network` tree, continued: the names of deleted accounts it has yet to release at
// the exchange.
const NET_RELEASE: u8 = b'r';

/// `network`, release record: user → nothing, for a user whose account was deleted and whose
/// name the exchange has not released yet.
pub fn net_release(user: &UserId) -> Vec<u8> {
    tagged(NET_RELEASE, user.as_str().as_bytes())
}

/// The prefix of every release record.
pub const NET_RELEASE_PREFIX: &[u8] = &[NET_RELEASE];

/// The user a release record names.
pub fn net_release_user(key: &[u8]) -> Option<UserId> {
    let name = std::str::from_utf8(key.strip_prefix(NET_RELEASE_PREFIX)?).ok()?;
    UserId::new(name).ok()
}

/// `files`: a file's record.
pub fn file(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE, sha256)
}

/// `files`: the bytes of the files `user` was the first to upload.
pub fn file_usage(user: &UserId) -> Vec<u8> {
    tagged(FILE_USAGE, user.as_str().as_bytes())
}

/// `files`: the prefix of every file record.
pub fn files() -> Vec<u8> {
    vec![FILE]
}

/// `files`: `user` may read file `sha256` (by file first, so that a file's readers are one
/// range).
pub fn file_reader(user: &UserId, sha256: &[u8; 32]) -> Vec<u8> {
    let mut key = file_readers(sha256);
    key.extend_from_slice(user.as_str().as_bytes());
    key
}

/// `files`: the prefix of file `sha256`'s readers.
pub fn file_readers(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE_READER, sha256)
}

/// `files`: the file that message `id` in `user`'s inbox references.
pub fn file_ref(user: &UserId, id: u64) -> Vec<u8> {
    tagged(
        FILE_REF,
        &join(&[user.as_str().as_bytes(), &id.to_be_bytes()]),
    )
}

/// `files`: message `id` in `user`'s inbox references file `sha256` (by file first: a file
/// still referenced has a key in [`file_refs`]).
pub fn file_ref_by_file(sha256: &[u8; 32], user: &UserId, id: u64) -> Vec<u8> {
    let mut key = file_refs(sha256);
    key.extend_from_slice(&join(&[user.as_str().as_bytes(), &id.to_be_bytes()]));
    key
}

/// `files`: the prefix of the inbox messages that reference file `sha256`.
pub fn file_refs(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE_REF_BY_FILE, sha256)
}

/// `files`: when file `sha256` was last uploaded or referenced, in ms since the epoch.
pub fn file_touched(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE_TOUCHED, sha256)
}

/// `files`: file `sha256` went to another host in a message a user of this host sent: the
/// network's hosts may fetch it.
pub fn file_shared(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE_SHARED, sha256)
}

/// `files`: the last message that named file `sha256` here: its id and sender.
pub fn file_named(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE_NAMED, sha256)
}

/// `files`: file `sha256` was fetched from another host, not uploaded here.
pub fn file_fetched(sha256: &[u8; 32]) -> Vec<u8> {
    tagged(FILE_FETCHED, sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("valid")
    }

    #[test]
    fn inbox_keys_sort_numerically_and_stay_within_the_user() {
        let a = user("a");
        let (start, end) = inbox_range(&a, 255);
        assert!(inbox(&a, 256) >= start && inbox(&a, 256) < end);
        assert!(inbox(&a, 255) < start);
        assert!(inbox(&a, u64::MAX) < end);
        // "a.b" begins with "a" but is another user: its keys sort outside a's range.
        let ab = user("a.b");
        assert!(inbox(&ab, 1) >= end || inbox(&ab, 1) < start);
        assert_eq!(inbox_seq(&inbox(&a, 77)), Some(77));
        // Id records share the tree but never fall in an entry range.
        assert!(inbox_id(&a, 300) < start || inbox_id(&a, 300) >= end);
    }

    #[test]
    fn expiry_records_sort_by_time_and_round_trip() {
        let key = expiry(1_700_000_000_123, &user("a.b"), 42);
        assert_eq!(
            expiry_parts(&key),
            Some((1_700_000_000_123, user("a.b"), 42))
        );
        let (start, end) = expiry_due(1_700_000_000_123);
        assert!(key >= start && key < end, "due at its time");
        let (_, before) = expiry_due(1_700_000_000_122);
        assert!(key >= before, "not due a millisecond before");
        assert!(expiry(5, &user("z"), 1) < expiry(6, &user("a"), 1));
        // Apart from the entries and id records of the same tree.
        let (start, end) = inbox_range(&user("x"), 0);
        assert!(key < start || key >= end);
        assert_eq!(expiry_parts(&inbox(&user("a"), 1)), None);
    }

    #[test]
    fn dispatch_records_sort_by_id_and_apart_from_dedup_records() {
        assert!(dispatch(255) < dispatch(256));
        assert!(dispatch(7).starts_with(DISPATCH_PREFIX));
        let dedup = dedup(&user("a"), &DeviceId::new("d").expect("valid"), 7);
        assert!(!dedup.starts_with(DISPATCH_PREFIX));
        let (chunk, _) = dedup_chunk(&dedup).expect("a dedup key");
        assert!(!chunk.starts_with(DISPATCH_PREFIX));
        assert!(!dispatch(7).starts_with(OLD_DISPATCH_PREFIX));
    }

    #[test]
    fn a_dedup_key_names_its_chunk_and_place() {
        let phone = DeviceId::new("phone").expect("valid");
        let key = dedup(&user("ab"), &phone, 0x1234);
        let (chunk, low) = dedup_chunk(&key).expect("a dedup key");
        assert_eq!(low, 0x34);
        assert_eq!(
            dedup_chunk_of(&user("ab"), &phone, 0x1234),
            (chunk.clone(), low)
        );
        // Neighbours share a chunk; 256 apart do not.
        assert_eq!(
            dedup_chunk(&dedup(&user("ab"), &phone, 0x1200)).map(|c| c.0),
            Some(chunk.clone())
        );
        assert_ne!(
            dedup_chunk(&dedup(&user("ab"), &phone, 0x1334)).map(|c| c.0),
            Some(chunk.clone())
        );
        assert!(chunk.starts_with(&dedup_chunk_prefix(&user("ab"))));
        assert!(!chunk.starts_with(&dedup_chunk_prefix(&user("a"))));
        assert!(chunk.starts_with(DEDUP_CHUNK_PREFIX));
        assert_eq!(dedup_chunk(&chunk), None, "a chunk key is not a dedup key");
    }

    #[test]
    fn relation_keys_round_trip() {
        let prefix = relation_prefix(&user("a"), RelationKind::Friend);
        let key = relation(&user("a"), RelationKind::Friend, &user("b"));
        assert!(key.starts_with(&prefix));
        assert_eq!(relation_other(&key, prefix.len()), Some(user("b")));
        assert!(!key.starts_with(&relation_prefix(&user("a"), RelationKind::Colleague)));
    }
}
