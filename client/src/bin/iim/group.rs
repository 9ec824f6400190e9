//! `iim group`: requests to the groups plugin, each answered by a message.
//!
//! A request is a `group` message addressed to the group (for `list`, to the user); the plugin
//! answers the user with a `group` reply or a `refused` receipt that names the request's id
//! (`docs/protocol.md`, "Groups"). The answer arrives like any message, on the device's
//! delivery session, so the command opens one (`SessionMode::Receive`) and waits, a bounded
//! time, for the message that answers it.
//!
//! What else arrives meanwhile (what waited for the device, what others send) is not
//! acknowledged: the host keeps it for `iim listen`, which is where the user reads messages.
//! An acknowledgement covers every delivery before it on the connection, so the command
//! acknowledges only while everything so far was its own: the answer's messages, and the
//! presence snapshot its session brings (stale once `listen` connects again and gets one of
//! its own). From the first other message on, nothing is acknowledged, the answer neither:
//! that would take from `listen` what came before it. Printing those messages here instead
//! would split the user's messages between two terminals, would put them among this
//! command's output (which scripts read), and would tell their senders "delivered" for
//! messages nobody looked at. The cost: then `listen` shows the answer too, and a device with
//! more messages waiting than the host sends unacknowledged (`limits.max_in_flight`, 1024)
//! gets no answer until `listen` has taken them.
//!
//! The device's deliveries are taken from a `listen` of the same profile for that moment; see
//! `deliveries.rs` for how the listener gets them back.

use super::deliveries::{AnswerTimeout, DeliveryLock};
use super::show::summary_text;
use super::{Cli, profile_dir, saved_login, session};
use anyhow::{anyhow, bail};
use clap::Subcommand;
use iim_client::proto::body::{GroupMember, GroupReply, GroupRequest, GroupRole, Receipt};
use iim_client::proto::{
    Address, ErrorCode, GROUP_KIND, GroupId, Message, MessageId, MessageKind, SessionMode, UserId,
};
use iim_client::{ClientError, Connection, Event};
use std::time::Duration;
use tokio::time::Instant;

/// `iim group`: the subcommand and how long to wait for the answer.
#[derive(Debug, clap::Args)]
pub(crate) struct GroupArgs {
    #[command(flatten)]
    timeout: AnswerTimeout,
    #[command(subcommand)]
    op: GroupCommand,
}

/// What to ask of the groups plugin. NAME is the group's name, with or without its `#`.
#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Make a group, with you as its owner and MEMBERS as its first members.
    Create {
        /// The group's name (`team` or `#team`): letters a-z, digits, '.', '_', '-'.
        #[arg(value_parser = parse_group)]
        name: GroupId,
        /// A title to show [default: the name].
        #[arg(long)]
        title: Option<String>,
        /// Users to add besides you.
        members: Vec<UserId>,
    },
    /// Set the group's title (owner and admins); its name stays.
    Rename {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
        /// The new title.
        title: String,
    },
    /// Delete the group (owner).
    Delete {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
    },
    /// Add members (owner and admins).
    Add {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
        /// The users.
        #[arg(required = true, value_name = "USER")]
        users: Vec<UserId>,
    },
    /// Remove members (the owner anyone, an admin plain members).
    Remove {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
        /// The users.
        #[arg(required = true, value_name = "USER")]
        users: Vec<UserId>,
    },
    /// Leave the group (the owner hands it on or deletes it instead).
    Leave {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
    },
    /// Print the members and their roles, one a line: `alice owner`.
    Members {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
    },
    /// Print your groups, one a line: `#team (owner, 3 members) The team`.
    List,
    /// Give a member a role (owner): `owner` hands the group on, and you become an admin.
    Role {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
        /// The member.
        user: UserId,
        /// The new role.
        role: RoleArg,
    },
    /// Print which members got and read a message you sent to the group.
    Receipts {
        /// The group.
        #[arg(value_parser = parse_group)]
        name: GroupId,
        /// The message's id, as `send` printed it.
        #[arg(value_name = "MESSAGE-ID")]
        id: u64,
    },
}

