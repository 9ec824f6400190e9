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
    fn decoding_validates() {
        let bytes = postcard::to_stdvec(&"Bad Name".to_string()).expect("encode");
        assert!(postcard::from_bytes::<UserId>(&bytes).is_err());
    }
}
