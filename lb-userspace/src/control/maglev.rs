//! Maglev lookup tables (Eisenbud et al., NSDI 2016), computed on the host.
//!
//! Each backend gets a permutation of the table's slots derived from two hashes of its
//! identity; backends take turns claiming their next preferred free slot until the table is
//! full. With a prime table size M every permutation visits every slot, each backend ends up
//! with ⌊M/N⌋ or ⌈M/N⌉ slots, and removing one backend moves few slots of the others.

/// Slots per backend the table aims for at least; more means finer balance and less
/// disruption when the backend set changes.
pub const SLOTS_PER_BACKEND: u64 = 100;
/// A kept table is resized once it exceeds this many slots per backend.
pub const MAX_SLOTS_PER_BACKEND: u64 = 400;

/// Table sizes come in classes (the first prime ≥ 101·2^k), and a table keeps its size while
/// it holds 100–400 slots per backend: the size must not change with every backend added or
/// removed, because a table of another size is a different table (nearly every slot moves).
///
/// Returns the size for `n` backends given the `current` size, if any, and the slots
/// available (`max_slots`, counting the current region): a class ≥ 100·n if it fits, else the
/// largest prime that fits and still gives every backend a slot; `None` if nothing fits.
#[must_use]
pub fn table_size(n: usize, current: Option<u32>, max_slots: u32) -> Option<u32> {
    if n == 0 {
        return Some(0);
    }
    let n64 = n as u64;
    let want = n64 * SLOTS_PER_BACKEND;
    if let Some(m) = current {
        let m64 = u64::from(m);
        if m64 >= want && m64 <= n64 * MAX_SLOTS_PER_BACKEND && m <= max_slots {
            return Some(m);
        }
    }
    let mut class = 101u64;
    while class < want {
        class *= 2;
    }
    let mut m = class;
    while !is_prime(m) {
        m += 1;
    }
    if m <= u64::from(max_slots) {
        return u32::try_from(m).ok();
    }
    // Capacity is short: the largest prime that fits, as long as each backend gets a slot.
    let mut m = u64::from(max_slots);
    while m >= n64 && m >= 2 {
        if is_prime(m) {
            return u32::try_from(m).ok();
        }
        m -= 1;
    }
    None
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// FNV-1a, 64-bit, with a seed folded in first: stable across builds and platforms, so a
/// restarted agent computes the same tables.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly; finish with a 64-bit avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// A slot no backend has claimed yet.
const EMPTY: usize = usize::MAX;

/// Builds a table of size `m` (prime, ≥ number of backends) over `backends`, each given as
/// (identity bytes, value to store), in a canonical order (callers sort by identity, so every
/// node computes the same table for the same set). Returns the value stored in every slot.
#[must_use]
pub fn populate<T: Copy>(backends: &[(&[u8], T)], m: u32) -> Vec<T> {
    let Some(&(_, first)) = backends.first() else {
        return Vec::new();
    };
    if m == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    // Each backend's next preferred slot and its skip, kept reduced modulo m: the sequence
    // (offset + j·skip) mod m of the paper without a division per probe (this loop is most
    // of a full sync's planning time).
    let mut cursors: Vec<(u64, u64)> = backends
        .iter()
        .map(|(id, _)| {
            let offset = fnv1a(0x6d61_676c_6576_3031, id) % m64;
            let skip = fnv1a(0x736b_6970_7665_3031, id) % (m64 - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    // 0 < skip <= m and slot < m, so one subtraction reduces their sum.
    let advance = |slot: u64, skip: u64| {
        let next = slot + skip;
        if next >= m64 { next - m64 } else { next }
    };
    let mut owner = vec![EMPTY; m as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, (slot, skip)) in cursors.iter_mut().enumerate() {
            while owner[*slot as usize] != EMPTY {
                *slot = advance(*slot, *skip);
            }
            owner[*slot as usize] = i;
            *slot = advance(*slot, *skip);
            filled += 1;
            if filled == m64 {
                break 'fill;
            }
        }
    }
    owner
        .into_iter()
        .map(|i| backends.get(i).map_or(first, |b| b.1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{fnv1a, is_prime, populate, table_size};

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080/TCP", i / 200, i % 200 + 2))
            .collect()
    }

    fn table(names: &[String]) -> Vec<usize> {
        let m = table_size(names.len(), None, 1 << 24).expect("size");
        let input: Vec<(&[u8], usize)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_bytes(), i))
            .collect();
        populate(&input, m)
    }

    #[test]
    fn table_size_is_prime_and_at_least_100_per_backend() {
        for n in [1, 2, 3, 5, 10, 64, 100, 1000] {
            let m = table_size(n, None, 1 << 24).expect("fits");
            assert!(is_prime(u64::from(m)), "{m}");
            assert!(u64::from(m) >= 100 * n as u64 && m >= 101, "n={n} m={m}");
        }
        assert_eq!(table_size(0, None, 10), Some(0));
        // Short of capacity: the largest prime that fits, still one slot per backend.
        assert_eq!(table_size(10, None, 500), Some(499));
        assert_eq!(table_size(10, None, 9), None);
    }

    #[test]
    fn table_size_is_kept_while_within_bounds() {
        let m = table_size(5, None, 1 << 24).expect("fits");
        assert_eq!(m, 809);
        // Scaling 5 → 4 → 3 keeps the table (at most 400 slots per backend) ...
        for n in [4, 3] {
            assert_eq!(table_size(n, Some(m), 1 << 24), Some(m), "n={n}");
        }
        // ... 2 backends in 809 slots is too sparse: a smaller class.
        assert!(table_size(2, Some(m), 1 << 24).expect("fits") < m);
        // Growing past 100 per backend moves to a bigger class.
        assert!(table_size(9, Some(m), 1 << 24).expect("fits") > m);
    }

    #[test]
    fn balanced_within_one_percent() {
        for n in [2, 3, 7, 10, 33, 100] {
            let names = names(n);
            let t = table(&names);
            let mut counts = vec![0usize; n];
            for &b in &t {
                counts[b] += 1;
            }
            let ideal = t.len() as f64 / n as f64;
            for (b, &c) in counts.iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(
                    dev <= 0.01,
                    "n={n} backend {b} has {c} slots, ideal {ideal:.1}"
                );
            }
        }
    }

    /// Maglev trades a little disruption for perfect balance: beyond the removed backend's
    /// own 1/N, a few percent of the other slots move (measured worst case over these sets:
    /// 3.6% at 100–200 slots per backend; the paper reports the same shape).
    const EXTRA_DISRUPTION: f64 = 0.04;

    #[test]
    fn removing_one_backend_moves_few_slots() {
        for n in [3, 5, 10, 20, 50] {
            let all = names(n);
            for removed in 0..n {
                let mut rest = all.clone();
                rest.remove(removed);
                // Same table size for both, as when a ring region is rewritten for the
                // same service (sizes differ in general; compare on a common M).
                let m = table_size(n, None, 1 << 24).expect("size");
                let before: Vec<(&[u8], &str)> =
                    all.iter().map(|s| (s.as_bytes(), s.as_str())).collect();
                let after: Vec<(&[u8], &str)> =
                    rest.iter().map(|s| (s.as_bytes(), s.as_str())).collect();
                let (b, a) = (populate(&before, m), populate(&after, m));
                let moved = b.iter().zip(&a).filter(|(x, y)| x != y).count();
                let bound = (1.0 / n as f64 + EXTRA_DISRUPTION) * f64::from(m);
                assert!(
                    moved as f64 <= bound,
                    "n={n}: {moved} of {m} slots moved, bound {bound:.0}"
                );
                assert!(a.iter().all(|s| *s != all[removed].as_str()));
            }
        }
    }

    /// The paper's procedure, computed directly: `populate` must give exactly these tables
    /// (nodes and restarted agents compute the same rings).
    fn populate_reference<T: Copy>(backends: &[(&[u8], T)], m: u32) -> Vec<T> {
        let Some(&(_, first)) = backends.first() else {
            return Vec::new();
        };
        let m64 = u64::from(m);
        let perms: Vec<(u64, u64)> = backends
            .iter()
            .map(|(id, _)| {
                let offset = fnv1a(0x6d61_676c_6576_3031, id) % m64;
                let skip = fnv1a(0x736b_6970_7665_3031, id) % (m64 - 1).max(1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut slots: Vec<Option<T>> = vec![None; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m64;
                while slots[c as usize].is_some() {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m64;
                }
                slots[c as usize] = Some(backends[i].1);
                next[i] += 1;
                filled += 1;
                if filled == m64 {
                    break 'fill;
                }
            }
        }
        slots.into_iter().map(|s| s.unwrap_or(first)).collect()
    }

    #[test]
    fn populate_equals_the_direct_computation() {
        for n in [1, 2, 3, 7, 10, 33, 100] {
            let names = names(n);
            let input: Vec<(&[u8], usize)> = names
                .iter()
                .enumerate()
                .map(|(i, s)| (s.as_bytes(), i))
                .collect();
            let sizes = [table_size(n, None, 1 << 24).expect("size"), 1, 2, 499];
            for m in sizes.into_iter().filter(|m| *m as usize >= n) {
                assert_eq!(
                    populate(&input, m),
                    populate_reference(&input, m),
                    "n={n} m={m}"
                );
            }
        }
    }

    #[test]
    fn deterministic() {
        let names = names(7);
        assert_eq!(table(&names), table(&names));
    }
}