/// A role on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RoleArg {
    /// May do everything; one per group.
    Owner,
    /// May rename the group, add and remove members.
    Admin,
    /// May write and read the members.
    Member,
}

impl From<RoleArg> for GroupRole {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Owner => GroupRole::Owner,
            RoleArg::Admin => GroupRole::Admin,
            RoleArg::Member => GroupRole::Member,
        }
    }
}

/// A group's name as the user writes it: `team` or `#team`.
pub(crate) fn parse_group(text: &str) -> Result<GroupId, String> {
    let name = text.strip_prefix('#').unwrap_or(text);
    GroupId::new(name).map_err(|e| format!("not a group name: {e}"))
}

impl GroupCommand {
    /// The group the request is about; `None` for `list`.
    fn group(&self) -> Option<&GroupId> {
        match self {
            Self::Create { name, .. }
            | Self::Rename { name, .. }
            | Self::Delete { name }
            | Self::Add { name, .. }
            | Self::Remove { name, .. }
            | Self::Leave { name }
            | Self::Members { name }
            | Self::Role { name, .. }
            | Self::Receipts { name, .. } => Some(name),
            Self::List => None,
        }
    }

    /// The request's name in JSON output, as the plugin's `op`.
    fn op(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Rename { .. } => "rename",
            Self::Delete { .. } => "delete",
            Self::Add { .. } => "add",
            Self::Remove { .. } => "remove",
            Self::Leave { .. } => "leave",
            Self::Members { .. } => "members",
            Self::List => "list",
            Self::Role { .. } => "role",
            Self::Receipts { .. } => "receipts",
        }
    }

    /// Whom the request is addressed to, and its body, for user `me`.
    fn request(&self, me: &UserId) -> (Address, GroupRequest) {
        let names = |users: &[UserId]| users.iter().map(ToString::to_string).collect();
        let request = match self {
            Self::Create { title, members, .. } => GroupRequest::Create {
                title: title.clone().unwrap_or_default(),
                members: names(members),
            },
            Self::Rename { title, .. } => GroupRequest::Rename {
                title: title.clone(),
            },
            Self::Delete { .. } => GroupRequest::Delete,
            Self::Add { users, .. } => GroupRequest::Add {
                users: names(users),
            },
            Self::Remove { users, .. } => GroupRequest::Remove {
                users: names(users),
            },
            Self::Leave { .. } => GroupRequest::Leave,
            Self::Members { .. } => GroupRequest::Members,
            Self::List => GroupRequest::List,
            Self::Role { user, role, .. } => GroupRequest::Role {
                user: user.to_string(),
                role: (*role).into(),
            },
            Self::Receipts { id, .. } => GroupRequest::Receipts { id: *id },
        };
        let to = match self.group() {
            Some(group) => Address::Group(group.clone()),
            None => Address::User(me.clone()),
        };
        (to, request)
    }

    /// What a `done` reply means, for a person: `added bob, carol to #team`.
    fn done_text(&self) -> String {
        let list = |users: &[UserId]| {
            users
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Self::Create { name, .. } => format!("created #{name}"),
            Self::Rename { name, title } => format!("renamed #{name} {title:?}"),
            Self::Delete { name } => format!("deleted #{name}"),
            Self::Add { name, users } => format!("added {} to #{name}", list(users)),
            Self::Remove { name, users } => format!("removed {} from #{name}", list(users)),
            Self::Leave { name } => format!("left #{name}"),
            Self::Role { name, user, role } => {
                format!("made {user} {} of #{name}", GroupRole::from(*role))
            }
            // Answered with data, not `done` alone; said plainly if a plugin does otherwise.
            Self::Members { .. } | Self::List | Self::Receipts { .. } => "done".to_owned(),
        }
    }
}

