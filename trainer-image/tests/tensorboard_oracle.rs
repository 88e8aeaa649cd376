//! TensorBoard's own reader draws, from the event files `graft-trainer train` writes under
//! `<output>/runs/`, the curves the trainer printed: every step's loss, learning rate, gradient
//! norm and tokens/s, and the evaluation losses, at the same steps with the same values (as
//! f32), across a retried attempt that resumes from a checkpoint.
//!
//! The reader is `tensorboard.backend.event_processing.event_accumulator.EventAccumulator`
//! (tensorboard 2.21.0, in the environment `tests/oracle/venv.sh` makes), through
//! `tests/oracle/tensorboard_scalars.py`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use graft_testenv::{oracle_python, repo_root};
use serde_json::Value;

mod common;

const TRAINER: &str = env!("CARGO_BIN_EXE_graft-trainer");

/// Runs the job of `config` as a pod named `host`; its JSON step lines.
fn train(dir: &Path, config: &Path, host: &str) -> Vec<Value> {
    let out = Command::new(TRAINER)
        .args(["train", "--config"])
        .arg(config)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("GRAFT_TERMINATION_LOG", dir.join("termination-log"))
        .env("HOSTNAME", host)
        .stdin(Stdio::null())
        .output()
        .expect("the trainer runs");
    assert!(
        out.status.success(),
        "graft-trainer train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON step line"))
        .collect()
}

#[allow(clippy::too_many_lines)]
#[test]
fn tensorboard_reads_the_printed_curves_across_a_resumed_attempt() {
    let python = oracle_python();
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let dataset = dir.join("train.jsonl");
    std::fs::write(&dataset, common::colour_questions_jsonl()).expect("dataset");
    let output = dir.join("adapter");
    // 8 records, a quarter held out: 6 to train on, 3 steps an epoch, 36 steps.
    let config = dir.join("config.yaml");
    let yaml = format!(
        r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: 'file://{dataset}', validationFraction: 0.25}}
method: {{quantization: none, lora: {{rank: 4, alpha: 8, targetModules: [q_proj, v_proj]}}}}
training: {{epochs: 12, learningRate: 0.01, batchSize: 2, maxSequenceLength: 32,
           warmupSteps: 2, scheduler: cosine, seed: 5, checkpointEverySteps: 10}}
output: {{uri: 'file://{output}/'}}
resources: {{gpus: 0}}
",
        model = common::tiny("made").display(),
        dataset = dataset.display(),
        output = output.display(),
    );
    std::fs::write(&config, yaml).expect("config");

    let first = train(dir, &config, "pod-a");
    assert_eq!(first.len(), 36);
    // The same job again, as a retried pod: it resumes after the newest checkpoint (step 30)
    // and trains steps 31–36 again, into a file of its own.
    let second = train(dir, &config, "pod-b");
    let steps: Vec<u64> = second.iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, (31..=36).collect::<Vec<_>>());
    // What a reader should see: the first attempt up to its checkpoint, then the second's.
    let printed: Vec<&Value> = first[..30].iter().chain(&second).collect();

    let logdir = output.join("runs");
    let out = Command::new(&python)
        .arg(repo_root().join("tests/oracle/tensorboard_scalars.py"))
        .arg("--logdir")
        .arg(&logdir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "TensorBoard's reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).expect("the reader's JSON");

    let files: Vec<&str> = read["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files[0].starts_with("events.out.tfevents.") && files[0].ends_with(".pod-a"),
        "{files:?}"
    );
    assert!(files[1].ends_with(".pod-b"), "the retry's file sorts last");

    for (tag, field) in [
        ("train/loss", "loss"),
        ("train/learning_rate", "learningRate"),
        ("train/grad_norm", "gradNorm"),
        ("train/tokens_per_second", "tokensPerSecond"),
        ("eval/loss", "evalLoss"),
    ] {
        let want: Vec<(u64, f64)> = printed
            .iter()
            .filter_map(|line| Some((line["step"].as_u64()?, line[field].as_f64()?)))
            .collect();
        let got: Vec<(u64, f64)> = read["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {read}"))
            .iter()
            .map(|point| {
                (
                    point[0].as_u64().expect("a step"),
                    point[1].as_f64().expect("a value"),
                )
            })
            .collect();
        let want_steps: Vec<u64> = want.iter().map(|(s, _)| *s).collect();
        let got_steps: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(got_steps, want_steps, "{tag}: the steps");
        for ((step, got), (_, want)) in got.iter().zip(&want) {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{tag} at step {step}: TensorBoard reads {got}, the trainer printed {want}"
            );
        }
    }
    // Each epoch's end (every third step) has a validation loss.
    let evals = read["scalars"]["eval/loss"].as_array().map_or(0, Vec::len);
    assert_eq!(evals, 12);
    // The retry's throughput, not the first attempt's, is what the reader kept for 31–36
    // (compared above), as long as the two differ.
    let tps = |line: &Value| line["tokensPerSecond"].as_f64().expect("tokens/s");
    assert!(
        (31..=36).any(|s| {
            let (a, b) = (tps(&first[s - 1]), tps(&second[s - 31]));
            (a - b).abs() > 1e-6 * b.abs()
        }),
        "the two attempts' throughputs happen to be equal: the test cannot tell them apart"
    );
}
