//! The learning rate at each optimiser step, as transformers' schedulers compute it: linear
//! warm-up from 0, then cosine (half a cycle, `cosine`) or linear (`linear`) decay to 0, or
//! constant (`constant` here is transformers' `constant_with_warmup`).

use graft_api::Scheduler;

/// The learning rate for optimiser step `step` (counted from 0) of `total`.
pub fn learning_rate(base: f64, schedule: Scheduler, step: u64, warmup: u64, total: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
    if step < warmup {
        return base * step / warmup.max(1.0);
    }
    let factor = match schedule {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
        Scheduler::Cosine => {
            let progress = (step - warmup) / (total - warmup).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    // Values from transformers 5.23: get_{cosine,linear,constant}_schedule_with_warmup with
    // num_warmup_steps=10, num_training_steps=110 and a base rate of 1.0, read at each step.
    #[test]
    fn warmup_then_decay_as_transformers_does() {
        for schedule in [Scheduler::Cosine, Scheduler::Linear, Scheduler::Constant] {
            assert!(close(learning_rate(1.0, schedule, 0, 10, 110), 0.0));
            assert!(close(learning_rate(1.0, schedule, 5, 10, 110), 0.5));
            assert!(close(learning_rate(1.0, schedule, 10, 10, 110), 1.0));
        }
        assert!(close(
            learning_rate(1.0, Scheduler::Cosine, 60, 10, 110),
            0.5
        ));
        assert!(close(
            learning_rate(1.0, Scheduler::Cosine, 110, 10, 110),
            0.0
        ));
        assert!(close(
            learning_rate(1.0, Scheduler::Linear, 60, 10, 110),
            0.5
        ));
        assert!(close(
            learning_rate(1.0, Scheduler::Linear, 110, 10, 110),
            0.0
        ));
        assert!(close(
            learning_rate(1.0, Scheduler::Constant, 110, 10, 110),
            1.0
        ));
        assert!(close(
            learning_rate(2e-4, Scheduler::Cosine, 35, 10, 110),
            2e-4 * 0.853_553_390_593_273_8
        ));
    }
}
