//! The training loop on the tiny reference Llama (engine/tests/data/tiny/llama): recomputed
//! layers give the same gradients, a resumed run ends where an uninterrupted one does, and a
//! learnable mapping is learned.

mod common;

use candle_core::{Device, Tensor};
use common::{assert_same_gradients, attach, attach_with, mapping, move_b_off_zero, tiny_llama};
use graft_api::Scheduler;
use graft_engine::{
    backend::Dropout,
    models::{Mode, Precision},
};
use graft_trainer::{
    adapters::Adapters,
    backward::{StepOptions, head_loss, micro_step, sharded_step},
    checkpoint::Checkpoint,
    train::{HookError, Hooks, Settings, StepReport, Trainer, collate},
};

fn settings(epochs: u32, checkpoint_every: u64) -> Settings {
    Settings {
        epochs,
        batch_size: 4,
        accumulation: 2,
        learning_rate: 1e-2,
        warmup_steps: 2,
        scheduler: Scheduler::Cosine,
        max_grad_norm: 1.0,
        seed: 42,
        dropout: 0.1,
        recompute: false,
        weight_decay: 0.0,
        checkpoint_every,
        eval_every: 0,
        pad_id: 0,
        group_by_length: false,
        packing: None,
        keep_best: false,
        early_stopping_patience: 0,
    }
}

#[derive(Default)]
struct Recorder {
    reports: Vec<StepReport>,
    checkpoints: Vec<Vec<(&'static str, Vec<u8>)>>,
}

impl Hooks for Recorder {
    fn step(&mut self, report: &StepReport) -> Result<(), HookError> {
        self.reports.push(report.clone());
        Ok(())
    }
    fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), HookError> {
        self.checkpoints.push(checkpoint.to_files()?);
        Ok(())
    }
}

fn flat(adapters: &Adapters) -> Vec<f32> {
    adapters
        .vars()
        .iter()
        .flat_map(|v| {
            v.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values")
        })
        .collect()
}

#[test]
fn recomputed_layers_give_the_whole_graphs_loss_and_gradients() {
    for precision in [Precision::Dense, Precision::Nf4] {
        let mut model = tiny_llama(precision);
        let adapters = attach(&mut model, 5);
        move_b_off_zero(&adapters);
        let vars = adapters.vars();
        let examples = mapping(3);
        let batch = collate(&examples.iter().collect::<Vec<_>>(), 0, &Device::Cpu).expect("batch");
        let dropout = Some(Dropout {
            p: 0.1,
            seed: 9,
            first_row: 0,
        });
        let whole = micro_step(&model, &vars, &batch, 6.0, StepOptions::new(dropout, false))
            .expect("whole");
        let recomputed = micro_step(&model, &vars, &batch, 6.0, StepOptions::new(dropout, true))
            .expect("recomputed");
        assert!((whole.loss_sum - recomputed.loss_sum).abs() < 1e-5);
        let compared =
            assert_same_gradients(&whole.grads, &recomputed.grads, &format!("{precision:?}"));
        assert_eq!(compared, 2 * 7 * 2, "A and B of 7 sites in 2 layers");
    }
}

/// Splitting a micro-batch across cores changes nothing but the order of the sums: each
/// shard's rows draw the dropout masks they have in the whole micro-batch.
#[test]
fn a_micro_batch_split_across_threads_gives_the_same_loss_and_gradients() {
    let mut model = tiny_llama(Precision::Nf4);
    let adapters = attach(&mut model, 7);
    move_b_off_zero(&adapters);
    let vars = adapters.vars();
    let examples = mapping(5);
    let batch = collate(&examples.iter().collect::<Vec<_>>(), 0, &Device::Cpu).expect("batch");
    let dropout = Dropout {
        p: 0.2,
        seed: 4,
        first_row: 0,
    };
    for (recompute, dropout) in [(false, None), (true, None), (true, Some(dropout))] {
        let whole = sharded_step(
            1,
            &model,
            &vars,
            &batch,
            10.0,
            StepOptions::new(dropout, recompute),
        )
        .expect("one");
        let split = sharded_step(
            3,
            &model,
            &vars,
            &batch,
            10.0,
            StepOptions::new(dropout, recompute),
        )
        .expect("three");
        assert!(
            (whole.loss_sum - split.loss_sum).abs() < 1e-4,
            "{} vs {}",
            whole.loss_sum,
            split.loss_sum
        );
        assert_same_gradients(
            &whole.grads,
            &split.grads,
            &format!("recompute {recompute}, dropout {dropout:?}"),
        );
    }
}