/// One message of the groups plugin's answer to a request.
#[derive(Debug, PartialEq)]
enum Answer {
    /// A part of the reply: members, groups, receipts. A long list comes in several parts.
    Part(GroupReply),
    /// The request was carried out; after the parts of a reply, it says that they are all
    /// there.
    Done,
    /// The request was refused, for this reason.
    Refused(String),
}

/// The message of the answer to request `request` that `message` is, if it is one.
fn answer_to(message: &Message, request: MessageId) -> Option<Answer> {
    match &message.kind {
        MessageKind::Custom(kind) if kind == GROUP_KIND => {
            match GroupReply::from_json(&message.body).ok()? {
                reply if reply.request() != request.0 => None,
                GroupReply::Done { .. } => Some(Answer::Done),
                part => Some(Answer::Part(part)),
            }
        }
        MessageKind::Receipt => match Receipt::from_json(&message.body).ok()? {
            Receipt::Refused { id, reason, .. } if id == request.0 => Some(Answer::Refused(reason)),
            _ => None,
        },
        _ => None,
    }
}

/// The whole answer: the parts of the reply (none for a change), or the plugin's reason for
/// refusing.
type Outcome = Result<Vec<GroupReply>, String>;

/// Why waiting for an answer on one connection stopped without one.
enum NoAnswer {
    /// The deadline passed: the request's id, and how many other messages came meanwhile.
    Timeout { request: MessageId, others: u64 },
    /// The connection ended: lost, or replaced by another session of the device.
    Lost(ClientError),
    /// Anything else, said as it is.
    Failed(anyhow::Error),
}

