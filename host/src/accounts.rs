//! Passwords and device tokens.
//!
//! Passwords are hashed with argon2id and the `argon2` crate's default parameters (19 MiB, 2
//! passes, 1 lane), and stored as PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
//! A hash is slow on purpose, and needs its 19 MiB of memory: a [`HashMemory`] holds that
//! memory and is reused for every hash and check, so that checking a password allocates
//! nothing (an allocator that is handed 19 MiB per check keeps much of it, per thread, for
//! good). [`crate::hashing`] runs the few threads that own one each. Device tokens are 256
//! random bits, so a fast hash (SHA-256) is enough to keep the stored form useless to a reader
//! of the store.

use argon2::password_hash::{self, Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Shortest password accepted at registration, in characters.
pub const MIN_PASSWORD: usize = 8;
/// Longest password accepted, in bytes: bounds the hashing work a request can cause.
pub const MAX_PASSWORD: usize = 1024;

/// Most memory a stored hash may ask for, in KiB (argon2's `m`). The store holds only hashes
/// this host wrote (19 MiB), but the memory is kept once grown, so a hash asking for more than
/// this never matches rather than make the host allocate whatever a file says.
pub const MAX_HASH_MEMORY_KIB: u32 = 64 * 1024;

/// Why a password was refused at registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Too short.
    #[error("password must be at least {MIN_PASSWORD} characters")]
    TooShort,
    /// Too long.
    #[error("password must be at most {MAX_PASSWORD} bytes")]
    TooLong,
    /// The hasher failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Checks `password` against the password rules (cheap: done before it waits for a hasher).
pub fn check_password(password: &str) -> Result<(), PasswordError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(PasswordError::TooShort);
    }
    if password.len() > MAX_PASSWORD {
        return Err(PasswordError::TooLong);
    }
    Ok(())
}

/// The memory argon2 works in, allocated once and reused by every hash and check made with it.
pub struct HashMemory {
    blocks: Vec<Block>,
}

impl Default for HashMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl HashMemory {
    /// Memory for hashes with the default parameters (19 MiB), allocated and written now, so
    /// that it counts from the start and no hash has to wait for it.
    pub fn new() -> Self {
        Self {
            blocks: vec![Block::default(); Params::DEFAULT.block_count()],
        }
    }

    /// Hashes `password` for storage, after checking it against the password rules: a PHC
    /// string, as `argon2`'s `PasswordHasher` writes it, with a fresh random salt.
    pub fn hash(&mut self, password: &str) -> Result<String, PasswordError> {
        check_password(password)?;
        let failed = |e: password_hash::Error| PasswordError::Hash(e.to_string());
        let mut salt = [0u8; Salt::RECOMMENDED_LENGTH];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(failed)?;
        let params = Params::DEFAULT;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let output = self
            .compute(
                &argon2,
                password.as_bytes(),
                salt.as_salt(),
                Params::DEFAULT_OUTPUT_LEN,
            )
            .map_err(failed)?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(failed)?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches the stored `hash` (a PHC string of any argon2 variant, with
    /// the parameters and salt it names). A malformed stored hash never matches.
    pub fn verify(&mut self, hash: &str, password: &str) -> bool {
        if password.len() > MAX_PASSWORD {
            return false;
        }
        match self.matches(hash, password.as_bytes()) {
            Ok(same) => same,
            Err(e) => {
                tracing::warn!(error = %e, "a stored password hash is not usable; it matches nothing");
                false
            }
        }
    }

    /// What `PasswordVerifier::verify_password` does, in this memory.
    fn matches(&mut self, hash: &str, password: &[u8]) -> password_hash::Result<bool> {
        let parsed = PasswordHash::new(hash)?;
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err(password_hash::Error::PhcStringField);
        };
        let algorithm = Algorithm::try_from(parsed.algorithm)?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(&parsed)?;
        if params.m_cost() > MAX_HASH_MEMORY_KIB {
            return Err(password_hash::Error::ParamValueInvalid(
                password_hash::errors::InvalidValue::TooLong,
            ));
        }
        let argon2 = Argon2::new(algorithm, version, params);
        let computed = self.compute(&argon2, password, salt, expected.len())?;
        // `Output`'s `==` compares in constant time.
        Ok(computed == expected)
    }

    /// The hash of `password` with `salt`, `len` bytes long, computed in this memory (grown
    /// first if `argon2`'s parameters need more).
    fn compute(
        &mut self,
        argon2: &Argon2<'_>,
        password: &[u8],
        salt: Salt<'_>,
        len: usize,
    ) -> password_hash::Result<Output> {
        let mut raw_salt = [0u8; Salt::MAX_LENGTH];
        let salt = salt.decode_b64(&mut raw_salt)?;
        let count = argon2.params().block_count();
        if self.blocks.len() < count {
            self.blocks.resize(count, Block::default());
        }
        let blocks = &mut self.blocks[..count];
        Output::init_with(len, |out| {
            // Every block is written before it is read, so what a previous hash left in the
            // memory does not matter.
            Ok(argon2.hash_password_into_with_memory(password, salt, out, &mut *blocks)?)
        })
    }
}

/// A new device token: 32 random bytes, hex-encoded.
pub fn new_token() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two token hashes in time independent of where they differ.
pub fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    #[test]
    fn password_round_trip() {
        let mut memory = HashMemory::new();
        let hash = memory.hash("correct horse").expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(memory.verify(&hash, "correct horse"));
        assert!(!memory.verify(&hash, "wrong horse"));
        assert!(!memory.verify("not a hash", "correct horse"));
        assert_eq!(memory.hash("short"), Err(PasswordError::TooShort));
        let long = "x".repeat(MAX_PASSWORD + 1);
        assert_eq!(memory.hash(&long), Err(PasswordError::TooLong));
        assert!(!memory.verify(&hash, &long));
    }

