//! Group requests: a `group` message addressed to the group (or, for `list`, to the
//! requester), whose body is a [`GroupRequest`]. Each request is checked in full before
//! anything is written or sent: a refusal leaves the group as it was.

use crate::answer::{self, Failure, refused};
use crate::cleanup::{self, Job};
use crate::conversation::KEEP_RECEIPTS;
use crate::store::{GroupRecord, Mark, Storage};
use iim_plugin_sdk::body::{
    GroupMember, GroupNotice, GroupReply, GroupRequest, GroupRole, GroupSummary,
};
use iim_plugin_sdk::{HostError, Message, MessageId, PluginError, UserId, host};

/// Most users one request (`create`, `add`, `remove`) names: each takes two storage writes,
/// and an event may make 256.
pub const MAX_USERS_PER_REQUEST: usize = 100;
/// The longest title, in bytes.
pub const MAX_TITLE: usize = 200;
/// Members per `members` reply: an entry is at most about 90 bytes, so a reply stays under
/// the host's default body limit of 32 KiB, and 10,000 members take 34 replies of the 64
/// sends an event may make.
const MEMBERS_PER_REPLY: usize = 300;
/// Groups per `list` reply: an entry is at most about 330 bytes.
const GROUPS_PER_REPLY: usize = 80;
/// Names per `receipts` reply: a name is at most 67 bytes in JSON.
const NAMES_PER_REPLY: usize = 400;

/// The plugin's configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Members per group, the owner included.
    pub max_members: u32,
    /// Groups per user.
    pub max_groups: u32,
}

/// A request addressed to group `group`.
pub fn to_group(
    limits: Limits,
    store: &mut Storage,
    group: &str,
    request: &Message,
) -> Result<(), Failure> {
    let op = GroupRequest::from_json(&request.body).or_else(|e| {
        refused(format!(
            "a group message to #{group} is a request, {{\"op\":..}}: {e}"
        ))
    })?;
    let acting = |store| Acting::load(limits, store, group, request);
    match op {
        GroupRequest::Create { title, members } => {
            create(limits, store, group, request, title, members)
        }
        GroupRequest::List => refused(format!(
            "list is addressed to yourself ({}), not to #{group}",
            request.sender
        )),
        GroupRequest::Rename { title } => acting(store)?.rename(title),
        GroupRequest::Delete => acting(store)?.delete(),
        GroupRequest::Add { users } => acting(store)?.add(users),
        GroupRequest::Remove { users } => acting(store)?.remove(users),
        GroupRequest::Leave => acting(store)?.leave(),
        GroupRequest::Role { user, role } => acting(store)?.set_role(user, role),
        GroupRequest::Members => acting(store)?.members(),
        GroupRequest::Receipts { id } => acting(store)?.receipts(id),
        GroupRequest::Forget { next } => forget(store, group, request, next),
    }
}

/// Most groups one chain of `forget` requests goes through: the first and 62 `next`, so that
/// the 64 chains one event may start (one send each) cover [`crate::MAX_GROUPS`].
const FORGET_CHAIN: usize = 63;
const _: () = assert!(64 * FORGET_CHAIN >= crate::MAX_GROUPS as usize);

/// The host's notice that `user`'s account was deleted, in the user's order: a `forget`
/// request goes through each of the user's groups in turn, in that group's order (a group's
/// keys are written by its own events only), in chains of [`FORGET_CHAIN`]. Every index
/// entry counts, of deleted groups too: each is the group's to remove.
pub fn forget_everywhere(store: &mut Storage, user: &str) -> Result<(), PluginError> {
    let groups = store.all_under(&crate::store::keys::user_groups(user))?;
    for chain in groups.chunks(FORGET_CHAIN) {
        if let Some((first, next)) = chain.split_first() {
            answer::request(
                first,
                &GroupRequest::Forget {
                    next: next.to_vec(),
                },
            )?;
        }
    }
    Ok(())
}

