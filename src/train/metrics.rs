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

/// Fit of the noisy training labels, split by whether the label was corrupted.
#[derive(Debug, Clone, Default)]
pub struct Memorisation {
    corrupted_hits: usize,
    corrupted: usize,
    clean_hits: usize,
    clean: usize,
}

impl Memorisation {
    /// `predicted` and `noisy` labels of a batch, with each example's corrupted flag.
    pub fn add(&mut self, predicted: &[u32], noisy: &[u32], corrupted: &[bool]) {
        for ((&p, &l), &c) in predicted.iter().zip(noisy).zip(corrupted) {
            if c {
                self.corrupted += 1;
                self.corrupted_hits += (p == l) as usize;
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
    /// Share of clean examples predicted correctly.
    pub fn clean_fit(&self) -> f64 {
        ratio(self.clean_hits, self.clean)
    }
    /// Accuracy against the noisy labels over all examples.
    pub fn noisy_acc(&self) -> f64 {
        ratio(self.corrupted_hits + self.clean_hits, self.corrupted + self.clean)
    }
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
        m.add(&[3, 1, 2, 0], &[3, 1, 0, 0], &[true, false, true, false]);
        assert_eq!(m.memorized(), 0.5);
        assert_eq!(m.clean_fit(), 1.0);
        assert_eq!(m.noisy_acc(), 0.75);
        assert_eq!(Memorisation::default().memorized(), 0.0);
    }

    proptest! {
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
