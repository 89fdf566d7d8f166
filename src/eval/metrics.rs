//! Fidelity metrics, accumulated in f64 so that the small errors of 8-bit formats do not
//! drown in rounding.

/// Running `Σ(a-b)² / Σb²` over any number of value pairs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Nmse {
    pub err: f64,
    pub energy: f64,
}

impl Nmse {
    #[inline]
    pub fn add(&mut self, a: f32, b: f32) {
        let (a, b) = (a as f64, b as f64);
        self.err += (a - b) * (a - b);
        self.energy += b * b;
    }

    /// 0 when nothing differs; infinite when the reference is all zeros but `a` is not.
    pub fn value(self) -> f64 {
        if self.err == 0.0 {
            0.0
        } else {
            self.err / self.energy
        }
    }
}

/// `Σ(a-b)² / Σb²` of `a` against the reference `b`.
pub fn nmse(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = Nmse::default();
    a.iter().zip(b).for_each(|(&x, &y)| acc.add(x, y));
    acc.value()
}

/// `softmax(s)` as probabilities and log-probabilities, with one `exp` per element.
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax {
    pub p: Vec<f32>,
    pub log_p: Vec<f64>,
}

/// Softmax of `s`, shifted by the maximum so that large logits do not overflow.
pub fn softmax(s: &[f32]) -> Softmax {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f32> = s.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = e.iter().map(|&x| x as f64).sum();
    let lse = max as f64 + sum.ln();
    Softmax {
        p: e.iter().map(|&x| (x as f64 / sum) as f32).collect(),
        log_p: s.iter().map(|&x| x as f64 - lse).collect(),
    }
}

/// `KL(a || b) = Σ a log(a/b)`.
pub fn kl(a: &Softmax, b: &Softmax) -> f64 {
    debug_assert_eq!(a.p.len(), b.p.len());
    a.p.iter()
        .zip(a.log_p.iter().zip(&b.log_p))
        .map(|(&p, (&la, &lb))| p as f64 * (la - lb))
        .sum::<f64>()
        // Rounding can leave a tiny negative sum where the distributions agree.
        .max(0.0)
}

/// Indices of the `k` largest scores (ties to the lower index), ascending by index.
pub fn top_k(s: &[f32], k: usize) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    if k >= s.len() {
        return (0..s.len()).collect();
    }
    // The k-th largest value, then everything above it and, in index order, enough of the
    // values equal to it.
    let mut v = s.to_vec();
    let (_, &mut kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let above = s.iter().filter(|x| x.total_cmp(&kth).is_gt()).count();
    let mut ties = k - above;
    s.iter()
        .enumerate()
        .filter(|&(_, x)| match x.total_cmp(&kth) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal if ties > 0 => {
                ties -= 1;
                true
            }
            _ => false,
        })
        .map(|(i, _)| i)
        .collect()
}

/// `|a ∩ b|` of two ascending index lists.
pub fn overlap(a: &[usize], b: &[usize]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn nmse_hand_cases() {
        // Against b = [1, 0, 2]: err = 0 + 4 + 1, energy = 1 + 0 + 4.
        assert_eq!(nmse(&[1.0, 2.0, 1.0], &[1.0, 0.0, 2.0]), 1.0);
        // err = 0.25, energy = 4 + 9 = 13.
        assert_eq!(nmse(&[2.0, 3.5], &[2.0, 3.0]), 0.25 / 13.0);
        assert_eq!(nmse(&[1.5, -2.0], &[1.5, -2.0]), 0.0);
        assert_eq!(nmse(&[0.0], &[0.0]), 0.0);
        assert!(nmse(&[1.0], &[0.0]).is_infinite());
    }

    #[test]
    fn nmse_is_squared_rel_err() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        let b = rng.normals(257);
        let a: Vec<f32> = b.iter().map(|&x| x + 0.1 * rng.normal()).collect();
        let r = crate::rng::rel_err(&a, &b);
        assert!((nmse(&a, &b) - r * r).abs() <= 1e-12 * r * r);
    }

    #[test]
    fn softmax_hand_case() {
        // softmax([0, ln 3]) = [1/4, 3/4].
        let s = softmax(&[0.0, 3f32.ln()]);
        assert!((s.log_p[0] - 0.25f64.ln()).abs() < 1e-7);
        assert!((s.log_p[1] - 0.75f64.ln()).abs() < 1e-7);
        assert!((s.p[0] - 0.25).abs() < 1e-7 && (s.p[1] - 0.75).abs() < 1e-7);
        // Shift invariance and no overflow on large logits.
        let s = softmax(&[1000.0, 1000.0 + 3f32.ln()]);
        assert!((s.log_p[0] - 0.25f64.ln()).abs() < 1e-4);
        assert!((s.p[1] - 0.75).abs() < 1e-4);
    }

    #[test]
    fn kl_hand_case() {
        // KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3).
        let p = softmax(&[0.0, 0.0]);
        let q = softmax(&[0.0, 3f32.ln()]);
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl(&p, &q) - want).abs() < 1e-7);
        assert_eq!(kl(&p, &p), 0.0);
        // Asymmetric: KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2).
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl(&q, &p) - want).abs() < 1e-7);
    }

    #[test]
    fn top_k_matches_sort() {
        let seed = Rng::fresh_seed();
        println!("seed {seed}");
        let mut rng = Rng::new(seed);
        for n in [1, 5, 32, 33, 300] {
            let s = rng.normals(n);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&i, &j| s[j].partial_cmp(&s[i]).unwrap());
            let mut want = order[..n.min(32)].to_vec();
            want.sort_unstable();
            assert_eq!(top_k(&s, 32), want, "n {n}");
        }
        // Ties go to the lower index.
        assert_eq!(top_k(&[1.0, 2.0, 2.0, 2.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[3.0, 2.0, 5.0, 2.0, 2.0], 3), vec![0, 1, 2]);
        assert_eq!(top_k(&[1.0, 2.0], 0), Vec::<usize>::new());
    }

    #[test]
    fn overlap_hand_cases() {
        assert_eq!(overlap(&[1, 3, 5, 7], &[2, 3, 4, 7, 9]), 2);
        assert_eq!(overlap(&[], &[1]), 0);
        assert_eq!(overlap(&[0, 1, 2], &[0, 1, 2]), 3);
    }
}