/// `forget`: the deleted user leaves `group` (an owner hands it on, or deletes it if alone),
/// their index entry of it goes, then the request goes on to the next group.
fn forget(
    store: &mut Storage,
    group: &str,
    request: &Message,
    next: Vec<String>,
) -> Result<(), Failure> {
    let me = request.sender.clone();
    match host::resolve(std::slice::from_ref(&me)) {
        Err(HostError::UnknownUser(_)) => {}
        Ok(_) => return refused("forget is the host's, for a deleted account; leave instead"),
        Err(e) => return Err(e.into()),
    }
    if next.len() >= FORGET_CHAIN || next.iter().any(|g| !valid_user(g)) {
        return refused("forget names at most 62 more groups, by name");
    }
    if let Some(record) = store.group(group)?
        && let Some(role) = store.role(group, record.generation, &me)?
    {
        without(store, group, record, role, &me)?;
    }
    // Whatever generation it names (a deleted group's entry too): the group's key to remove.
    store.delete(&crate::store::keys::user_group(&me, group))?;
    if let Some((first, rest)) = next.split_first() {
        answer::request(
            first,
            &GroupRequest::Forget {
                next: rest.to_vec(),
            },
        )?;
    }
    Ok(())
}

/// Takes `me` (a deleted account, of role `role`) out of `group`: the members are told; an
/// owner's group goes to its first admin by name, else its first member, else it is deleted.
fn without(
    store: &mut Storage,
    group: &str,
    mut record: GroupRecord,
    role: GroupRole,
    me: &str,
) -> Result<(), Failure> {
    let generation = record.generation;
    let others: Vec<UserId> = store
        .members(group, generation)?
        .into_iter()
        .filter(|member| member != me)
        .collect();
    store.remove_member(group, generation, me)?;
    if others.is_empty() {
        store.delete_group(group)?;
        cleanup::add(store, group, Job::Generation { generation })?;
        return Ok(());
    }
    record.members = record.members.saturating_sub(1);
    let mut notices = vec![GroupNotice::Left];
    if role == GroupRole::Owner {
        let mut successor = None;
        for member in &others {
            if store.role(group, generation, member)? == Some(GroupRole::Admin) {
                successor = Some(member.clone());
                break;
            }
        }
        let successor = successor.unwrap_or_else(|| others[0].clone());
        store.set_role(group, generation, &successor, GroupRole::Owner)?;
        record.owner = successor.clone();
        notices.push(GroupNotice::Role {
            user: successor,
            role: GroupRole::Owner,
        });
    }
    store.save_group(group, &record)?;
    for notice in &notices {
        answer::notice(group, &others, notice)?;
    }
    Ok(())
}

/// A `group` message addressed to users, not to a group: only `list`, addressed to the
/// requester themself, is one.
pub fn to_self(store: &mut Storage, request: &Message) -> Result<(), Failure> {
    let me = &request.sender;
    if !matches!(request.to.as_slice(), [only] if only == me) {
        return refused(
            "a group request is addressed to its group (#name), or, for list, to yourself only",
        );
    }
    match GroupRequest::from_json(&request.body) {
        Ok(GroupRequest::List) => list(store, request),
        Ok(op) => refused(format!(
            "{} is addressed to the group (#name), not to yourself",
            op_name(&op)
        )),
        Err(e) => refused(format!(
            "a group message to yourself is a request, {{\"op\":\"list\"}}: {e}"
        )),
    }
}

fn op_name(op: &GroupRequest) -> &'static str {
    match op {
        GroupRequest::Create { .. } => "create",
        GroupRequest::Rename { .. } => "rename",
        GroupRequest::Delete => "delete",
        GroupRequest::Add { .. } => "add",
        GroupRequest::Remove { .. } => "remove",
        GroupRequest::Leave => "leave",
        GroupRequest::Role { .. } => "role",
        GroupRequest::Members => "members",
        GroupRequest::List => "list",
        GroupRequest::Receipts { .. } => "receipts",
        GroupRequest::Forget { .. } => "forget",
    }
}

/// `list`: the requester's groups, by name.
fn list(store: &mut Storage, request: &Message) -> Result<(), Failure> {
    let me = &request.sender;
    let mut groups = Vec::new();
    for group in store.all_under(&crate::store::keys::user_groups(me))? {
        // Entries of deleted groups stay until their cleanup; they are not the user's.
        let Some(record) = store.live_entry(me, &group)? else {
            continue;
        };
        if let Some(role) = store.role(&group, record.generation, me)? {
            groups.push(GroupSummary {
                group,
                title: record.title,
                role,
                members: record.members,
            });
        }
    }
    answer::in_parts(request, &groups, GROUPS_PER_REPLY, |part| {
        GroupReply::List {
            request: request.id,
            groups: part.to_vec(),
        }
    })?;
    Ok(())
}

