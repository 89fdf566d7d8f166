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

/// `log softmax(s)`, shifted by the maximum so that large logits do not overflow.
pub fn log_softmax(s: &[f32]) -> Vec<f64> {
    let max = s.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max + s.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    s.iter().map(|&x| x as f64 - lse).collect()
}

/// `KL(p || q) = Σ p log(p/q)` from log-probabilities.
pub fn kl(log_p: &[f64], log_q: &[f64]) -> f64 {
    debug_assert_eq!(log_p.len(), log_q.len());
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum::<f64>()
        // Rounding can leave a tiny negative sum where the distributions agree.
        .max(0.0)
}

/// Indices of the `k` largest scores (ties to the lower index), ascending by index.
pub fn top_k(s: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(s.len());
    let mut idx: Vec<usize> = (0..s.len()).collect();
    if k < s.len() {
        // Descending score, then ascending index: a total order, so the choice is deterministic.
        idx.select_nth_unstable_by(k, |&i, &j| s[j].total_cmp(&s[i]).then(i.cmp(&j)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
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
    fn log_softmax_hand_case() {
        // softmax([0, ln 3]) = [1/4, 3/4].
        let l = log_softmax(&[0.0, 3f32.ln()]);
        assert!((l[0] - 0.25f64.ln()).abs() < 1e-7);
        assert!((l[1] - 0.75f64.ln()).abs() < 1e-7);
        // Shift invariance and no overflow on large logits.
        let l = log_softmax(&[1000.0, 1000.0 + 3f32.ln()]);
        assert!((l[0] - 0.25f64.ln()).abs() < 1e-4);
    }

    #[test]
    fn kl_hand_case() {
        // KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3).
        let p = [0.5f64.ln(), 0.5f64.ln()];
        let q = [0.25f64.ln(), 0.75f64.ln()];
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl(&p, &q) - want).abs() < 1e-15);
        assert_eq!(kl(&p, &p), 0.0);
        // Asymmetric: KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2).
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl(&q, &p) - want).abs() < 1e-15);
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
    }

    #[test]
    fn overlap_hand_cases() {
        assert_eq!(overlap(&[1, 3, 5, 7], &[2, 3, 4, 7, 9]), 2);
        assert_eq!(overlap(&[], &[1]), 0);
        assert_eq!(overlap(&[0, 1, 2], &[0, 1, 2]), 3);
    }
}