/// Runs `iim group`.
pub(crate) async fn run(cli: &Cli, args: &GroupArgs) -> anyhow::Result<()> {
    let timeout = args.timeout.duration();
    let deadline = Instant::now() + timeout;
    let dir = profile_dir(cli)?;
    // Not logged in is said as every command says it, before the lock is made.
    saved_login(&dir)?;
    // Held until the connection is closed (it is dropped after), so that a listener this
    // command displaced connects again only once the command is gone.
    let lock = DeliveryLock::take(&dir, deadline).await?;
    // One id for every attempt: a request submitted again is the same request.
    let client_id = iim_client::new_client_id();
    loop {
        lock.mark()?;
        let (conn, profile) = session(cli, SessionMode::Receive).await?;
        let (to, request) = args.op.request(&profile.user);
        let asked = Asked {
            client_id,
            to,
            request,
            me: profile.user.clone(),
        };
        match ask(&conn, &asked, deadline).await {
            Ok(outcome) => {
                conn.close().await;
                return print(cli.json, &args.op, outcome);
            }
            // The connection was lost, or a reconnecting `listen` of this device took the
            // deliveries back: ask again on a new one (the host knows the request by its
            // client id, and keeps the answer's messages until they are acknowledged).
            Err(NoAnswer::Lost(e))
                if Instant::now() < deadline
                    && (e.is_transient() || e.code() == Some(ErrorCode::SESSION_REPLACED)) =>
            {
                drop(conn);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(NoAnswer::Lost(e)) => return Err(e.into()),
            Err(NoAnswer::Failed(e)) => return Err(e),
            Err(NoAnswer::Timeout { request, others }) => {
                conn.close().await;
                let waiting = match others {
                    0 => String::new(),
                    n => format!(" ({n} other message(s) came first; they wait for `iim listen`)"),
                };
                bail!(
                    "no answer from the groups plugin to request {request} within {} s{waiting}",
                    timeout.as_secs()
                );
            }
        }
    }
}

/// The members of `group` (owner first), asked of the groups plugin on `conn`, a delivery
/// session of `me` (for `iim e2e group`, which holds the deliveries already).
pub(crate) async fn members(
    conn: &Connection,
    me: &UserId,
    group: &GroupId,
    deadline: Instant,
) -> anyhow::Result<Vec<GroupMember>> {
    let asked = Asked {
        client_id: iim_client::new_client_id(),
        to: Address::Group(group.clone()),
        request: GroupRequest::Members,
        me: me.clone(),
    };
    let parts = match ask(conn, &asked, deadline).await {
        Ok(outcome) => outcome.map_err(|reason| anyhow!("#{group}: refused: {reason}"))?,
        Err(NoAnswer::Lost(e)) => return Err(e.into()),
        Err(NoAnswer::Failed(e)) => return Err(e),
        Err(NoAnswer::Timeout { request, .. }) => {
            bail!("no answer from the groups plugin to request {request} for #{group}'s members")
        }
    };
    match merge(parts) {
        Some(GroupReply::Members { members, .. }) => Ok(members),
        other => bail!("unexpected answer from the groups plugin: {other:?}"),
    }
}

/// A request, as `ask` submits it.
struct Asked {
    /// Its idempotency id, the same on every connection.
    client_id: u64,
    /// The group, or for `list` the user.
    to: Address,
    request: GroupRequest,
    /// The user asking.
    me: UserId,
}

/// Submits the request (once per connection; the host takes a repeat of `client_id` as the
/// same request) and waits until `deadline` for its answer: a refusal, or the reply's parts
/// and then `done`. What it acknowledges, and why no more: see the module's documentation.
async fn ask(conn: &Connection, asked: &Asked, deadline: Instant) -> Result<Outcome, NoAnswer> {
    let body = asked.request.to_json();
    let submit = conn.submit(
        asked.client_id,
        MessageKind::Custom(GROUP_KIND.into()),
        std::slice::from_ref(&asked.to),
        &body,
    );
    let accepted = match tokio::time::timeout_at(deadline, submit).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) if e.is_transient() || e.code() == Some(ErrorCode::SESSION_REPLACED) => {
            return Err(NoAnswer::Lost(e));
        }
        Ok(Err(e)) => return Err(NoAnswer::Failed(e.into())),
        Err(_) => {
            return Err(NoAnswer::Failed(anyhow!(
                "the host did not take the request in time"
            )));
        }
    };
    let mut parts = Vec::new();
    let mut others = 0;
    loop {
        let event = match tokio::time::timeout_at(deadline, conn.next_event()).await {
            Ok(event) => event,
            Err(_) => {
                return Err(NoAnswer::Timeout {
                    request: accepted.id,
                    others,
                });
            }
        };
        let (seq, message) = match event {
            Some(Ok(Event::Message { seq, message })) => (seq, message),
            Some(Ok(Event::Synced { .. } | Event::Backlog { .. })) => continue,
            Some(Err(e)) => return Err(NoAnswer::Lost(e)),
            None => {
                return Err(NoAnswer::Lost(ClientError::ConnectionLost(
                    "the connection ended".into(),
                )));
            }
        };
        let answer = answer_to(&message, accepted.id);
        if answer.is_none() && !is_own_presence_snapshot(&message, &asked.me) {
            others += 1;
        }
        if others == 0 {
            // Not needed for the answer: if it fails, `listen` shows one line more.
            let _ = conn.ack(seq).await;
        }
        match answer {
            Some(Answer::Part(part)) => parts.push(part),
            Some(Answer::Done) => return Ok(Ok(parts)),
            Some(Answer::Refused(reason)) => return Ok(Err(reason)),
            None => {}
        }
    }
}

/// Whether `message` is the presence snapshot that a session of `me` gets as it opens (from
/// `me`, about their contacts), rather than news of a contact.
fn is_own_presence_snapshot(message: &Message, me: &UserId) -> bool {
    message.kind == MessageKind::Presence && message.from == *me
}

