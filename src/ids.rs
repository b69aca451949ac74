//! Random identifiers: key, event, request and response ids.
//!
//! They must be unique, not secret, and are made on every request (a
//! request id and a response id each), so they come from a small fast
//! generator per thread (xoshiro, seeded from the operating system when the
//! thread first needs one) rather than the cryptographic thread generator,
//! and each character takes 5 bits of one `u64` draw (12 characters per
//! draw) instead of a bounded draw per character. The alphabet is 32
//! lowercase letters and digits without the look-alikes `l`, `o`, `0` and
//! `1`, which keeps every id inside the contract's `[a-z0-9]` patterns and
//! easy to read aloud.

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::cell::RefCell;

const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
const CHARS_PER_DRAW: usize = 64 / 5;

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// `prefix` followed by `len` random characters, in one allocation.
pub fn prefixed(prefix: &str, len: usize) -> String {
    let mut out = Vec::with_capacity(prefix.len() + len);
    out.extend_from_slice(prefix.as_bytes());
    RNG.with_borrow_mut(|rng| {
        let mut left = len;
        while left > 0 {
            let mut bits = rng.next_u64();
            let n = left.min(CHARS_PER_DRAW);
            out.extend((0..n).map(|_| {
                let c = ALPHABET[(bits & 31) as usize];
                bits >>= 5;
                c
            }));
            left -= n;
        }
    });
    String::from_utf8(out).expect("a str prefix and ASCII characters")
}

/// `len` random characters.
pub fn random_token(len: usize) -> String {
    prefixed("", len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn lengths_and_alphabet() {
        for len in [0, 1, 11, 12, 13, 24, 25, 40] {
            let t = prefixed("req_", len);
            assert_eq!(t.len(), 4 + len);
            assert!(t.starts_with("req_"));
            assert!(t[4..].bytes().all(|b| ALPHABET.contains(&b)), "{t}");
        }
    }

    #[test]
    fn every_character_is_used_and_ids_do_not_repeat() {
        let ids: Vec<String> = (0..2000).map(|_| random_token(16)).collect();
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        let seen: HashSet<u8> = ids.iter().flat_map(|t| t.bytes()).collect();
        assert_eq!(seen.len(), ALPHABET.len());
        // Each position varies (no position stuck on one character).
        for pos in 0..16 {
            let at: HashSet<u8> = ids.iter().map(|t| t.as_bytes()[pos]).collect();
            assert!(at.len() > 20, "position {pos} takes {} values", at.len());
        }
    }

    /// Each thread's generator is seeded on its own: the first ids of
    /// fresh threads (a new proxy thread, a restarted replica) differ.
    #[test]
    fn fresh_threads_draw_different_ids() {
        let firsts: HashSet<String> = (0..8)
            .map(|_| std::thread::spawn(|| random_token(16)).join().unwrap())
            .collect();
        assert_eq!(firsts.len(), 8);
    }
}
