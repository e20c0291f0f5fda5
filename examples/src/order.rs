//! The order of a run's training examples, as a pure function of the seed and the position in
//! the stream: what makes a resumed run see the batches the uninterrupted one would.
//!
//! Position `p` of the stream is example `perm_e[p mod n]` of epoch `e = p div n`, where
//! `perm_e` is a shuffle drawn from a generator seeded with [`mix`]`(seed, salt, e)`: every
//! example once per epoch, a new order each epoch, and nothing to save but the step.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A seed for the `n`-th draw of the stream `salt` of a run seeded with `seed`. The odd
/// multiplier (2^64 / golden ratio) spreads consecutive `n` across all 64 bits.
pub fn mix(seed: u64, salt: u64, n: u64) -> u64 {
    seed ^ salt ^ n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Epoch-by-epoch shuffled order of `n` examples; keeps the current epoch's permutation.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    n: usize,
    seed: u64,
    salt: u64,
    current: Option<(usize, Vec<usize>)>,
}

impl EpochOrder {
    /// The order of `n` examples (at least one) for a run seeded with `seed`; `salt` keeps
    /// the orders of different streams of one run apart.
    pub fn new(n: usize, seed: u64, salt: u64) -> Self {
        assert!(n > 0, "an epoch order needs at least one example");
        EpochOrder {
            n,
            seed,
            salt,
            current: None,
        }
    }

    /// The example at stream position `position`.
    pub fn at(&mut self, position: usize) -> usize {
        let epoch = position / self.n;
        let n = self.n;
        let (seed, salt) = (self.seed, self.salt);
        let (_, perm) = match &mut self.current {
            Some(c) if c.0 == epoch => c,
            slot => slot.insert({
                let mut p: Vec<usize> = (0..n).collect();
                p.shuffle(&mut StdRng::seed_from_u64(mix(seed, salt, epoch as u64)));
                (epoch, p)
            }),
        };
        perm[position % n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_once_per_epoch_in_a_new_order() {
        let mut o = EpochOrder::new(50, 3, 7);
        let first: Vec<usize> = (0..50).map(|p| o.at(p)).collect();
        let second: Vec<usize> = (50..100).map(|p| o.at(p)).collect();
        for epoch in [&first, &second] {
            let mut sorted = epoch.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        }
        assert_ne!(first, second);
        assert_ne!(first, (0..50).collect::<Vec<_>>());
        // Going back to an earlier position (a resumed run) gives the same example.
        let mut fresh = EpochOrder::new(50, 3, 7);
        assert_eq!(fresh.at(60), second[10]);
        assert_eq!(fresh.at(10), first[10]);
        // Another seed or salt, another order.
        let mut other = EpochOrder::new(50, 4, 7);
        assert_ne!((0..50).map(|p| other.at(p)).collect::<Vec<_>>(), first);
    }
}