/// The parts of a reply as one: the lists of the parts one after the other. `None` for no
/// parts, or parts of different kinds (not a reply this client knows how to put together).
fn merge(parts: Vec<GroupReply>) -> Option<GroupReply> {
    let mut parts = parts.into_iter();
    let mut whole = parts.next()?;
    for part in parts {
        match (&mut whole, part) {
            (GroupReply::Members { members, .. }, GroupReply::Members { members: more, .. }) => {
                members.extend(more)
            }
            (GroupReply::List { groups, .. }, GroupReply::List { groups: more, .. }) => {
                groups.extend(more);
            }
            (
                GroupReply::Receipts {
                    delivered, read, ..
                },
                GroupReply::Receipts {
                    delivered: more_delivered,
                    read: more_read,
                    ..
                },
            ) => {
                delivered.extend(more_delivered);
                read.extend(more_read);
            }
            _ => return None,
        }
    }
    Some(whole)
}

/// Prints the answer to `op`, or fails with the plugin's reason.
fn print(json: bool, op: &GroupCommand, outcome: Outcome) -> anyhow::Result<()> {
    let parts = outcome.map_err(|reason| anyhow!("refused: {reason}"))?;
    let reply =
        match parts.len() {
            0 => None,
            _ => Some(merge(parts).ok_or_else(|| {
                anyhow!("the groups plugin answered with parts of different kinds")
            })?),
        };
    if json {
        // The reply (`done` for a change), with what it answers.
        let mut object = match &reply {
            Some(reply) => serde_json::to_value(reply)?,
            None => serde_json::json!({ "reply": "done" }),
        };
        object["op"] = op.op().into();
        if let Some(group) = op.group()
            && object.get("group").is_none()
        {
            object["group"] = group.to_string().into();
        }
        println!("{object}");
        return Ok(());
    }
    let lines = match &reply {
        Some(reply) => reply_lines(op, reply),
        None => vec![op.done_text()],
    };
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// What `iim group` prints for a reply, one entry a line.
fn reply_lines(op: &GroupCommand, reply: &GroupReply) -> Vec<String> {
    match reply {
        GroupReply::Done { .. } => vec![op.done_text()],
        GroupReply::Members { members, .. } => {
            let width = members.iter().map(|m| m.user.len()).max().unwrap_or(0);
            members
                .iter()
                .map(|m| format!("{:width$}  {}", m.user, m.role))
                .collect()
        }
        GroupReply::List { groups, .. } => groups.iter().map(summary_text).collect(),
        GroupReply::Receipts {
            id,
            members,
            delivered,
            read,
            ..
        } => {
            let group = op.group().map_or_else(String::new, |g| format!(" in #{g}"));
            vec![
                format!(
                    "message {id}{group}: delivered to {} of {members}, read by {}",
                    delivered.len(),
                    read.len()
                ),
                format!("delivered: {}", delivered.join(", ")),
                format!("read: {}", read.join(", ")),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;
    use iim_client::proto::DeviceId;
    use iim_client::proto::body::{GroupMember, GroupSummary};

    fn parse(args: &[&str]) -> Result<GroupArgs, clap::Error> {
        let cli = Cli::try_parse_from([&["iim", "group"], args].concat())?;
        match cli.command {
            Command::Group(args) => Ok(args),
            other => panic!("not group: {other:?}"),
        }
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("name")
    }

    fn team() -> GroupId {
        GroupId::new("team").expect("name")
    }

    #[test]
    fn a_group_is_named_with_or_without_its_hash() {
        assert_eq!(parse_group("team"), Ok(team()));
        assert_eq!(parse_group("#team"), Ok(team()));
        assert!(parse_group("##team").is_err());
        assert!(parse_group("#").is_err());
        assert!(parse_group("Team").is_err());
    }

    #[test]
    fn each_command_is_a_request_to_its_group() {
        let me = user("alice");
        let request = |args: &[&str]| {
            let args = parse(args).expect("parses");
            args.op.request(&me)
        };
        let team = Address::Group(team());
        assert_eq!(
            request(&["create", "#team", "--title", "The team", "bob", "carol"]),
            (
                team.clone(),
                GroupRequest::Create {
                    title: "The team".into(),
                    members: vec!["bob".into(), "carol".into()]
                }
            )
        );
        assert_eq!(
            request(&["create", "team"]),
            (
                team.clone(),
                GroupRequest::Create {
                    title: String::new(),
                    members: vec![]
                }
            )
        );
        assert_eq!(
            request(&["rename", "team", "Night shift"]),
            (
                team.clone(),
                GroupRequest::Rename {
                    title: "Night shift".into()
                }
            )
        );
        assert_eq!(
            request(&["delete", "team"]),
            (team.clone(), GroupRequest::Delete)
        );
        assert_eq!(
            request(&["add", "team", "bob", "carol"]),
            (
                team.clone(),
                GroupRequest::Add {
                    users: vec!["bob".into(), "carol".into()]
                }
            )
        );
        assert_eq!(
            request(&["remove", "#team", "bob"]),
            (
                team.clone(),
                GroupRequest::Remove {
                    users: vec!["bob".into()]
                }
            )
        );
        assert_eq!(
            request(&["leave", "team"]),
            (team.clone(), GroupRequest::Leave)
        );
        assert_eq!(
            request(&["members", "team"]),
            (team.clone(), GroupRequest::Members)
        );
        assert_eq!(
            request(&["role", "team", "bob", "admin"]),
            (
                team.clone(),
                GroupRequest::Role {
                    user: "bob".into(),
                    role: GroupRole::Admin
                }
            )
        );
        assert_eq!(
            request(&["receipts", "team", "42"]),
            (team, GroupRequest::Receipts { id: 42 })
        );
        // `list` asks about the user: it goes to the user.
        assert_eq!(
            request(&["list"]),
            (Address::User(me.clone()), GroupRequest::List)
        );
        assert_eq!(
            parse(&["list"]).expect("parses").timeout.duration(),
            Duration::from_secs(10)
        );
        assert_eq!(
            parse(&["members", "team", "--timeout", "3"])
                .expect("parses")
                .timeout
                .duration(),
            Duration::from_secs(3)
        );
        for bad in [
            &["add", "team"][..],
            &["role", "team", "bob", "king"],
            &["members", "Team"],
            &["members", "team", "--timeout", "0"],
            &["receipts", "team", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parses");
        }
    }

    /// A message of `kind` with `body` to alice.
    fn message(kind: MessageKind, body: &str) -> Message {
        Message {
            id: MessageId(50),
            kind,
            from: user("alice"),
            from_device: DeviceId::new("phone").expect("name"),
            to: vec![user("alice").into()],
            body: body.as_bytes().to_vec(),
            sent_at: 0,
        }
    }

    #[test]
    fn the_answer_is_the_reply_or_refusal_naming_the_request() {
        let group = MessageKind::Custom(GROUP_KIND.into());
        let request = MessageId(42);
        let done = message(group.clone(), r#"{"reply":"done","request":42}"#);
        assert_eq!(answer_to(&done, request), Some(Answer::Done));
        let part = message(
            group.clone(),
            r#"{"reply":"list","request":42,"groups":[],"later":1}"#,
        );
        assert_eq!(
            answer_to(&part, request),
            Some(Answer::Part(GroupReply::List {
                request: 42,
                groups: vec![]
            }))
        );
        let refused = message(
            MessageKind::Receipt,
            r#"{"state":"refused","id":42,"users":[],"reason":"you are not a member of #team"}"#,
        );
        assert_eq!(
            answer_to(&refused, request),
            Some(Answer::Refused("you are not a member of #team".into()))
        );
        // Answers to other requests, notices, other receipts and chat are not it.
        for (kind, body) in [
            (group.clone(), r#"{"reply":"done","request":41}"#),
            (group.clone(), r#"{"event":"left"}"#),
            (group, "not json"),
            (
                MessageKind::Receipt,
                r#"{"state":"refused","id":41,"users":[],"reason":"no"}"#,
            ),
            (
                MessageKind::Receipt,
                r#"{"state":"delivered","id":42,"user":"bob","device":"phone"}"#,
            ),
            (MessageKind::Chat, r#"{"reply":"done","request":42}"#),
        ] {
            assert_eq!(answer_to(&message(kind, body), request), None, "{body}");
        }
    }

    #[test]
    fn the_parts_of_a_reply_are_put_together() {
        let member = |user: &str| GroupMember {
            user: user.into(),
            role: GroupRole::Member,
        };
        let members = |users: &[&str]| GroupReply::Members {
            request: 1,
            group: "team".into(),
            title: "The team".into(),
            members: users.iter().map(|u| member(u)).collect(),
        };
        assert_eq!(
            merge(vec![members(&["alice", "bob"]), members(&["carol"])]),
            Some(members(&["alice", "bob", "carol"]))
        );
        let receipts = |delivered: &[&str], read: &[&str]| GroupReply::Receipts {
            request: 1,
            id: 12,
            members: 3,
            delivered: delivered.iter().map(|u| u.to_string()).collect(),
            read: read.iter().map(|u| u.to_string()).collect(),
        };
        assert_eq!(
            merge(vec![
                receipts(&["bob"], &["bob"]),
                receipts(&["carol"], &[])
            ]),
            Some(receipts(&["bob", "carol"], &["bob"]))
        );
        let list = GroupReply::List {
            request: 1,
            groups: vec![],
        };
        assert_eq!(merge(vec![list.clone()]), Some(list.clone()));
        assert_eq!(merge(vec![]), None);
        assert_eq!(merge(vec![list, members(&["bob"])]), None);
    }

    #[test]
    fn replies_print_plainly() {
        let op = |args: &[&str]| parse(args).expect("parses").op;
        let done = GroupReply::Done { request: 1 };
        assert_eq!(
            reply_lines(&op(&["create", "team", "bob"]), &done),
            ["created #team"]
        );
        assert_eq!(
            reply_lines(&op(&["add", "team", "bob", "carol"]), &done),
            ["added bob, carol to #team"]
        );
        assert_eq!(
            reply_lines(&op(&["remove", "team", "bob"]), &done),
            ["removed bob from #team"]
        );
        assert_eq!(
            reply_lines(&op(&["rename", "team", "Night shift"]), &done),
            [r#"renamed #team "Night shift""#]
        );
        assert_eq!(
            reply_lines(&op(&["role", "team", "bob", "owner"]), &done),
            ["made bob owner of #team"]
        );
        assert_eq!(reply_lines(&op(&["leave", "team"]), &done), ["left #team"]);
        assert_eq!(
            reply_lines(&op(&["delete", "team"]), &done),
            ["deleted #team"]
        );

        let members = GroupReply::Members {
            request: 1,
            group: "team".into(),
            title: "The team".into(),
            members: vec![
                GroupMember {
                    user: "alice".into(),
                    role: GroupRole::Owner,
                },
                GroupMember {
                    user: "bob".into(),
                    role: GroupRole::Member,
                },
            ],
        };
        assert_eq!(
            reply_lines(&op(&["members", "team"]), &members),
            ["alice  owner", "bob    member"]
        );
        let list = GroupReply::List {
            request: 1,
            groups: vec![
                GroupSummary {
                    group: "team".into(),
                    title: "The team".into(),
                    role: GroupRole::Owner,
                    members: 2,
                },
                GroupSummary {
                    group: "ops".into(),
                    title: String::new(),
                    role: GroupRole::Member,
                    members: 1,
                },
            ],
        };
        assert_eq!(
            reply_lines(&op(&["list"]), &list),
            [
                "#team (owner, 2 members) The team",
                "#ops (member, 1 member)"
            ]
        );
        let receipts = GroupReply::Receipts {
            request: 1,
            id: 12,
            members: 3,
            delivered: vec!["bob".into(), "carol".into()],
            read: vec!["bob".into()],
        };
        assert_eq!(
            reply_lines(&op(&["receipts", "team", "12"]), &receipts),
            [
                "message 12 in #team: delivered to 2 of 3, read by 1",
                "delivered: bob, carol",
                "read: bob"
            ]
        );
    }
}