/// `create`: the group must not exist; the requester owns it, and `members` (who must exist)
/// are its members.
fn create(
    limits: Limits,
    store: &mut Storage,
    group: &str,
    request: &Message,
    title: String,
    members: Vec<String>,
) -> Result<(), Failure> {
    let me = &request.sender;
    if let Some(record) = store.group(group)? {
        // This very request, handled again (the host restarted before it recorded that it
        // had been): what it sent then was sent.
        if record.generation == request.id {
            return Ok(());
        }
        return refused(format!("#{group} already exists"));
    }
    let title = title_of(group, title)?;
    let mut users = users_of(group, members)?;
    users.retain(|user| user != me);
    let total = users.len() + 1;
    if total > limits.max_members as usize {
        return refused(format!(
            "#{group} would have {total} members; a group has at most {}",
            limits.max_members
        ));
    }
    existing(&users)?;
    for user in std::iter::once(me).chain(&users) {
        in_room(store, limits, user)?;
    }
    let generation = request.id;
    let record = GroupRecord {
        title: title.clone(),
        owner: me.clone(),
        members: count(total),
        generation,
        tracked: 0,
        tracked_ever: 0,
    };
    store.save_group(group, &record)?;
    store.add_member(group, generation, me, GroupRole::Owner)?;
    for user in &users {
        store.add_member(group, generation, user, GroupRole::Member)?;
    }
    let mut all = vec![me.clone()];
    all.extend(users);
    let created = GroupNotice::Created {
        title,
        members: all.clone(),
    };
    answer::notice(group, &all, &created)?;
    answer::done(request)?;
    Ok(())
}

/// A request about an existing group, from one of its members.
struct Acting<'a> {
    limits: Limits,
    store: &'a mut Storage,
    group: &'a str,
    record: GroupRecord,
    /// The requester's role.
    role: GroupRole,
    request: &'a Message,
}

impl<'a> Acting<'a> {
    /// The group and the requester's role in it; refused if there is no such group or the
    /// requester is not a member.
    fn load(
        limits: Limits,
        store: &'a mut Storage,
        group: &'a str,
        request: &'a Message,
    ) -> Result<Self, Failure> {
        let Some(record) = store.group(group)? else {
            return refused(format!("there is no group #{group}"));
        };
        let Some(role) = store.role(group, record.generation, &request.sender)? else {
            return refused(format!("you are not a member of #{group}"));
        };
        Ok(Self {
            limits,
            store,
            group,
            record,
            role,
            request,
        })
    }

    fn me(&self) -> &UserId {
        &self.request.sender
    }

    fn generation(&self) -> u64 {
        self.record.generation
    }

    /// Every member now.
    fn all_members(&self) -> Result<Vec<UserId>, HostError> {
        self.store.members(self.group, self.generation())
    }

    fn role_of(&self, user: &str) -> Result<Option<GroupRole>, Failure> {
        Ok(self.store.role(self.group, self.generation(), user)?)
    }

    /// Refused unless the requester is the owner or an admin.
    fn managers_only(&self, what: &str) -> Result<(), Failure> {
        match self.role {
            GroupRole::Owner | GroupRole::Admin => Ok(()),
            GroupRole::Member => refused(format!(
                "only the owner and admins of #{} may {what}",
                self.group
            )),
        }
    }

    /// Refused unless the requester is the owner.
    fn owner_only(&self, what: &str) -> Result<(), Failure> {
        match self.role {
            GroupRole::Owner => Ok(()),
            GroupRole::Admin | GroupRole::Member => {
                refused(format!("only the owner of #{} may {what}", self.group))
            }
        }
    }

    fn save(&mut self) -> Result<(), Failure> {
        Ok(self.store.save_group(self.group, &self.record)?)
    }

    fn rename(mut self, title: String) -> Result<(), Failure> {
        self.managers_only("rename it")?;
        let title = title_of(self.group, title)?;
        self.record.title = title.clone();
        self.save()?;
        let members = self.all_members()?;
        answer::notice(self.group, &members, &GroupNotice::Renamed { title })?;
        answer::done(self.request)?;
        Ok(())
    }

