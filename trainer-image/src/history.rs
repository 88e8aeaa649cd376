//! The loss curve the trainer keeps in `status.progress.history`: short and bounded, so a
//! status patch stays small however long the run, and evenly spread over the run's steps so
//! that `kubectl graft loss` draws its whole shape.

use graft_api::{LossPoint, MAX_HISTORY_POINTS};

/// Points at multiples of the stride: the stride is chosen from the run's length so there
/// are at most this many.
const STRIDE_POINTS: u64 = 200;
/// Steps with a validation loss are kept off the stride too, up to this many.
const EVAL_POINTS: u64 = 50;
// Stride points, the first and the last step, and the evaluations fit the schema's maxItems.
const _: () = assert!(STRIDE_POINTS + 2 + EVAL_POINTS <= MAX_HISTORY_POINTS as u64);

#[derive(Debug, Default)]
pub struct LossHistory {
    points: Vec<LossPoint>,
    evals: u64,
}

impl LossHistory {
    /// Records step `step` of `total_steps` if it is one the curve keeps.
    pub fn record(&mut self, step: u64, total_steps: u64, loss: f64, eval_loss: Option<f64>) {
        let stride = total_steps.div_ceil(STRIDE_POINTS).max(1);
        let eval_kept = eval_loss.is_some() && self.evals < EVAL_POINTS;
        if !(step == 1 || step == total_steps || step.is_multiple_of(stride) || eval_kept) {
            return;
        }
        // A resumed run repeats the steps after its checkpoint: the new values replace them.
        self.points.retain(|p| p.step < step);
        self.points.push(LossPoint {
            step,
            loss,
            eval_loss,
        });
        self.count_evals();
    }

    /// Puts the points an earlier attempt of the same run reported before this one's first
    /// step (a retried pod resumes from a checkpoint) in front of this attempt's.
    pub fn seed(&mut self, earlier: &[LossPoint]) {
        let first = self.points.first().map_or(u64::MAX, |p| p.step);
        let mut points: Vec<LossPoint> =
            earlier.iter().filter(|p| p.step < first).copied().collect();
        points.append(&mut self.points);
        points.truncate(MAX_HISTORY_POINTS as usize);
        self.points = points;
        self.count_evals();
    }

    pub fn points(&self) -> &[LossPoint] {
        &self.points
    }

    fn count_evals(&mut self) {
        self.evals = self.points.iter().filter(|p| p.eval_loss.is_some()).count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::cast_precision_loss)]
    fn run(history: &mut LossHistory, steps: std::ops::RangeInclusive<u64>, total: u64) {
        for step in steps {
            let eval = (step % 1000 == 0).then_some(1.0);
            history.record(step, total, 10.0 / step as f64, eval);
        }
    }

    #[test]
    fn a_short_run_keeps_every_step() {
        let mut history = LossHistory::default();
        run(&mut history, 1..=24, 24);
        let steps: Vec<u64> = history.points().iter().map(|p| p.step).collect();
        assert_eq!(steps, (1..=24).collect::<Vec<_>>());
    }

    #[test]
    fn a_long_run_stays_bounded_and_spans_the_whole_run() {
        let mut history = LossHistory::default();
        run(&mut history, 1..=100_003, 100_003);
        let points = history.points();
        assert!(
            points.len() <= MAX_HISTORY_POINTS as usize,
            "{}",
            points.len()
        );
        assert!(points.len() >= 200, "{}", points.len());
        assert_eq!(points.first().map(|p| p.step), Some(1));
        assert_eq!(points.last().map(|p| p.step), Some(100_003));
        // Evenly spread: no gap between kept steps is longer than the stride.
        let stride = 100_003_u64.div_ceil(STRIDE_POINTS);
        assert!(points.windows(2).all(|w| w[1].step - w[0].step <= stride));
        // Evaluations beyond the first EVAL_POINTS fall back to the stride.
        let evals = points.iter().filter(|p| p.eval_loss.is_some()).count();
        assert!(evals as u64 >= EVAL_POINTS, "{evals}");
    }

    #[test]
    fn a_resumed_attempt_continues_the_earlier_curve() {
        let mut first = LossHistory::default();
        run(&mut first, 1..=30, 40);
        // The pod died after step 30; the newest checkpoint was step 20.
        let mut second = LossHistory::default();
        run(&mut second, 21..=40, 40);
        second.seed(first.points());
        let steps: Vec<u64> = second.points().iter().map(|p| p.step).collect();
        assert_eq!(steps, (1..=40).collect::<Vec<_>>());
        assert!((second.points()[25].loss - 10.0 / 26.0).abs() < 1e-12);
    }
}
