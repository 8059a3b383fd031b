//! Small statistics over benchmark samples: the figure of one round and the summary over
//! rounds. Pure functions, unit-tested.

/// Median (the mean of the two middle values for an even count); `None` when empty.
#[must_use]
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    })
}

/// Median, minimum and maximum of per-round figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

#[must_use]
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let median = median(values)?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Summary { median, min, max })
}

/// The `q`-quantile (0 ≤ q ≤ 1, nearest rank) of integer samples; `None` when empty.
#[must_use]
#[expect(clippy::cast_sign_loss, reason = "q is clamped to 0..=1")]
pub fn quantile(samples: &[u32], q: f64) -> Option<u32> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * (v.len() - 1) as f64).round() as usize;
    v.get(rank).copied()
}

/// Mean of integer samples; `None` when empty.
#[must_use]
pub fn mean(samples: &[u32]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
    Some(sum as f64 / samples.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::{Summary, mean, median, quantile, summarize};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn summary_spans_the_rounds() {
        assert_eq!(
            summarize(&[5.0, 1.0, 9.0, 4.0, 6.0]),
            Some(Summary {
                median: 5.0,
                min: 1.0,
                max: 9.0
            })
        );
    }

    #[test]
    fn quantiles_and_mean_of_durations() {
        let v: Vec<u32> = (1..=101).collect();
        assert_eq!(quantile(&v, 0.5), Some(51));
        assert_eq!(quantile(&v, 0.0), Some(1));
        assert_eq!(quantile(&v, 1.0), Some(101));
        assert_eq!(mean(&[1, 2, 3, 6]), Some(3.0));
        assert_eq!(mean(&[]), None);
    }
}