    /// Stores written by `Argon2::default().hash_password` (every earlier version of the
    /// host) still log in, and the crate's own verifier accepts what this memory writes.
    #[test]
    fn same_format_as_the_crate() {
        let salt = SaltString::encode_b64(b"sixteen byte sal").expect("salt");
        let theirs = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .expect("hash")
            .to_string();
        let mut memory = HashMemory::new();
        assert!(memory.verify(&theirs, "correct horse"));
        assert!(!memory.verify(&theirs, "correct horsf"));

        let ours = memory.hash("correct horse").expect("hash");
        let parsed = PasswordHash::new(&ours).expect("PHC string");
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert_eq!(
            parsed.params,
            PasswordHash::new(&theirs).expect("PHC").params
        );
    }

    /// Other parameters than the defaults (a smaller and a larger memory, more lanes, another
    /// variant) are read from the string, and the memory grows for them only as far as allowed.
    #[test]
    fn parameters_come_from_the_stored_hash() {
        let mut memory = HashMemory::new();
        let salt = SaltString::encode_b64(b"another salt 123").expect("salt");
        for (algorithm, m, t, p) in [
            (Algorithm::Argon2id, 1024, 1, 1),
            (Algorithm::Argon2id, 24 * 1024, 2, 2),
            (Algorithm::Argon2i, 4096, 3, 1),
        ] {
            let params = Params::new(m, t, p, None).expect("params");
            let stored = Argon2::new(algorithm, Version::V0x13, params)
                .hash_password(b"correct horse", &salt)
                .expect("hash")
                .to_string();
            assert!(memory.verify(&stored, "correct horse"), "{stored}");
            assert!(!memory.verify(&stored, "correct horsf"), "{stored}");
        }
        let greedy = Params::new(MAX_HASH_MEMORY_KIB + 8, 1, 1, None).expect("params");
        let phc = format!(
            "$argon2id$v=19$m={},t=1,p=1$YW5vdGhlciBzYWx0IDEyMw$0eDaQdb1Pn/cm3T3xqAPGhcIvwAQkIVQuJK1d8kLZOk",
            greedy.m_cost()
        );
        assert!(!memory.verify(&phc, "correct horse"));
        assert!(memory.blocks.len() <= MAX_HASH_MEMORY_KIB as usize);
    }

    #[test]
    fn tokens_are_fresh_and_hash_stably() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(same_hash(&token_hash(&a), &token_hash(&a)));
        assert!(!same_hash(&token_hash(&a), &token_hash(&b)));
    }
}