    fn delete(self) -> Result<(), Failure> {
        self.owner_only("delete it")?;
        let members = self.all_members()?;
        answer::notice(self.group, &members, &GroupNotice::Deleted)?;
        // The record goes now; the members' keys go with the cleanup, which starts at once.
        self.store.delete_group(self.group)?;
        cleanup::add(
            self.store,
            self.group,
            Job::Generation {
                generation: self.generation(),
            },
        )?;
        answer::done(self.request)?;
        Ok(())
    }

    fn add(mut self, users: Vec<String>) -> Result<(), Failure> {
        self.managers_only("add members")?;
        let mut added = Vec::new();
        for user in users_of(self.group, users)? {
            if self.role_of(&user)?.is_none() {
                added.push(user);
            }
        }
        if added.is_empty() {
            answer::done(self.request)?;
            return Ok(());
        }
        let total = self.record.members as usize + added.len();
        if total > self.limits.max_members as usize {
            return refused(format!(
                "#{} has {} members; adding {} would pass the limit of {}",
                self.group,
                self.record.members,
                added.len(),
                self.limits.max_members
            ));
        }
        existing(&added)?;
        for user in &added {
            in_room(self.store, self.limits, user)?;
        }
        let mut members = self.all_members()?;
        for user in &added {
            self.store
                .add_member(self.group, self.generation(), user, GroupRole::Member)?;
        }
        self.record.members = count(total);
        self.save()?;
        members.extend(added.iter().cloned());
        answer::notice(self.group, &members, &GroupNotice::Added { users: added })?;
        answer::done(self.request)?;
        Ok(())
    }

    fn remove(mut self, users: Vec<String>) -> Result<(), Failure> {
        self.managers_only("remove members")?;
        let mut removed = Vec::new();
        for user in users_of(self.group, users)? {
            if user == *self.me() {
                return refused(format!(
                    "you cannot remove yourself from #{}: leave it (an owner hands it on first)",
                    self.group
                ));
            }
            match (self.role, self.role_of(&user)?) {
                // Not a member: nothing to do.
                (_, None) => {}
                (GroupRole::Owner, Some(_)) | (GroupRole::Admin, Some(GroupRole::Member)) => {
                    removed.push(user);
                }
                (_, Some(theirs)) => {
                    return refused(format!(
                        "an admin of #{} removes members only, and {user} is {}",
                        self.group,
                        if theirs == GroupRole::Owner {
                            "its owner"
                        } else {
                            "an admin"
                        }
                    ));
                }
            }
        }
        if removed.is_empty() {
            answer::done(self.request)?;
            return Ok(());
        }
        // Told before they go: the removed learn it too.
        let members = self.all_members()?;
        for user in &removed {
            self.store
                .remove_member(self.group, self.generation(), user)?;
        }
        self.record.members = self.record.members.saturating_sub(count(removed.len()));
        self.save()?;
        answer::notice(
            self.group,
            &members,
            &GroupNotice::Removed { users: removed },
        )?;
        answer::done(self.request)?;
        Ok(())
    }

    fn leave(mut self) -> Result<(), Failure> {
        if self.role == GroupRole::Owner {
            return refused(format!(
                "the owner cannot leave #{}: hand it on first (role owner) or delete it",
                self.group
            ));
        }
        let members = self.all_members()?;
        let me = self.me().clone();
        self.store
            .remove_member(self.group, self.generation(), &me)?;
        self.record.members = self.record.members.saturating_sub(1);
        self.save()?;
        answer::notice(self.group, &members, &GroupNotice::Left)?;
        answer::done(self.request)?;
        Ok(())
    }

    fn set_role(mut self, user: String, role: GroupRole) -> Result<(), Failure> {
        self.owner_only("change roles")?;
        if user == *self.me() {
            return refused(format!(
                "you cannot change your own role in #{}: to hand it on, make another member \
                 its owner",
                self.group
            ));
        }
        let Some(theirs) = valid_user(&user)
            .then(|| self.role_of(&user))
            .transpose()?
            .flatten()
        else {
            return refused(format!("{user} is not a member of #{}", self.group));
        };
        if theirs == role {
            answer::done(self.request)?;
            return Ok(());
        }
        let generation = self.generation();
        self.store.set_role(self.group, generation, &user, role)?;
        let mut notices = vec![GroupNotice::Role {
            user: user.clone(),
            role,
        }];
        if role == GroupRole::Owner {
            // Handed on: the old owner stays, as an admin.
            let me = self.me().clone();
            self.store
                .set_role(self.group, generation, &me, GroupRole::Admin)?;
            self.record.owner = user;
            self.save()?;
            notices.push(GroupNotice::Role {
                user: me,
                role: GroupRole::Admin,
            });
        }
        let members = self.all_members()?;
        for notice in &notices {
            answer::notice(self.group, &members, notice)?;
        }
        answer::done(self.request)?;
        Ok(())
    }

