//! `Submit`: check a message and store it; the session makes it durable and answers Accepted.
//!
//! Everything that can refuse a message is checked before it is stored, so that Accepted
//! means the host has taken responsibility for it. The session flushes once for all the
//! submissions it read together (group commit), then answers and dispatches each in order.

use super::Refusal;
use crate::store::Acceptance;
use crate::{Host, now_ms};
use iim_proto::{
    ClientFrame, DeviceId, ErrorCode, Message, MessageId, MessageKind, RequestId, ServerFrame,
    UserId,
};

/// Longest name of a custom message kind, in bytes.
pub const MAX_KIND: usize = 64;

/// Checks the name of a custom kind: 1 to [`MAX_KIND`] bytes. For clients' submissions and
/// plugins' sends alike.
pub fn check_kind(kind: &MessageKind) -> Result<(), String> {
    match kind {
        MessageKind::Custom(name) if name.is_empty() || name.len() > MAX_KIND => {
            Err(format!("a custom kind is 1 to {MAX_KIND} bytes"))
        }
        _ => Ok(()),
    }
}

/// Checks that `message`, with the largest id, position and time, fits in a `Deliver` frame
/// of `max_frame` bytes: otherwise no device could ever receive it.
pub fn check_deliverable(message: Message, max_frame: u32) -> Result<(), String> {
    let probe = ServerFrame::Deliver {
        seq: u64::MAX,
        message: Message {
            id: MessageId(u64::MAX),
            sent_at: u64::MAX,
            ..message
        },
    };
    iim_proto::encode_frame(&probe, max_frame)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A submission's fields.
pub struct Submission {
    /// Request id.
    pub req: RequestId,
    /// The client's idempotency id.
    pub client_id: u64,
    /// The kind.
    pub kind: MessageKind,
    /// The recipients.
    pub to: Vec<UserId>,
    /// The body.
    pub body: Vec<u8>,
    /// Seconds until it expires, if the client chose; otherwise the host's default.
    pub ttl_secs: Option<u32>,
}

impl Submission {
    /// Whether `frame` is a submission.
    pub fn is(frame: &ClientFrame) -> bool {
        matches!(
            frame,
            ClientFrame::Submit { .. } | ClientFrame::SubmitExpiring { .. }
        )
    }

    /// The submission in `frame`, if it is one.
    pub fn of(frame: ClientFrame) -> Option<Self> {
        match frame {
            ClientFrame::Submit {
                req,
                client_id,
                kind,
                to,
                body,
            } => Some(Self {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs: None,
            }),
            ClientFrame::SubmitExpiring {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs,
            } => Some(Self {
                req,
                client_id,
                kind,
                to,
                body,
                ttl_secs: Some(ttl_secs),
            }),
            _ => None,
        }
    }
}

/// Checks and stores a submission, not yet durably: the caller flushes the store before it
/// sends the Accepted answer returned here. Also returns the message to dispatch: a new one,
/// or a resubmitted one whose dispatch had not finished.
pub fn accept(
    host: &Host,
    user: &UserId,
    device: &DeviceId,
    s: Submission,
) -> Result<(ServerFrame, Option<Message>), Refusal> {
    let limits = &host.config.limits;
    if s.body.len() > limits.max_body as usize {
        return Err(Refusal::new(
            ErrorCode::BODY_TOO_LARGE,
            format!(
                "body of {} bytes is over the limit of {}",
                s.body.len(),
                limits.max_body
            ),
        ));
    }
    if s.to.is_empty() {
        return Err(Refusal::new(ErrorCode::INVALID_ARGUMENT, "no recipient"));
    }
    if s.to.len() > iim_proto::MAX_TARGETS {
        return Err(Refusal::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("more than {} recipients", iim_proto::MAX_TARGETS),
        ));
    }
    check_kind(&s.kind).map_err(|e| Refusal::new(ErrorCode::INVALID_ARGUMENT, e))?;
    if host.plugins.handler_of(&s.kind).is_none() {
        return Err(Refusal::new(
            ErrorCode::UNSUPPORTED_KIND,
            format!("no plugin on this host handles messages of kind {}", s.kind),
        ));
    }
    for to in &s.to {
        if !host.iim.exists(to)? {
            return Err(Refusal::new(
                ErrorCode::UNKNOWN_USER,
                format!("no such user: {to}"),
            ));
        }
    }
    if s.ttl_secs == Some(0) {
        return Err(Refusal::new(
            ErrorCode::INVALID_ARGUMENT,
            "a time to live is at least 1 s",
        ));
    }
    let sent_at = now_ms();
    let expires_at = s
        .ttl_secs
        .map(|secs| sent_at.saturating_add(u64::from(secs) * 1000));
    let build = |id: MessageId| Message {
        id,
        kind: s.kind.clone(),
        from: user.clone(),
        from_device: device.clone(),
        to: s.to.clone(),
        body: s.body.clone(),
        sent_at,
    };
    check_deliverable(build(MessageId(u64::MAX)), limits.max_frame)
        .map_err(|e| Refusal::new(ErrorCode::BODY_TOO_LARGE, e))?;
    let acceptance = host
        .store
        .accept(user, device, s.client_id, expires_at, build)?;
    Ok(match acceptance {
        Acceptance::New(message) => (
            ServerFrame::Accepted {
                req: s.req,
                client_id: s.client_id,
                id: message.id,
                sent_at: message.sent_at,
            },
            Some(message),
        ),
        Acceptance::Duplicate {
            id,
            sent_at,
            pending,
        } => (
            ServerFrame::Accepted {
                req: s.req,
                client_id: s.client_id,
                id,
                sent_at,
            },
            pending,
        ),
    })
}
