//! Counting correct predictions: overall, per class, and on corrupted vs clean training examples.

/// Index of the largest value of each row of a row-major (N, C) matrix.
pub fn argmax_rows(values: &[f32], cols: usize) -> Vec<u32> {
    values
        .chunks_exact(cols)
        .map(|row| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

/// Accumulates accuracy overall and per class.
#[derive(Debug, Clone)]
pub struct Accuracy {
    correct: Vec<usize>,
    total: Vec<usize>,
}

impl Accuracy {
    pub fn new(classes: usize) -> Self {
        Self { correct: vec![0; classes], total: vec![0; classes] }
    }
    pub fn add(&mut self, predicted: &[u32], labels: &[u32]) {
        for (&p, &l) in predicted.iter().zip(labels) {
            self.total[l as usize] += 1;
            if p == l {
                self.correct[l as usize] += 1;
            }
        }
    }
    pub fn overall(&self) -> f64 {
        ratio(self.correct.iter().sum(), self.total.iter().sum())
    }
    pub fn per_class(&self) -> Vec<f64> {
        self.correct.iter().zip(&self.total).map(|(&c, &t)| ratio(c, t)).collect()
    }
}

/// Fit of the noisy training labels, split by whether the label was corrupted, and memorisation
/// per group (the clean class, or the label column of multi-label data).
#[derive(Debug, Clone, Default)]
pub struct Memorisation {
    corrupted_hits: usize,
    corrupted: usize,
    clean_hits: usize,
    clean: usize,
    /// Per group: (corrupted examples predicted as their noisy label, corrupted examples).
    by_group: Vec<(usize, usize)>,
}

impl Memorisation {
    /// `predicted` and `noisy` labels of a batch, with each example's corrupted flag and group.
    pub fn add(&mut self, predicted: &[u32], noisy: &[u32], corrupted: &[bool], groups: &[usize]) {
        for (((&p, &l), &c), &g) in predicted.iter().zip(noisy).zip(corrupted).zip(groups) {
            if c {
                self.corrupted += 1;
                self.corrupted_hits += (p == l) as usize;
                if self.by_group.len() <= g {
                    self.by_group.resize(g + 1, (0, 0));
                }
                self.by_group[g].0 += (p == l) as usize;
                self.by_group[g].1 += 1;
            } else {
                self.clean += 1;
                self.clean_hits += (p == l) as usize;
            }
        }
    }
    /// Share of corrupted examples predicted as their (wrong) training label.
    pub fn memorized(&self) -> f64 {
        ratio(self.corrupted_hits, self.corrupted)
    }
    /// Memorisation per group, over `groups` groups; `None` where a group had no corrupted example.
    pub fn per_group(&self, groups: usize) -> Vec<Option<f64>> {
        (0..groups).map(|g| self.by_group.get(g).filter(|(_, n)| *n > 0).map(|&(hits, n)| ratio(hits, n))).collect()
    }
    /// Share of clean examples predicted correctly.
    pub fn clean_fit(&self) -> f64 {
        ratio(self.clean_hits, self.clean)
    }
    /// Accuracy against the noisy labels over all examples.
    pub fn noisy_acc(&self) -> f64 {
        ratio(self.corrupted_hits + self.clean_hits, self.corrupted + self.clean)
    }
}

/// Counts for the F1 score of one binary label (the positive class).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct F1Counts {
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
}

impl F1Counts {
    pub fn add(&mut self, predicted: bool, actual: bool) {
        match (predicted, actual) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, true) => self.fn_ += 1,
            (false, false) => {}
        }
    }
    /// 2·TP / (2·TP + FP + FN); 0 when there is neither a positive label nor a positive prediction
    /// (scikit-learn's `zero_division=0`).
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
}

/// Per-label F1 of probabilities (N, L) against targets (N, L; negative = unknown, skipped), each label
/// with its decision threshold.
pub fn f1_per_label(probs: &[f32], targets: &[f32], thresholds: &[f64]) -> Vec<f64> {
    let l = thresholds.len();
    let mut counts = vec![F1Counts::default(); l];
    for (row_p, row_t) in probs.chunks_exact(l).zip(targets.chunks_exact(l)) {
        for j in 0..l {
            if row_t[j] >= 0.0 {
                counts[j].add(row_p[j] as f64 >= thresholds[j], row_t[j] > 0.5);
            }
        }
    }
    counts.iter().map(F1Counts::f1).collect()
}

