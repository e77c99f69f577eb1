//! Early stopping on a validation metric with patience; the caller keeps the best checkpoint.

/// Tracks the best validation score (lower is better) and says when patience has run out.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    pub patience: usize,
    pub best: f64,
    pub best_epoch: Option<usize>,
    since_best: usize,
}

/// What the trainer should do after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New best: save a checkpoint.
    Improved,
    /// No improvement, patience left.
    Wait,
    /// Patience exhausted: stop and restore the best checkpoint.
    Stop,
}

impl EarlyStopping {
    pub fn new(patience: usize) -> Self {
        Self { patience, best: f64::INFINITY, best_epoch: None, since_best: 0 }
    }

    /// Records the score of `epoch` (lower is better; NaN never improves).
    pub fn observe(&mut self, epoch: usize, score: f64) -> Verdict {
        if score < self.best {
            self.best = score;
            self.best_epoch = Some(epoch);
            self.since_best = 0;
            Verdict::Improved
        } else {
            self.since_best += 1;
            if self.since_best >= self.patience {
                Verdict::Stop
            } else {
                Verdict::Wait
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_improvement() {
        let mut es = EarlyStopping::new(2);
        let scores = [1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.6];
        let verdicts: Vec<Verdict> = scores[..6].iter().enumerate().map(|(e, &s)| es.observe(e, s)).collect();
        use Verdict::*;
        assert_eq!(verdicts, [Improved, Improved, Wait, Improved, Wait, Stop]);
        assert_eq!(es.best_epoch, Some(3));
        assert_eq!(es.best, 0.7);
    }

    #[test]
    fn nan_never_counts_as_better() {
        let mut es = EarlyStopping::new(1);
        assert_eq!(es.observe(0, 1.0), Verdict::Improved);
        assert_eq!(es.observe(1, f64::NAN), Verdict::Stop);
    }
}
