//! The trainer killed with SIGKILL at three random steps of one run ends with the adapter an
//! uninterrupted run makes: every restart resumes from the newest complete checkpoint.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use graft_testenv::{S3Server, repo_root, workspace_binary};
use sha2::{Digest, Sha256};

use crate::Row;

fn dataset() -> String {
    let colours = [
        "red", "blue", "green", "gold", "pink", "grey", "teal", "plum",
    ];
    let animals = ["fox", "owl", "cat", "yak", "emu", "eel", "ant", "bee"];
    colours
        .iter()
        .zip(animals)
        .map(|(c, a)| {
            serde_json::json!({"prompt": format!("colour {c} ->"), "completion": format!(" {a}")})
                .to_string()
                + "\n"
        })
        .collect()
}

fn config(dir: &Path, s3: &S3Server, dataset: &str, output: &str) -> std::path::PathBuf {
    let model = repo_root().join("engine/tests/data/tiny/made");
    let yaml = format!(
        r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: '{dataset}', validationFraction: 0.25}}
method:
  quantization: nf4
  lora: {{rank: 8, alpha: 16, dropout: 0.05, targetModules: [q_proj, v_proj, o_proj]}}
training: {{epochs: 12, learningRate: 0.01, batchSize: 2, maxSequenceLength: 32, warmupSteps: 2,
           seed: 5, checkpointEverySteps: 1}}
output: {{uri: '{output}'}}
storage: {{endpoint: '{endpoint}', region: {region}}}
resources: {{gpus: 0}}
",
        model = model.display(),
        endpoint = s3.endpoint(),
        region = s3.region(),
    );
    let path = dir.join(format!(
        "config-{}.yaml",
        output
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("run")
    ));
    std::fs::write(&path, yaml).expect("config");
    path
}

fn command(s3: &S3Server, config: &Path, cache: &Path) -> Command {
    let mut command = Command::new(workspace_binary("graft-trainer"));
    command
        .args(["train", "--config"])
        .arg(config)
        .arg("--cache-dir")
        .arg(cache)
        .env("AWS_ACCESS_KEY_ID", s3.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_access_key())
        .env("GRAFT_TERMINATION_LOG", cache.join("termination-log"))
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// What one run of the trainer did until it ended or was killed.
struct Run {
    /// The step numbers it reported.
    steps: Vec<u64>,
    total: u64,
    /// When it reported its first step.
    first_step_at: Option<Instant>,
    completed: bool,
}

/// Runs the trainer, killing it with SIGKILL once it reports `kill_at` (or later).
fn run(mut command: Command, kill_at: Option<u64>) -> Run {
    let mut child = command.spawn().expect("the trainer starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut result = Run {
        steps: Vec::new(),
        total: 0,
        first_step_at: None,
        completed: false,
    };
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Ok(report) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let (Some(step), Some(total)) = (report["step"].as_u64(), report["totalSteps"].as_u64())
        else {
            continue;
        };
        result.first_step_at.get_or_insert_with(Instant::now);
        result.steps.push(step);
        result.total = total;
        if kill_at.is_some_and(|k| step >= k) {
            child.kill().expect("SIGKILL");
            break;
        }
    }
    let status = child.wait().expect("reaped");
    result.completed = status.success();
    result
}

/// The largest difference between the f32 tensors of two safetensors files.
fn max_difference(a: &[u8], b: &[u8]) -> Result<f32, String> {
    let (a, b) = (
        safetensors::SafeTensors::deserialize(a).map_err(|e| e.to_string())?,
        safetensors::SafeTensors::deserialize(b).map_err(|e| e.to_string())?,
    );
    let mut worst = 0f32;
    for (name, x) in a.tensors() {
        let y = b.tensor(&name).map_err(|e| format!("{name}: {e}"))?;
        if x.dtype() != safetensors::Dtype::F32 || x.shape() != y.shape() {
            return Err(format!("{name}: not comparable"));
        }
        let values = |d: &[u8]| {
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>()
        };
        for (p, q) in values(x.data()).iter().zip(values(y.data())) {
            worst = worst.max((p - q).abs());
        }
    }
    Ok(worst)
}

/// Three distinct steps in `3..total - 1`, from a seed of the clock.
fn kill_steps(total: u64) -> Vec<u64> {
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.subsec_nanos().into())
        | 1;
    let mut steps = Vec::new();
    while steps.len() < 3 {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let step = 3 + state % (total.saturating_sub(4).max(1));
        if !steps.contains(&step) {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    steps
}

pub async fn scenario() -> Row {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("chaos-trainer");
    let data = format!("s3://{bucket}/train.jsonl");
    s3.location(&data)
        .put("", dataset().into_bytes())
        .await
        .expect("dataset");
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let whole = format!("s3://{bucket}/whole/");
    let interrupted = format!("s3://{bucket}/interrupted/");
    let whole_config = config(&dir, s3, &data, &whole);
    let interrupted_config = config(&dir, s3, &data, &interrupted);
    let cache = dir.join("cache");

    let (whole_run, killed, recovered) = tokio::task::spawn_blocking({
        let cache = cache.clone();
        move || {
            let whole_run = run(command(s3, &whole_config, &cache), None);
            assert!(whole_run.completed, "the uninterrupted run failed");
            let targets = kill_steps(whole_run.total);
            let mut killed = Vec::new();
            let mut recovered = Duration::ZERO;
            let mut last_kill: Option<Instant> = None;
            for target in targets.iter().copied().map(Some).chain([None]) {
                let attempt = run(command(s3, &interrupted_config, &cache), target);
                if let (Some(kill), Some(first)) = (last_kill, attempt.first_step_at) {
                    recovered = recovered.max(first - kill);
                }
                if let Some(&first) = attempt.steps.first() {
                    assert!(
                        killed.last().is_none_or(|&k: &u64| first > 1 && first <= k + 1),
                        "a restart resumes after its checkpoint, not from scratch (first step {first}, killed at {killed:?})"
                    );
                }
                match target {
                    Some(step) => {
                        assert!(!attempt.completed, "the run ended before step {step}");
                        killed.push(attempt.steps.last().copied().unwrap_or(step));
                        last_kill = Some(Instant::now());
                    }
                    None => assert!(attempt.completed, "the resumed run failed"),
                }
            }
            (whole_run, killed, recovered)
        }
    })
    .await
    .expect("the trainer runs");

    let read = async |uri: &str| {
        s3.location(uri)
            .get("adapter_model.safetensors")
            .await
            .expect("the published adapter")
            .to_vec()
    };
    let (a, b) = (read(&whole).await, read(&interrupted).await);
    let same = Sha256::digest(&a) == Sha256::digest(&b);
    let worst = if same {
        0.0
    } else {
        max_difference(&a, &b).unwrap_or(f32::INFINITY)
    };
    assert!(
        worst <= 1e-6,
        "the resumed adapter differs from the uninterrupted run's by {worst}"
    );
    Row {
        scenario: "trainer SIGKILL x3".to_owned(),
        faults: format!(
            "kill -9 at steps {} of {}; adapter {}",
            killed
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            whole_run.total,
            if same {
                "bit-identical".to_owned()
            } else {
                format!("within {worst:.1e}")
            }
        ),
        requests: None,
        failures: 0,
        recovered: Some(recovered),
    }
}