    fn members(self) -> Result<(), Failure> {
        let mut members = Vec::new();
        for user in self.all_members()? {
            if let Some(role) = self.role_of(&user)? {
                members.push(GroupMember { user, role });
            }
        }
        // The owner, then admins, then members, each by name.
        members.sort_by(|a, b| (a.role, &a.user).cmp(&(b.role, &b.user)));
        answer::in_parts(self.request, &members, MEMBERS_PER_REPLY, |part| {
            GroupReply::Members {
                request: self.request.id,
                group: self.group.to_owned(),
                title: self.record.title.clone(),
                members: part.to_vec(),
            }
        })?;
        Ok(())
    }

    fn receipts(self, id: MessageId) -> Result<(), Failure> {
        let generation = self.generation();
        let Some(tracked) = self.store.tracked(self.group, generation, id)? else {
            return refused(format!(
                "#{} has no counts of message {id}: it keeps them for its latest \
                 {KEEP_RECEIPTS} messages",
                self.group
            ));
        };
        if tracked.sender != *self.me() {
            return refused(format!(
                "only the sender of message {id} may ask who in #{} got and read it",
                self.group
            ));
        }
        let mut names: Vec<(Mark, UserId)> = Vec::new();
        for mark in [Mark::Delivered, Mark::Read] {
            for user in self.store.marked(self.group, generation, id, mark)? {
                names.push((mark, user));
            }
        }
        let with = |part: &[(Mark, UserId)], mark: Mark| -> Vec<UserId> {
            part.iter()
                .filter(|(m, _)| *m == mark)
                .map(|(_, user)| user.clone())
                .collect()
        };
        answer::in_parts(self.request, &names, NAMES_PER_REPLY, |part| {
            GroupReply::Receipts {
                request: self.request.id,
                id,
                members: tracked.members,
                delivered: with(part, Mark::Delivered),
                read: with(part, Mark::Read),
            }
        })?;
        Ok(())
    }
}

/// A title as given, or the group's name if empty; refused if too long.
fn title_of(group: &str, title: String) -> Result<String, Failure> {
    if title.len() > MAX_TITLE {
        return refused(format!(
            "a title of #{group} is at most {MAX_TITLE} bytes; this one is {}",
            title.len()
        ));
    }
    Ok(if title.is_empty() {
        group.to_owned()
    } else {
        title
    })
}

/// The users a request names, each once, in order; refused if they are too many or a name is
/// not a user's.
fn users_of(group: &str, users: Vec<String>) -> Result<Vec<UserId>, Failure> {
    if users.len() > MAX_USERS_PER_REQUEST {
        return refused(format!(
            "a request to #{group} names at most {MAX_USERS_PER_REQUEST} users; this one names {}",
            users.len()
        ));
    }
    let mut unique: Vec<UserId> = Vec::with_capacity(users.len());
    for user in users {
        if !valid_user(&user) {
            return refused(format!(
                "{user:?} is not a user name (1 to 64 bytes of a-z 0-9 . _ -)"
            ));
        }
        if !unique.contains(&user) {
            unique.push(user);
        }
    }
    Ok(unique)
}

/// Whether `name` may be a user's: what the host accepts, so that it is safe in a key.
fn valid_user(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Refused unless every one of `users` exists.
fn existing(users: &[UserId]) -> Result<(), Failure> {
    if users.is_empty() {
        return Ok(());
    }
    match host::resolve(users) {
        Ok(_) => Ok(()),
        Err(HostError::UnknownUser(user)) => refused(format!("there is no user {user}")),
        Err(HostError::InvalidArgument(why)) => refused(why),
        Err(e) => Err(e.into()),
    }
}

/// Refused if `user` is in as many groups as a user may be.
fn in_room(store: &Storage, limits: Limits, user: &str) -> Result<(), Failure> {
    if !store.in_max_groups(user, limits.max_groups)? {
        return Ok(());
    }
    refused(format!(
        "{user} is in {} groups already, the most a user may be in",
        limits.max_groups
    ))
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
