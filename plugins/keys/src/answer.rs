//! What the plugin sends: replies to the requesting user, in parts when they are large.

use iim_plugin_sdk::body::keys::{Answer, KEYS_KIND, KeysReply};
use iim_plugin_sdk::host::{self, MAX_SENDS_PER_EVENT};
use iim_plugin_sdk::{HostError, Message, MessageKind, PluginError};
use serde::Serialize;

/// The largest body of one part of an answer: the host's default `max_body` (32 KiB), which
/// holds the largest item (a 16 KiB key package and a 4 KiB card, in base64). A host
/// configured lower refuses a part with `limit-exceeded`; the rest is then made again in
/// parts of half the size.
pub const PART_BYTES: usize = 32 * 1024;

/// Halving stops here: a host whose body limit does not take one item fails the event, which
/// the operator then finds among the dead letters with the host's reason.
const MIN_PART_BYTES: usize = 1024;

/// A request being answered: the message of kind `keys` a device sent.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request's message.
    pub message: &'a Message,
}

impl Request<'_> {
    /// The requesting (acting) user.
    pub fn user(&self) -> &str {
        &self.message.sender
    }

    /// The requesting device.
    pub fn device(&self) -> &str {
        &self.message.sender_device
    }

    /// The body of a reply saying `answer`.
    fn body(&self, answer: Answer) -> Vec<u8> {
        KeysReply {
            answer,
            request: self.message.id,
            device: self.device().to_owned(),
        }
        .to_json()
    }

    /// Answers with one reply: a new `keys` message to the user, from the user.
    pub fn reply(&self, answer: Answer) -> Result<(), HostError> {
        self.send(self.body(answer))
    }

    fn send(&self, body: Vec<u8>) -> Result<(), HostError> {
        let to = vec![self.user().to_owned()];
        let message = Message::new(MessageKind::Custom(KEYS_KIND.into()), to, body);
        host::send_to(&message, &message.to)?;
        Ok(())
    }
}

/// One part of an answer given in parts.
#[derive(Debug)]
pub struct Part<T> {
    /// Its items.
    pub items: Vec<T>,
    /// Whether it is the last part (the one without `more`).
    pub last: bool,
    /// In the last part: the names (users, devices) of the items that had no room.
    pub unanswered: Vec<String>,
}

/// Answers `request` with `items`, in as few parts as fit in the host's body limit, made into
/// replies by `answer`: every part but the last says `more`. An event may send at most
/// [`MAX_SENDS_PER_EVENT`] messages; the items the last of those has no room for are named
/// (by `name`, each name once) in its `unanswered`, for the client to ask again. Returns how
/// many of `items` were sent: always the first ones.
pub fn in_parts<T: Serialize + Clone>(
    request: Request<'_>,
    items: &[T],
    name: impl Fn(&T) -> String,
    answer: impl Fn(Part<T>) -> Answer,
) -> Result<usize, PluginError> {
    // Each item's share of a part: its JSON and a comma.
    let sizes: Vec<usize> = items
        .iter()
        .map(|item| serde_json::to_vec(item).map_or(0, |json| json.len()) + 1)
        .collect();
    let encode = |start: usize, end: usize, last: bool| {
        let mut unanswered: Vec<String> = Vec::new();
        if last {
            for item in &items[end..] {
                let name = name(item);
                if !unanswered.contains(&name) {
                    unanswered.push(name);
                }
            }
        }
        let items = items[start..end].to_vec();
        request.body(answer(Part {
            items,
            last,
            unanswered,
        }))
    };
    let (mut start, mut sent, mut budget) = (0, 0, PART_BYTES);
    loop {
        let (end, last, body) = plan(start, &sizes, budget, MAX_SENDS_PER_EVENT - sent, &encode);
        let size = body.len();
        match request.send(body) {
            Ok(()) => {
                sent += 1;
                start = end;
                if last {
                    return Ok(end);
                }
            }
            Err(HostError::LimitExceeded(why)) if budget / 2 >= MIN_PART_BYTES => {
                budget /= 2;
                iim_plugin_sdk::debug!(
                    "a reply of {size} bytes was refused ({why}); parts of {budget} bytes now"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The next part of an answer, from item `start`: where it ends, whether it is the last, and
/// its body. `encode(start, end, last)` makes the body of the part with items `start..end`.
fn plan(
    start: usize,
    sizes: &[usize],
    budget: usize,
    parts_left: usize,
    encode: &impl Fn(usize, usize, bool) -> Vec<u8>,
) -> (usize, bool, Vec<u8>) {
    let n = sizes.len();
    // As many items as fit, by their sizes, and at least one: an item over the budget goes
    // alone, and the host says whether it fits.
    let mut end = start;
    let mut size = encode(start, start, false).len();
    while end < n && (end == start || size + sizes[end] <= budget) {
        size += sizes[end];
        end += 1;
    }
    if parts_left > 1 {
        if end < n {
            return (end, false, encode(start, end, false));
        }
        // The rest fits: this is the last part if what the last part says (`missing`) fits
        // too; if not, the tail goes in a part of its own.
        let body = encode(start, n, true);
        if body.len() <= budget || start == n {
            return (n, true, body);
        }
        return (n, false, encode(start, n, false));
    }
    // The last message the event may send: what has no room is unanswered.
    loop {
        let body = encode(start, end, true);
        if body.len() <= budget || end == start {
            return (end, true, body);
        }
        end -= 1;
    }
}
