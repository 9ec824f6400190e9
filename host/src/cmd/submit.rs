//! `Submit`: check messages and store them, durably, before the session answers Accepted.
//!
//! Everything that can refuse a message is checked before it is stored, so that Accepted
//! means the host has taken responsibility for it. The submissions a session read together
//! are stored one by one and made durable with one flush (group commit), then answered, in
//! order, and dispatched.

use super::Refusal;
use crate::Host;
use crate::clock::now_ms;
use crate::metrics::label;
use crate::store::Acceptance;
use iim_proto::session::{Identity, Submission, SubmitAnswer};
use iim_proto::{DeviceId, ErrorCode, Message, MessageId, MessageKind, UserId};

/// Stores the submissions `who` sent together and makes them durable with one flush: the
/// outcome of each, in order, and the messages to dispatch once they are answered.
pub async fn accept_all(
    host: &Host,
    who: &Identity,
    submissions: Vec<Submission>,
) -> (Vec<Result<SubmitAnswer, Refusal>>, Vec<Message>) {
    let mut outcomes = Vec::with_capacity(submissions.len());
    let mut dispatch = Vec::new();
    for submission in submissions {
        // A recipient who registered on another host a moment ago: asked for once the
        // submission is about to be stored.
        let users: Vec<_> = submission
            .to
            .iter()
            .filter_map(|a| a.user())
            .cloned()
            .collect();
        super::relation::look_up(host, &users).await;
        if let Err(refusal) = super::group::find_home(host, &submission).await {
            outcomes.push(Err(refusal));
            continue;
        }
        outcomes.push(
            accept(host, &who.user, &who.device, submission).map(|(answer, message)| {
                dispatch.extend(message);
                answer
            }),
        );
    }
    if outcomes.iter().any(Result::is_ok)
        && let Err(e) = host.store.flush().await
    {
        tracing::error!(error = %e, "submissions not flushed");
        // Not known to be durable, so not accepted: they stay recorded for dispatch (the
        // periodic retry routes them), and a resubmission with the same client id finds them.
        dispatch.clear();
        for outcome in &mut outcomes {
            if outcome.is_ok() {
                *outcome = Err(Refusal::new(
                    ErrorCode::INTERNAL,
                    "the message could not be stored",
                ));
            }
        }
    }
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
    let metrics = crate::metrics::metrics();
    let counted = |outcome| {
        metrics
            .submissions
            .get_or_create_owned(&label("outcome", outcome))
    };
    counted("accepted").inc_by(accepted);
    counted("refused").inc_by(outcomes.len() as u64 - accepted);
    (outcomes, dispatch)
}

/// Checks and stores a submission, not yet durably: the caller flushes the store before it
/// sends the Accepted answer returned here. Also returns the message to dispatch: a new one,
/// or a resubmitted one whose dispatch had not finished.
fn accept(
    host: &Host,
    user: &UserId,
    device: &DeviceId,
    s: Submission,
) -> Result<(SubmitAnswer, Option<Message>), Refusal> {
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
    // An end-to-end encrypted body is opaque bytes the host cannot check.
    if s.kind == MessageKind::Chat
        && std::str::from_utf8(&s.body).is_err()
        && !iim_proto::body::is_end_to_end(&s.body)
    {
        return Err(Refusal::new(
            ErrorCode::INVALID_ARGUMENT,
            "a chat message's body is UTF-8 text, or an end-to-end encrypted body",
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
    s.kind
        .check()
        .map_err(|e| Refusal::new(ErrorCode::INVALID_ARGUMENT, e.to_string()))?;
    if let MessageKind::Custom(k) = &s.kind
        && iim_proto::body::is_host_notice(k)
    {
        return Err(Refusal::new(
            ErrorCode::INVALID_ARGUMENT,
            format!("kind {k} is the host's own: its notices to plugins"),
        ));
    }
    match iim_proto::group_of(&s.to) {
        // The plugin that handles groups decides whether the group exists and whether the
        // sender may write to it, and refuses with a receipt if not (`docs/plugins.md`).
        Some(group) => {
            if !host.plugins.handles_groups() {
                return Err(Refusal::new(
                    ErrorCode::UNSUPPORTED_KIND,
                    format!("no plugin on this host handles groups such as #{group}"),
                ));
            }
        }
        None => {
            if s.to.iter().any(|to| to.group().is_some()) {
                return Err(Refusal::new(
                    ErrorCode::INVALID_ARGUMENT,
                    "a message is addressed to users or to one group, not both",
                ));
            }
            if host.plugins.handler_of(&s.kind).is_none() {
                return Err(Refusal::new(
                    ErrorCode::UNSUPPORTED_KIND,
                    format!("no plugin on this host handles messages of kind {}", s.kind),
                ));
            }
            for to in s.to.iter().filter_map(|to| to.user()) {
                if !host.iim.exists(to)? {
                    return Err(Refusal::new(
                        ErrorCode::UNKNOWN_USER,
                        format!("no such user: {to}"),
                    ));
                }
            }
        }
    }
    super::file::check_message(host, user, &s.kind, &s.body)?;
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
    build(MessageId(u64::MAX))
        .check_deliverable(limits.max_frame)
        .map_err(|e| Refusal::new(ErrorCode::BODY_TOO_LARGE, e.to_string()))?;
    let acceptance = host
        .store
        .messages
        .accept(user, device, s.client_id, expires_at, build)?;
    Ok(match acceptance {
        Acceptance::New(message) => (
            SubmitAnswer {
                id: message.id,
                sent_at: message.sent_at,
            },
            Some(message),
        ),
        Acceptance::Duplicate {
            id,
            sent_at,
            pending,
        } => (SubmitAnswer { id, sent_at }, pending),
    })
}
