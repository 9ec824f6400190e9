//! A token bucket, sans-IO: the caller passes the time.

/// Allows `rate` events per second on average and bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens in thousandths, so that refills below one token per millisecond add up exactly.
    milli_tokens: u64,
    burst_milli: u64,
    rate: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at time `now_ms`. A `rate` of 0 allows nothing beyond the burst.
    pub fn new(rate: u32, burst: u32, now_ms: u64) -> Self {
        let burst_milli = u64::from(burst.max(1)) * 1000;
        Self {
            milli_tokens: burst_milli,
            burst_milli,
            rate: u64::from(rate),
            last_ms: now_ms,
        }
    }

    /// Takes one token at time `now_ms`; `false` if none is left.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.milli_tokens = self.milli_tokens_at(now_ms);
        self.last_ms = self.last_ms.max(now_ms);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// The milli-tokens in the bucket at `now_ms`, refilled since the last take.
    fn milli_tokens_at(&self, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        // rate tokens per second = rate milli-tokens per millisecond.
        self.milli_tokens
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.burst_milli)
    }

    /// How many milliseconds after `now_ms` a token is there to take (0: now); `None` if one
    /// never will be (a rate of 0 with the burst spent).
    pub fn wait_ms(&self, now_ms: u64) -> Option<u64> {
        let missing = 1000u64.saturating_sub(self.milli_tokens_at(now_ms));
        match (missing, self.rate) {
            (0, _) => Some(0),
            (_, 0) => None,
            (missing, rate) => Some(missing.div_ceil(rate)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10, 5, 1_000);
        assert_eq!((0..8).filter(|_| bucket.try_take(1_000)).count(), 5);
        // 10 per second: one token every 100 ms.
        assert!(!bucket.try_take(1_050));
        assert!(bucket.try_take(1_100));
        assert!(!bucket.try_take(1_100));
        // A long pause refills only up to the burst.
        assert_eq!((0..20).filter(|_| bucket.try_take(60_000)).count(), 5);
        // Time going backwards takes nothing and gives nothing.
        assert!(!bucket.try_take(10));
    }

    #[test]
    fn says_how_long_until_the_next_token() {
        let mut bucket = TokenBucket::new(10, 2, 0);
        assert_eq!(bucket.wait_ms(0), Some(0));
        assert!(bucket.try_take(0) && bucket.try_take(0));
        assert_eq!(bucket.wait_ms(0), Some(100));
        assert_eq!(bucket.wait_ms(30), Some(70));
        assert!(!bucket.try_take(99));
        assert_eq!(bucket.wait_ms(99), Some(1));
        assert!(bucket.try_take(100));
        // 3 per second: a third of a token every 111.1 ms, rounded up.
        let mut slow = TokenBucket::new(3, 1, 0);
        assert!(slow.try_take(0));
        assert_eq!(slow.wait_ms(0), Some(334));
        assert!(!slow.try_take(333) && slow.try_take(334));
        // No rate: once the burst is spent, never.
        let mut none = TokenBucket::new(0, 1, 0);
        assert!(none.try_take(0));
        assert_eq!(none.wait_ms(1_000_000), None);
    }
}