/// DoRA's magnitudes (dropout on, NF4): recomputed layers and a micro-batch split across
/// threads give the whole graph's loss and gradients, for A, B and the magnitudes.
#[test]
fn dora_gradients_are_the_same_recomputed_and_split_across_threads() {
    let mut model = tiny_llama(Precision::Nf4);
    let adapters = attach_with(&mut model, 5, true);
    move_b_off_zero(&adapters);
    let vars = adapters.vars();
    let batch = collate(&mapping(5).iter().collect::<Vec<_>>(), 0, &Device::Cpu).expect("batch");
    let dropout = Some(Dropout {
        p: 0.1,
        seed: 9,
        first_row: 0,
    });
    let whole = sharded_step(
        1,
        &model,
        &vars,
        &batch,
        6.0,
        StepOptions::new(dropout, false),
    )
    .expect("whole");
    for (shards, recompute) in [(1, true), (3, true), (3, false)] {
        let other = sharded_step(
            shards,
            &model,
            &vars,
            &batch,
            6.0,
            StepOptions::new(dropout, recompute),
        )
        .expect("step");
        assert!((whole.loss_sum - other.loss_sum).abs() < 1e-4);
        let compared = assert_same_gradients(
            &whole.grads,
            &other.grads,
            &format!("{shards} shards, recompute {recompute}"),
        );
        assert_eq!(
            compared,
            3 * 7 * 2,
            "A, B and the magnitude of 7 sites in 2 layers"
        );
    }
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    resumed_run_ends_where_an_uninterrupted_one_does(false);
}

/// The magnitudes and their AdamW moments are in the checkpoint too.
#[test]
fn a_resumed_dora_run_ends_where_an_uninterrupted_one_does() {
    resumed_run_ends_where_an_uninterrupted_one_does(true);
}

fn resumed_run_ends_where_an_uninterrupted_one_does(use_dora: bool) {
    let run = |interrupt_after: Option<usize>| -> Vec<f32> {
        let mut model = tiny_llama(Precision::Nf4);
        let adapters = attach_with(&mut model, 7, use_dora);
        let mut trainer = Trainer::new(model, adapters, settings(3, 2), mapping(10), mapping(2))
            .expect("trainer");
        let mut recorder = Recorder::default();
        trainer.run(&mut recorder).expect("training");
        let Some(n) = interrupt_after else {
            return flat(trainer.adapters());
        };
        // A fresh process: new model, new adapters, then the n-th checkpoint.
        let files = recorder.checkpoints.swap_remove(n);
        let checkpoint = Checkpoint::from_files(|name| {
            files
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(_, b)| b.clone())
        })
        .expect("checkpoint reads back");
        let mut model = tiny_llama(Precision::Nf4);
        let adapters = attach_with(&mut model, 7, use_dora);
        let mut resumed = Trainer::new(model, adapters, settings(3, 2), mapping(10), mapping(2))
            .expect("trainer");
        resumed.resume(checkpoint).expect("resume");
        let mut later = Recorder::default();
        resumed.run(&mut later).expect("training");
        assert_eq!(
            later.reports.first().map(|r| r.step),
            Some(2 * (n as u64 + 1) + 1),
            "resumes after the checkpointed step"
        );
        flat(resumed.adapters())
    };
    let uninterrupted = run(None);
    let resumed = run(Some(1));
    assert_eq!(uninterrupted.len(), resumed.len());
    let worst = uninterrupted
        .iter()
        .zip(&resumed)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "max difference {worst}");
    assert!(uninterrupted.iter().any(|&v| v != 0.0));
}

