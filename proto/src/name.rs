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
    fn decoding_validates() {
        let bytes = postcard::to_stdvec(&"Bad Name".to_string()).expect("encode");
        assert!(postcard::from_bytes::<UserId>(&bytes).is_err());
    }
}
