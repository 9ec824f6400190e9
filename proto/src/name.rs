//! User and device names, validated in one place so host and client agree.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a user or device name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name is longer than the limit.
    #[error("name is longer than {max} bytes")]
    TooLong {
        /// The limit, in bytes.
        max: usize,
    },
    /// The name holds a character outside `a-z 0-9 . _ -`.
    #[error("name may hold only lowercase letters, digits, '.', '_' and '-' (found {found:?})")]
    BadCharacter {
        /// The first character refused.
        found: char,
    },
}

const MAX_NAME: usize = 64;

fn check(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong { max: MAX_NAME });
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        Some(found) => Err(NameError::BadCharacter { found }),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `name`: 1 to 64 bytes of `a-z 0-9 . _ -`.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                check(&name)?;
                Ok(Self(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(name: String) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(name: &str) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A user's name, unique on its home host. Decoding a frame validates it, so a host never
    /// sees an invalid name past the codec.
    UserId
);
impl UserId {
    /// Which of `parts` partitions this user falls in: the same in every process, on every
    /// machine and in every version (64-bit FNV-1a of the name, modulo `parts`). A host uses
    /// it to spread users' work over parallel lanes while keeping each user's work in one.
    /// `parts` of 0 counts as 1.
    pub fn partition(&self, parts: usize) -> usize {
        (stable_hash(self.as_str().bytes()) % parts.max(1) as u64) as usize
    }
}

/// 64-bit FNV-1a of `bytes`: a hash that never changes between builds, machines or versions,
/// for values that must stay the same wherever they are computed (a user's lane, a client's
/// idempotency id).
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.into_iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

name_type!(
    /// A device's name, chosen by the client and unique among one user's devices.
    DeviceId
);

name_type!(
    /// A group's name, without its `#`: unique in the network as a user's name is, in a
    /// namespace of its own (a group and a user may share a name).
    GroupId
);
impl GroupId {
    /// Which of `parts` partitions this group falls in, as [`UserId::partition`] computes a
    /// user's, from the name with its `#`: a host hands each group's events to one lane.
    pub fn partition(&self, parts: usize) -> usize {
        let name = std::iter::once(b'#').chain(self.as_str().bytes());
        (stable_hash(name) % parts.max(1) as u64) as usize
    }
}

/// Whom a message is addressed to: a user (`alice`) or a group (`#team`). On the wire and in
/// JSON it is that text; a message names either users or one group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Address {
    /// A user.
    User(UserId),
    /// A group, written with a leading `#`.
    Group(GroupId),
}

impl Address {
    /// The user, if this names one.
    pub fn user(&self) -> Option<&UserId> {
        match self {
            Self::User(user) => Some(user),
            Self::Group(_) => None,
        }
    }

    /// The group, if this names one.
    pub fn group(&self) -> Option<&GroupId> {
        match self {
            Self::Group(group) => Some(group),
            Self::User(_) => None,
        }
    }
}

impl std::str::FromStr for Address {
    type Err = NameError;
    fn from_str(text: &str) -> Result<Self, NameError> {
        match text.strip_prefix('#') {
            Some(group) => GroupId::new(group).map(Self::Group),
            None => UserId::new(text).map(Self::User),
        }
    }
}

impl TryFrom<String> for Address {
    type Error = NameError;
    fn try_from(text: String) -> Result<Self, NameError> {
        text.parse()
    }
}

impl From<Address> for String {
    fn from(address: Address) -> String {
        address.to_string()
    }
}

impl From<UserId> for Address {
    fn from(user: UserId) -> Self {
        Self::User(user)
    }
}

impl From<GroupId> for Address {
    fn from(group: GroupId) -> Self {
        Self::Group(group)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(user) => user.fmt(f),
            Self::Group(group) => write!(f, "#{group}"),
        }
    }
}

impl PartialEq<UserId> for Address {
    fn eq(&self, user: &UserId) -> bool {
        self.user() == Some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        assert_eq!(
            UserId::new("alice_01.b-c").map(|u| u.to_string()),
            Ok("alice_01.b-c".into())
        );
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(UserId::new(""), Err(NameError::Empty));
        assert_eq!(
            UserId::new("Alice"),
            Err(NameError::BadCharacter { found: 'A' })
        );
        assert_eq!(
            UserId::new("a/b"),
            Err(NameError::BadCharacter { found: '/' })
        );
        assert_eq!(
            DeviceId::new("x".repeat(65)),
            Err(NameError::TooLong { max: 64 })
        );
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        let user = |name: &str| UserId::new(name).expect("valid");
        // Fixed values: a change here moves users between lanes across an upgrade.
        assert_eq!(
            user("alice").partition(8),
            (0x508b_2abb_65a0_3907_u64 % 8) as usize
        );
        assert_eq!(
            user("alice").partition(1000),
            (0x508b_2abb_65a0_3907_u64 % 1000) as usize
        );
        assert_eq!(user("alice").partition(0), 0);
        assert_eq!(user("alice").partition(1), 0);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[user(&format!("u{i}")).partition(8)] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn addresses_read_and_write_as_text() {
        let group: Address = "#team".parse().expect("group");
        assert_eq!(group, Address::Group(GroupId::new("team").expect("valid")));
        assert_eq!(group.to_string(), "#team");
        let user: Address = "team".parse().expect("user");
        assert_eq!(user, Address::User(UserId::new("team").expect("valid")));
        assert_eq!("#".parse::<Address>(), Err(NameError::Empty));
        assert_eq!(
            "##a".parse::<Address>(),
            Err(NameError::BadCharacter { found: '#' })
        );
        // A user address is the same bytes as a user name: stored messages still read.
        let bytes = postcard::to_stdvec(&UserId::new("bob").expect("valid")).expect("encode");
        assert_eq!(
            postcard::from_bytes::<Address>(&bytes).expect("decode"),
            Address::User(UserId::new("bob").expect("valid"))
        );
        let group = GroupId::new("alice").expect("valid");
        assert_ne!(
            group.partition(1000),
            UserId::new("alice").expect("valid").partition(1000)
        );
    }

    #[test]
    fn decoding_validates() {
        let bytes = postcard::to_stdvec(&"Bad Name".to_string()).expect("encode");
        assert!(postcard::from_bytes::<UserId>(&bytes).is_err());
    }
}