#[test]
fn the_loss_falls_and_the_mapping_is_answered_greedily() {
    let mut model = tiny_llama(Precision::Nf4);
    let adapters = attach(&mut model, 1);
    let data = mapping(12);
    let mut s = settings(60, 0);
    s.learning_rate = 3e-2;
    s.accumulation = 1;
    s.dropout = 0.0;
    let mut trainer = Trainer::new(model, adapters, s, data.clone(), Vec::new()).expect("trainer");
    let mut recorder = Recorder::default();
    trainer.run(&mut recorder).expect("training");
    let first = recorder.reports.first().expect("a step").loss;
    let last = recorder.reports.last().expect("a step").loss;
    assert!(last < first * 0.1, "loss {first} → {last}");
    for example in &data {
        let prompt = Tensor::new(&example.ids[..3], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("prompt");
        let logits = trainer.model().forward(&prompt).expect("forward").detach();
        let next = logits
            .get(0)
            .and_then(|t| t.get(2))
            .and_then(|t| t.argmax(0))
            .and_then(|t| t.to_scalar::<u32>())
            .expect("argmax");
        assert_eq!(next, example.ids[3], "answer to {:?}", &example.ids[..3]);
    }
}

/// Held-out examples whose answers contradict the training mapping: the evaluation loss
/// falls while the model learns the format, then rises as it learns the training answers.
fn contradicting(n: u32) -> Vec<graft_trainer::train::Example> {
    mapping(n)
        .into_iter()
        .map(|mut e| {
            e.ids[3] = (e.ids[3] + 41) % 90 + 3;
            e
        })
        .collect()
}

/// `keepBest` publishes the adapter of the lowest evaluation loss, and early stopping ends the
/// run once `patience` evaluations in a row have not lowered it.
#[test]
fn the_best_evaluation_is_kept_and_early_stopping_stops() {
    let run = |keep_best: bool, patience: u32| {
        let mut model = tiny_llama(Precision::Dense);
        let adapters = attach(&mut model, 1);
        let mut s = settings(30, 0);
        s.learning_rate = 3e-2;
        s.accumulation = 1;
        s.dropout = 0.0;
        s.eval_every = 1;
        s.keep_best = keep_best;
        s.early_stopping_patience = patience;
        let mut trainer =
            Trainer::new(model, adapters, s, mapping(8), contradicting(8)).expect("trainer");
        let mut recorder = Recorder::default();
        trainer.run(&mut recorder).expect("training");
        (trainer, recorder.reports)
    };
    let (trainer, reports) = run(true, 0);
    let evals: Vec<(u64, f64)> = reports
        .iter()
        .filter_map(|r| Some((r.step, r.eval_loss?)))
        .collect();
    let &(best_step, best_loss) = evals
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("evaluations");
    let last = evals.last().expect("evaluations");
    assert!(
        last.1 > best_loss * 1.05,
        "the test needs the eval loss to rise: {evals:?}"
    );
    let best = trainer.best().expect("a best evaluation");
    assert_eq!((best.step, best.eval_loss), (best_step, best_loss));
    let (kept, last_adapter) = (
        trainer.result().expect("result"),
        trainer.adapters().snapshot().expect("snapshot"),
    );
    let (kept, last_adapter) = (
        kept.lora().expect("a LoRA"),
        last_adapter.lora().expect("a LoRA"),
    );
    let differs = kept.weights.iter().any(|(key, lora)| {
        let other = &last_adapter.weights[key].b;
        (&lora.b - other)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff")
            > 1e-6
    });
    assert!(
        differs,
        "the kept adapter is the best step's, not the last's"
    );
    // A checkpoint carries the best evaluation and its adapter to a resumed run.
    let files = trainer
        .checkpoint()
        .expect("checkpoint")
        .to_files()
        .expect("files");
    let read = Checkpoint::from_files(|name| {
        files
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b.clone())
    })
    .expect("reads back");
    assert_eq!(read.state.best, Some(best));
    let saved = read.best_adapter.expect("the best adapter");
    let saved = saved.lora().expect("a LoRA");
    for (key, lora) in &kept.weights {
        let diff = (&lora.b - &saved.weights[key].b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < f32::EPSILON, "{key:?} differs by {diff}");
    }

    let (stopped, reports) = run(false, 2);
    let at = stopped.stopped_early().expect("stopped early");
    assert_eq!(reports.last().expect("steps").step, at);
    assert!(at < stopped.plan().total_steps);
    let evals: Vec<f64> = reports.iter().filter_map(|r| r.eval_loss).collect();
    let best = evals.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        evals[evals.len() - 2..].iter().all(|&l| l > best),
        "the last two evaluations did not improve: {evals:?}"
    );
    assert!(
        evals[..evals.len() - 2].iter().any(|&l| l <= best),
        "the best came before them"
    );
}