/// For each label the threshold in 0.05..0.95 (steps of 0.05) that maximises F1 on (probs, targets).
pub fn tune_thresholds(probs: &[f32], targets: &[f32], labels: usize) -> Vec<f64> {
    let grid: Vec<f64> = (1..20).map(|i| i as f64 * 0.05).collect();
    (0..labels)
        .map(|j| {
            let mut best = (0.5, -1.0);
            for &t in &grid {
                let mut c = F1Counts::default();
                for (p, y) in probs.iter().skip(j).step_by(labels).zip(targets.iter().skip(j).step_by(labels)) {
                    if *y >= 0.0 {
                        c.add(*p as f64 >= t, *y > 0.5);
                    }
                }
                if c.f1() > best.1 {
                    best = (t, c.f1());
                }
            }
            best.0
        })
        .collect()
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_computed_cases() {
        assert_eq!(argmax_rows(&[0.1, 0.9, 0.0, 2.0, 1.0, 3.0], 3), vec![1, 2]);
        let mut a = Accuracy::new(3);
        a.add(&[0, 1, 1, 2], &[0, 1, 2, 2]);
        assert_eq!(a.overall(), 0.75);
        assert_eq!(a.per_class(), vec![1.0, 1.0, 0.5]);
        let mut m = Memorisation::default();
        m.add(&[3, 1, 2, 0], &[3, 1, 0, 0], &[true, false, true, false], &[2, 1, 0, 0]);
        assert_eq!(m.memorized(), 0.5);
        // Class 2's one corrupted example is memorised, class 0's is not; class 1 had none.
        assert_eq!(m.per_group(3), vec![Some(0.0), None, Some(1.0)]);
        assert_eq!(m.clean_fit(), 1.0);
        assert_eq!(m.noisy_acc(), 0.75);
        assert_eq!(Memorisation::default().memorized(), 0.0);
    }

    #[test]
    fn f1_on_hand_computed_cases() {
        // tp=2, fp=1, fn=1 -> 4/6
        let mut c = F1Counts::default();
        for (p, a) in [(true, true), (true, true), (true, false), (false, true), (false, false)] {
            c.add(p, a);
        }
        assert!((c.f1() - 4.0 / 6.0).abs() < 1e-12);
        // No positives at all, none predicted: 0 (scikit-learn's zero_division=0).
        let mut none = F1Counts::default();
        none.add(false, false);
        assert_eq!(none.f1(), 0.0);
        // Unknown targets (-1) are skipped; label 1 is perfect.
        let probs = [0.9f32, 0.8, 0.2, 0.1, 0.7, 0.6];
        let targets = [1.0f32, 1.0, 0.0, -1.0, 0.0, 1.0];
        let f1 = f1_per_label(&probs, &targets, &[0.5, 0.5]);
        assert!((f1[0] - 2.0 / 3.0).abs() < 1e-12, "{f1:?}");
        assert_eq!(f1[1], 1.0);
        // A threshold tuned on these probabilities separates label 0 perfectly.
        let t = tune_thresholds(&probs, &targets, 2);
        assert_eq!(f1_per_label(&probs, &targets, &t)[0], 1.0);
    }

    proptest! {
        #[test]
        fn f1_is_a_fraction_and_perfect_predictions_score_one(targets in proptest::collection::vec(0u8..2, 1..200)) {
            let t: Vec<f32> = targets.iter().map(|&v| v as f32).collect();
            let p: Vec<f32> = t.iter().map(|&v| if v > 0.5 { 0.9 } else { 0.1 }).collect();
            let f = f1_per_label(&p, &t, &[0.5])[0];
            let any_positive = t.iter().any(|&v| v > 0.5);
            prop_assert_eq!(f, if any_positive { 1.0 } else { 0.0 });
            let inverted: Vec<f32> = p.iter().map(|v| 1.0 - v).collect();
            prop_assert!((0.0..=1.0).contains(&f1_per_label(&inverted, &t, &[0.5])[0]));
        }

        #[test]
        fn accuracies_are_fractions_and_perfect_predictions_score_one(labels in proptest::collection::vec(0u32..5, 1..100)) {
            let mut a = Accuracy::new(5);
            a.add(&labels, &labels);
            prop_assert_eq!(a.overall(), 1.0);
            let shifted: Vec<u32> = labels.iter().map(|l| (l + 1) % 5).collect();
            let mut b = Accuracy::new(5);
            b.add(&shifted, &labels);
            prop_assert_eq!(b.overall(), 0.0);
            prop_assert!(b.per_class().iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }
}
