//! A packed micro-batch (several examples per row) trains exactly as the same examples
//! unpacked, right-padded in one batch: the same loss sum, label count and adapter gradients
//! (A and B of every pair), on both backends, with and without layer-wise recomputation, and
//! split into shards.

mod common;

use candle_core::Device;
use common::{assert_same_gradients, attach, move_b_off_zero, tiny_llama};
use graft_engine::{
    backend::{Backend, cpu::Cpu, cuda::Cuda},
    models::Precision,
    rng::Rng,
};
use graft_trainer::{
    backward::{StepOptions, eval_loss_sum, micro_step, sharded_step},
    packing::{collate_rows, pack},
    train::{Example, collate},
};

/// Examples of mixed lengths (3 to 21 tokens): prompt-and-completion ones learned on their
/// second half, and text ones learned on every token, the first included — which a packed row
/// must not predict from the example before it.
fn examples() -> Vec<Example> {
    let mut rng = Rng::seed(9);
    [7, 21, 3, 12, 5, 16, 9, 4, 18]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let ids = (0..len)
                .map(|_| u32::try_from(rng.next_u64() % 93 + 3).expect("fits"))
                .collect();
            let labels = (0..len).map(|t| i % 3 == 0 || t >= len / 2).collect();
            Example { ids, labels }
        })
        .collect()
}

#[test]
fn a_packed_batch_has_the_padded_batchs_loss_and_gradients_on_both_backends() {
    let examples = examples();
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let rows = pack(&lengths, 32);
    assert!(rows.len() < examples.len() && rows.iter().any(|r| r.len() > 2));
    let packed_rows: Vec<Vec<&Example>> = rows
        .iter()
        .map(|row| row.iter().map(|&i| &examples[i]).collect())
        .collect();
    let packed = collate_rows(&packed_rows, 0, &Device::Cpu).expect("packed");
    let everything: Vec<&Example> = examples.iter().collect();
    let padded = collate(&everything, 0, &Device::Cpu).expect("padded");
    assert_eq!(
        (packed.label_tokens, packed.tokens),
        (padded.label_tokens, padded.tokens)
    );
    assert!(packed.ids.elem_count() < padded.ids.elem_count());
    let denominator = 40.0;
    let backends: [&'static dyn Backend; 2] = [&Cpu, &Cuda];
    for backend in backends {
        let mut model = tiny_llama(Precision::Dense).with_backend(backend);
        let adapters = attach(&mut model, 5);
        move_b_off_zero(&adapters);
        let vars = adapters.vars();
        for recompute in [false, true] {
            let what = format!("{} recompute={recompute}", backend.name());
            let one = micro_step(
                &model,
                &vars,
                &padded,
                denominator,
                StepOptions::new(None, recompute),
            )
            .expect("padded step");
            let other = micro_step(
                &model,
                &vars,
                &packed,
                denominator,
                StepOptions::new(None, recompute),
            )
            .expect("packed step");
            let sharded = sharded_step(
                2,
                &model,
                &vars,
                &packed,
                denominator,
                StepOptions::new(None, recompute),
            )
            .expect("sharded step");
            for (loss, of) in [(other.loss_sum, "packed"), (sharded.loss_sum, "sharded")] {
                assert!(
                    (loss - one.loss_sum).abs() <= 1e-5 * one.loss_sum.abs(),
                    "{what} {of}: loss {loss} vs {}",
                    one.loss_sum
                );
            }
            let pairs = assert_same_gradients(&one.grads, &other.grads, &what);
            assert_eq!(pairs, 2 * adapters.pairs.len(), "A and B of every pair");
            assert_same_gradients(&one.grads, &sharded.grads, &format!("{what} sharded"));
        }
        let (eval_packed, eval_padded) = (
            eval_loss_sum(&model, &packed, None).expect("eval"),
            eval_loss_sum(&model, &padded, None).expect("eval"),
        );
        assert!(
            (eval_packed - eval_padded).abs() <= 1e-5 * eval_padded.abs(),
            "{eval_packed} vs {eval_padded}"
        );
    }
}