/// `training.weightDecay` reaches AdamW: the same run with decay ends with smaller adapter
/// weights (AdamW scales every weight by `1 − lr·decay` each step).
#[test]
fn weight_decay_shrinks_the_adapter_weights() {
    let norm = |weight_decay: f64| -> f32 {
        let mut model = tiny_llama(Precision::Dense);
        let adapters = attach(&mut model, 1);
        let mut s = settings(4, 0);
        s.dropout = 0.0;
        s.weight_decay = weight_decay;
        let mut trainer =
            Trainer::new(model, adapters, s, mapping(8), Vec::new()).expect("trainer");
        trainer.run(&mut Recorder::default()).expect("training");
        flat(trainer.adapters()).iter().map(|v| v * v).sum()
    };
    let (plain, decayed) = (norm(0.0), norm(0.5));
    assert!(
        decayed < plain * 0.99,
        "squared norm {plain} without decay, {decayed} with"
    );
}

/// The loss taken a few positions at a time equals the loss over the whole sequence, and so
/// does its gradient with respect to the last hidden states.
#[test]
fn the_loss_in_chunks_of_positions_equals_the_whole_loss() {
    let model = tiny_llama(Precision::Nf4);
    let examples = mapping(3);
    let batch = collate(&examples.iter().collect::<Vec<_>>(), 0, &Device::Cpu).expect("batch");
    let mut h = model.embed(&batch.ids).expect("embed");
    let positions = model
        .positions(batch.ids.dim(1).expect("seq"), &Device::Cpu)
        .expect("rope");
    for layer in 0..model.num_layers() {
        h = model
            .layer(layer, &h, &positions, Mode::Train(None))
            .expect("layer");
    }
    let seq = h.dim(1).expect("seq");
    assert!(seq > 4, "the test needs several chunks: {seq} positions");
    let (whole_loss, whole_grad) = head_loss(&model, &h, &batch, 4.0, seq).expect("whole");
    let norm: f32 = whole_grad
        .sqr()
        .and_then(|g| g.sum_all()?.to_scalar())
        .expect("norm");
    assert!(norm > 0.0, "a gradient reaches the hidden states");
    for chunk in [1, 2, 3] {
        let (loss, grad) = head_loss(&model, &h, &batch, 4.0, chunk).expect("chunked");
        assert!(
            (loss - whole_loss).abs() < 1e-5 * whole_loss.abs(),
            "{chunk}: {loss} vs {whole_loss}"
        );
        assert_eq!(grad.dims(), whole_grad.dims());
        assert_same_gradients(
            &[Some(grad)],
            &[Some(whole_grad.clone())],
            &format!("chunks of {chunk}"),
        );
    }
}

/// The GPU path's step (the device backend), run on the CPU: the fused CPU backend's loss and
/// gradients, with the same dropout masks, in f32 and within bf16's rounding in bf16.
#[test]
fn the_device_backend_on_the_cpu_steps_as_the_cpu_backend_does() {
    common::device_step_matches_the_cpu_backend(&Device::Cpu);
}
