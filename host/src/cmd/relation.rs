//! `Relation`: add to, remove from and list a user's friends and colleagues.
//!
//! A list is the user's own: adding someone needs no consent and tells them nothing. Policies
//! built on relations (who may message whom, who sees whose presence) read these lists.

use super::Refusal;
use crate::Host;
use iim_proto::{ErrorCode, RelationKind, RelationOp, RequestId, ServerFrame, UserId};

/// Most users one list may hold: a full list must fit in one `Users` frame.
pub const MAX_RELATIONS: usize = 500;

/// Carries out `op` on `user`'s list of `kind`; a change is durable when answered.
pub async fn handle(
    host: &Host,
    req: RequestId,
    user: &UserId,
    kind: RelationKind,
    op: RelationOp,
) -> Result<ServerFrame, Refusal> {
    match op {
        RelationOp::Add(other) => {
            if &other == user {
                return Err(Refusal::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!("cannot add yourself as a {kind}"),
                ));
            }
            look_up(host, std::slice::from_ref(&other)).await;
            if !host.iim.exists(&other)? {
                return Err(Refusal::new(
                    ErrorCode::UNKNOWN_USER,
                    format!("no such user: {other}"),
                ));
            }
            let list = host.store.relations.list(user, kind)?;
            if list.len() >= MAX_RELATIONS && !list.contains(&other) {
                return Err(Refusal::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!("a {kind} list holds at most {MAX_RELATIONS} users"),
                ));
            }
            host.store.relations.add(user, kind, &other)?;
            host.store.flush().await?;
            Ok(ServerFrame::Ok { req })
        }
        RelationOp::Remove(other) => {
            host.store.relations.remove(user, kind, &other)?;
            host.store.flush().await?;
            Ok(ServerFrame::Ok { req })
        }
        RelationOp::List => Ok(ServerFrame::Users {
            req,
            users: host.store.relations.list(user, kind)?,
        }),
    }
}

/// In a network of hosts: asks the exchange for the homes of the users of `users` this host
/// does not know yet (a user who registered elsewhere a moment ago), so that they are found.
/// Out of reach, the users stay unknown.
pub async fn look_up(host: &Host, users: &[UserId]) {
    let Some(network) = &host.network else {
        return;
    };
    let unknown: Vec<UserId> = users
        .iter()
        .filter(|u| !matches!(host.iim.exists(u), Ok(true)))
        .cloned()
        .collect();
    if unknown.is_empty() {
        return;
    }
    let unknown: Vec<iim_proto::Address> = unknown.into_iter().map(Into::into).collect();
    if let Err(e) = network.look_up(&unknown).await {
        tracing::warn!(error = %e, "cannot look users up in the directory");
    }
}
