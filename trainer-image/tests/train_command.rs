//! `graft-trainer train` as a pod runs it: a tiny model made by `make-tiny-model`, a dataset
//! and the output in a real S3-protocol server, credentials from the environment. Checks the
//! published adapter, resuming after a kill, and the one-line reasons for bad input.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use candle_core::Device;
use graft_engine::adapters::Adapter;
use graft_testenv::S3Server;
use sha2::{Digest, Sha256};

const TRAINER: &str = env!("CARGO_BIN_EXE_graft-trainer");

/// Prompts naming a colour answered by a fixed animal: a mapping a tiny model can learn.
fn pairs() -> Vec<(String, String)> {
    let colours = [
        "red", "blue", "green", "gold", "pink", "grey", "teal", "plum",
    ];
    let animals = ["fox", "owl", "cat", "yak", "emu", "eel", "ant", "bee"];
    colours
        .iter()
        .zip(animals)
        .map(|(c, a)| (format!("colour {c} ->"), format!(" {a}")))
        .collect()
}

fn dataset_jsonl() -> String {
    pairs()
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n")
        .collect()
}

/// A tiny model made by the trainer's own subcommand, once per test binary.
fn tiny_model() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("graft-tiny-{}", std::process::id()));
        let corpus = dir.with_extension("corpus.txt");
        let text = pairs()
            .iter()
            .map(|(p, c)| format!("{p}{c}"))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&corpus, format!("{text}\n").repeat(4)).expect("corpus");
        let out = Command::new(TRAINER)
            .args(["make-tiny-model", "--seed", "3", "--out"])
            .arg(&dir)
            .arg("--corpus")
            .arg(&corpus)
            .output()
            .expect("make-tiny-model runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

struct Run {
    config: PathBuf,
    cache: PathBuf,
}

/// A config like the operator renders, training on `dataset` (an S3 URI) into `output`.
fn config(s3: &S3Server, dataset: &str, output: &str) -> Run {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let model = tiny_model().display();
    let yaml = format!(
        r"
baseModel: {{uri: 'file://{model}'}}
dataset: {{uri: '{dataset}', validationFraction: 0.25}}
method:
  quantization: nf4
  lora: {{rank: 8, alpha: 16, dropout: 0.05, targetModules: [q_proj, v_proj, o_proj, up_proj, down_proj]}}
training: {{epochs: 8, learningRate: 0.01, batchSize: 2, gradientAccumulationSteps: 1,
           maxSequenceLength: 32, warmupSteps: 2, scheduler: cosine, seed: 11,
           checkpointEverySteps: 4, gradientCheckpointing: true}}
output: {{uri: '{output}'}}
storage: {{endpoint: '{endpoint}', region: {region}}}
resources: {{gpus: 0}}
",
        endpoint = s3.endpoint(),
        region = s3.region(),
    );
    let config = dir.join("config.yaml");
    std::fs::write(&config, yaml).expect("config");
    Run {
        config,
        cache: dir.join("cache"),
    }
}

fn command(s3: &S3Server, run: &Run) -> Command {
    let mut command = Command::new(TRAINER);
    command
        .args(["train", "--config"])
        .arg(&run.config)
        .arg("--cache-dir")
        .arg(&run.cache)
        .env("AWS_ACCESS_KEY_ID", s3.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_access_key())
        .env(
            "GRAFT_TERMINATION_LOG",
            run.cache.with_file_name("termination-log"),
        )
        .stdin(Stdio::null());
    command
}

fn train(s3: &S3Server, run: &Run) -> Output {
    command(s3, run).output().expect("the trainer runs")
}

async fn put(s3: &S3Server, uri: &str, body: &str) {
    s3.location(uri)
        .put("", body.as_bytes().to_vec())
        .await
        .expect("put");
}

async fn adapter(s3: &S3Server, output: &str) -> (Adapter, Vec<u8>) {
    let out = s3.location(output);
    let config = out
        .get("adapter_config.json")
        .await
        .expect("adapter_config.json");
    let weights = out.get("adapter_model.safetensors").await.expect("weights");
    let adapter = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("a PEFT adapter");
    (adapter, weights.to_vec())
}

/// A dataset prefix (`s3://bucket/prefix/`) of JSON Lines and Parquet files, as a hub dataset
/// is downloaded: every record of every file is trained or held out, metadata columns and
/// other files are ignored, and graft.json's digest covers each file.
#[tokio::test]
async fn a_prefix_of_jsonl_and_parquet_files_is_one_dataset() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("prefix");
    let prefix = format!("s3://{bucket}/colours/");
    let pairs = pairs();
    let line = |(p, c): &(String, String)| {
        serde_json::json!({"prompt": p, "completion": c, "id": p.len()}).to_string() + "\n"
    };
    put(
        s3,
        &format!("{prefix}a.jsonl"),
        &pairs[..3].iter().map(line).collect::<String>(),
    )
    .await;
    put(s3, &format!("{prefix}README.md"), "# not a dataset file\n").await;
    // Parquet files written by pyarrow, Snappy- and Zstandard-compressed, with a metadata column.
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, rows, codec) in [
        ("b.parquet", &pairs[3..6], "snappy"),
        ("c.parquet", &pairs[6..], "zstd"),
    ] {
        let path = dir.path().join(name);
        let (prompts, completions): (Vec<_>, Vec<_>) = rows.iter().cloned().unzip();
        let script = format!(
            "import pyarrow as pa, pyarrow.parquet as pq\n\
             pq.write_table(pa.table({{'prompt': {prompts:?}, 'completion': {completions:?}, \
             'source': ['hub'] * {n}}}), {path:?}, compression={codec:?})",
            n = rows.len(),
            path = path.display().to_string(),
        );
        let out = Command::new(graft_testenv::oracle_python())
            .args(["-c", &script])
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s3.location(&format!("{prefix}{name}"))
            .put("", std::fs::read(&path).expect("parquet"))
            .await
            .expect("put");
    }

    let output = format!("s3://{bucket}/adapters/colours/");
    let run = config(s3, &prefix, &output);
    let out = train(s3, &run);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graft: serde_json::Value = serde_json::from_slice(
        &s3.location(&output)
            .get("graft.json")
            .await
            .expect("graft.json"),
    )
    .expect("JSON");
    let metrics = &graft["metrics"];
    let examples = |k: &str| {
        metrics[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {metrics}"))
    };
    assert_eq!(
        examples("trainExamples") + examples("evalExamples"),
        8,
        "every record of the three files"
    );
    let mut all = Sha256::new();
    for name in ["a.jsonl", "b.parquet", "c.parquet"] {
        let bytes = s3
            .location(&format!("{prefix}{name}"))
            .get("")
            .await
            .expect("file");
        all.update(format!("{name}  {:x}\n", Sha256::digest(&bytes)));
    }
    assert_eq!(graft["dataset"]["sha256"], format!("{:x}", all.finalize()));

    let empty = format!("s3://{bucket}/nothing-here/");
    put(s3, &format!("{empty}notes.txt"), "x").await;
    let run = config(s3, &empty, &format!("s3://{bucket}/adapters/none/"));
    let out = train(s3, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no .jsonl, .json or .parquet files"),
        "{stderr}"
    );
}

#[tokio::test]
async fn trains_publishes_a_complete_adapter_and_reports_each_step() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("train");
    let dataset = format!("s3://{bucket}/data/train.jsonl");
    put(s3, &dataset, &dataset_jsonl()).await;
    let output = format!("s3://{bucket}/adapters/colours/v1/");
    let run = config(s3, &dataset, &output);
    let out = train(s3, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    // One JSON line per step, the loss falling, eval loss at epoch ends.
    let steps: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    // 6 training records, batch 2: 3 steps per epoch, 8 epochs.
    assert_eq!(steps.len(), 24);
    assert_eq!(steps.last().expect("steps")["totalSteps"], 24);
    let loss = |i: usize| steps[i]["loss"].as_f64().expect("loss");
    assert!(loss(23) < loss(0) * 0.2, "loss {} → {}", loss(0), loss(23));
    assert!(steps[2]["evalLoss"].is_f64() && steps[0]["evalLoss"].is_null());

    // The adapter is PEFT's, its digest is in graft.json and the result line.
    let (adapter, weights) = adapter(s3, &output).await;
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.weights.len(), 2 * 5, "5 sites on 2 layers");
    let sha = format!("{:x}", Sha256::digest(&weights));
    let out_location = s3.location(&output);
    let graft: serde_json::Value =
        serde_json::from_slice(&out_location.get("graft.json").await.expect("graft.json"))
            .expect("JSON");
    assert_eq!(graft["adapter"]["sha256"], sha);
    assert_eq!(graft["adapter"]["sizeBytes"], weights.len());
    assert_eq!(graft["dataset"]["uri"], dataset);
    assert_eq!(
        graft["baseModel"]["sha256"].as_str().map(str::len),
        Some(64)
    );
    assert!(
        stderr.contains(&sha),
        "the result line names the digest: {stderr}"
    );
    // Nothing half-written stays behind; the checkpoints do, for a later resume.
    let names: Vec<String> = out_location
        .list_all()
        .await
        .expect("list")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".staging")),
        "{names:?}"
    );
    assert!(
        names.contains(&"checkpoints/step-20/state.json".to_owned()),
        "{names:?}"
    );
    // TensorBoard's event file is beside them (tensorboard_oracle.rs reads one).
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("runs/events.out.tfevents.")),
        "{names:?}"
    );
}

#[tokio::test]
async fn killed_and_restarted_it_resumes_and_ends_as_an_uninterrupted_run() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("resume");
    let dataset = format!("s3://{bucket}/train.jsonl");
    put(s3, &dataset, &dataset_jsonl()).await;

    // Long enough (90 steps) that the kill lands between the first checkpoint and the end.
    let longer = |run: Run| {
        let text = std::fs::read_to_string(&run.config).expect("config");
        std::fs::write(&run.config, text.replace("epochs: 8,", "epochs: 30,")).expect("config");
        run
    };
    let whole = format!("s3://{bucket}/whole/");
    let out = train(s3, &longer(config(s3, &dataset, &whole)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let interrupted = format!("s3://{bucket}/interrupted/");
    let run = longer(config(s3, &dataset, &interrupted));
    let mut child = command(s3, &run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let out_location = s3.location(&interrupted);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let dirs = out_location.list_dirs("checkpoints").await.expect("list");
        if !dirs.is_empty()
            && out_location
                .get_opt(&format!("checkpoints/{}/state.json", dirs[0]))
                .await
                .expect("get")
                .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the run ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert!(
        out_location
            .get_opt("graft.json")
            .await
            .expect("get")
            .is_none(),
        "killed before finishing"
    );

    let resumed = train(s3, &run);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after step"), "{stderr}");
    let first_step = String::from_utf8_lossy(&resumed.stdout)
        .lines()
        .next()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON")["step"].clone());
    assert_ne!(
        first_step,
        Some(serde_json::json!(1)),
        "it did not start over"
    );

    let (a, _) = adapter(s3, &whole).await;
    let (b, _) = adapter(s3, &interrupted).await;
    let mut worst = 0f32;
    for (key, lora) in &a.weights {
        let other = &b.weights[key];
        for (x, y) in [(&lora.a, &other.a), (&lora.b, &other.b)] {
            let diff = (x - y)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            worst = worst.max(diff);
        }
    }
    assert!(worst <= 1e-5, "resumed adapter differs by {worst}");
}

/// Runs the trainer on a bad input and returns its one-line reason (exit code 2 asserted).
async fn refused(
    s3: &S3Server,
    dataset_body: Option<&str>,
    output: Option<&str>,
    edit: impl Fn(String) -> String,
) -> String {
    let bucket = s3.bucket("bad");
    let dataset = format!("s3://{bucket}/train.jsonl");
    if let Some(body) = dataset_body {
        put(s3, &dataset, body).await;
    }
    let output = output.map_or_else(|| format!("s3://{bucket}/out/"), str::to_owned);
    let run = config(s3, &dataset, &output);
    let text = std::fs::read_to_string(&run.config).expect("config");
    std::fs::write(&run.config, edit(text)).expect("config");
    let out = train(s3, &run);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[tokio::test]
async fn bad_input_exits_2_with_a_one_line_reason() {
    let s3 = S3Server::shared().await;
    let good = dataset_jsonl();
    let same = |text: String| text;
    let model = |dir: &Path| {
        let dir = dir.display().to_string();
        move |text: String| text.replace(&tiny_model().display().to_string(), &dir)
    };

    let malformed = format!("{good}{{\"prompt\": \"x\"\n");
    let reason = refused(s3, Some(&malformed), None, same).await;
    assert!(reason.contains("line 9"), "{reason}");

    let reason = refused(s3, Some(""), None, same).await;
    assert!(reason.contains("no records"), "{reason}");

    let reason = refused(s3, None, None, same).await;
    assert!(
        reason.contains("dataset"),
        "missing dataset object: {reason}"
    );

    let empty_model = tempfile::tempdir().expect("tempdir");
    let reason = refused(s3, Some(&good), None, model(empty_model.path())).await;
    assert!(reason.contains("config.json"), "{reason}");

    let other = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(tiny_model()).expect("model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), other.path().join(entry.file_name())).expect("copy");
    }
    let config = other.path().join("config.json");
    let text = std::fs::read_to_string(&config).expect("config.json");
    std::fs::write(&config, text.replace("\"llama\"", "\"gpt2\"")).expect("write");
    let reason = refused(s3, Some(&good), None, model(other.path())).await;
    assert!(
        reason.contains("gpt2"),
        "unsupported architecture named: {reason}"
    );

    // Weights quantized by a method Graft does not read are refused, not served as noise.
    let gptq = r#""quantization_config": {"quant_method": "gptq", "bits": 4}, "model_type""#;
    std::fs::write(&config, text.replace("\"model_type\"", gptq)).expect("write");
    let reason = refused(s3, Some(&good), None, model(other.path())).await;
    assert!(
        reason.contains("gptq checkpoints are not supported"),
        "the quantization method named: {reason}"
    );

    let missing = other.path().join("missing.gguf");
    let reason = refused(s3, Some(&good), None, model(&missing)).await;
    assert!(reason.contains("no such GGUF file"), "{reason}");

    // A file where the output directory would have to be.
    let file = tempfile::NamedTempFile::new().expect("file");
    let blocked = format!("file://{}/out/", file.path().display());
    let reason = refused(s3, Some(&good), Some(&blocked), same).await;
    assert!(reason.contains("not writable"), "{reason}");

    let lm_head = |text: String| text.replace("up_proj, down_proj]", "lm_head]");
    let reason = refused(s3, Some(&good), None, lm_head).await;
    assert!(
        reason.contains("lm_head"),
        "the unknown target module is named: {reason}"
    );
}

/// The rights the operator gives a job's ServiceAccount: its own status, nothing else.
async fn grant_status_rights(admin: &kube::Client, ns: &str) {
    use kube::{Api, api::PostParams};
    let rbac = serde_json::json!([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "trainer", "namespace": ns},
         "rules": [{"apiGroups": ["graft.dev"], "resources": ["finetunejobs/status"],
                    "resourceNames": ["colours"], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "trainer", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trainer"},
         "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": ns}]},
    ]);
    for object in rbac.as_array().expect("list") {
        let kind = object["kind"].as_str().expect("kind");
        let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "rbac.authorization.k8s.io",
            "v1",
            kind,
        ));
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(admin.clone(), ns, &resource);
        let object: kube::api::DynamicObject =
            serde_json::from_value(object.clone()).expect("object");
        api.create(&PostParams::default(), &object)
            .await
            .expect("create RBAC");
    }
}

#[tokio::test]
async fn progress_reaches_the_finetunejobs_status_under_the_trainers_own_rights() {
    use graft_api::{FineTuneJob, all_crds};
    use graft_testenv::{ControlPlane, install_crds};
    use kube::{Api, api::PostParams};

    let cp = ControlPlane::shared().await;
    let admin = cp.client().await;
    install_crds(&admin, &all_crds()).await;
    let ns = cp.namespace("trainer").await;
    let job: FineTuneJob = serde_json::from_value(serde_json::json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "colours", "namespace": ns},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny/"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://adapters/colours/"},
        },
    }))
    .expect("a FineTuneJob");
    let jobs: Api<FineTuneJob> = Api::namespaced(admin.clone(), &ns);
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create");
    grant_status_rights(&admin, &ns).await;

    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("status");
    let dataset = format!("s3://{bucket}/train.jsonl");
    put(s3, &dataset, &dataset_jsonl()).await;
    let run = config(s3, &dataset, &format!("s3://{bucket}/out/"));
    let text = std::fs::read_to_string(&run.config).expect("config");
    let target = format!("statusTarget: {{namespace: {ns}, name: colours}}\n");
    std::fs::write(&run.config, text + &target).expect("config");
    let kubeconfig = cp.kubeconfig_as(&format!("system:serviceaccount:{ns}:trainer"));
    let out = command(s3, &run)
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("the trainer runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("reporting progress"),
        "no failed report: {stderr}"
    );

    let job = jobs.get_status("colours").await.expect("get");
    let progress = job
        .status
        .clone()
        .and_then(|s| s.progress)
        .expect("progress written");
    assert_eq!(
        (progress.step, progress.total_steps),
        (24, 24),
        "the last step is always sent"
    );
    assert!(progress.loss.is_some() && progress.eval_loss.is_some());
    assert!(progress.updated_at.is_some());
    // The loss curve `kubectl graft loss` draws: every step of this short run, the last one
    // being the step reported, with the validation loss at each epoch's end.
    let steps: Vec<u64> = progress.history.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=24).collect::<Vec<_>>());
    assert_eq!(progress.history.last().map(|p| p.loss), progress.loss);
    let evals: Vec<u64> = progress
        .history
        .iter()
        .filter(|p| p.eval_loss.is_some())
        .map(|p| p.step)
        .collect();
    assert_eq!(evals, [3, 6, 9, 12, 15, 18, 21, 24], "3 steps per epoch");
    // The outcome is on the job before the trainer exits, whatever becomes of its pod.
    let adapter = job
        .status
        .as_ref()
        .and_then(|s| s.adapter.clone())
        .expect("the trainer records its adapter");
    assert_eq!(adapter.uri, format!("s3://{bucket}/out/"));
    let termination = std::fs::read_to_string(run.cache.with_file_name("termination-log"))
        .expect("the termination message");
    assert!(termination.contains(&adapter.sha256), "{termination}");
    let managers: Vec<_> = job
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.subresource.as_deref() == Some("status"))
        .filter_map(|f| f.manager)
        .collect();
    assert_eq!(managers, ["graft-trainer"]);
}

/// Colour questions answered one to four times over: records of mixed lengths.
fn mixed_lengths_jsonl() -> String {
    pairs()
        .iter()
        .chain(&pairs()[..4])
        .enumerate()
        .map(|(i, (p, c))| {
            let completion = c.repeat(i % 4 + 1);
            serde_json::json!({"prompt": p, "completion": completion}).to_string() + "\n"
        })
        .collect()
}

/// The steps `train` printed, one JSON object each.
fn steps_of(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test]
async fn packing_trains_the_same_examples_in_fewer_rows_and_steps() {
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("packing");
    let dataset = format!("s3://{bucket}/mixed.jsonl");
    put(s3, &dataset, &mixed_lengths_jsonl()).await;

    let unpacked = train(
        s3,
        &config(s3, &dataset, &format!("s3://{bucket}/unpacked/")),
    );
    assert!(
        unpacked.status.success(),
        "{}",
        String::from_utf8_lossy(&unpacked.stderr)
    );
    // 12 records, a quarter held out: 9 rows of batch 2, 5 steps an epoch, 8 epochs.
    assert_eq!(steps_of(&unpacked).len(), 40);

    let output = format!("s3://{bucket}/packed/");
    let run = config(s3, &dataset, &output);
    let text = std::fs::read_to_string(&run.config).expect("config");
    let packed_text = text.replace(
        "gradientCheckpointing: true}",
        "gradientCheckpointing: true, packing: true}",
    );
    assert_ne!(packed_text, text);
    std::fs::write(&run.config, packed_text).expect("config");
    let packed = train(s3, &run);
    let stderr = String::from_utf8_lossy(&packed.stderr);
    assert!(packed.status.success(), "{stderr}");
    let rows: usize = stderr
        .split("packed 9 examples into ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the packing line: {stderr}"));
    assert!((1..9).contains(&rows), "{rows} rows for 9 examples");
    let steps = steps_of(&packed);
    assert_eq!(
        steps.len(),
        rows.div_ceil(2) * 8,
        "batches of 2 rows, 8 epochs"
    );
    assert!(steps.len() < 40);
    let loss = |i: usize| steps[i]["loss"].as_f64().expect("loss");
    assert!(
        loss(steps.len() - 1) < loss(0) * 0.5,
        "loss {} → {}",
        loss(0),
        loss(steps.len() - 1)
    );
    let (adapter, _) = adapter(s3, &output).await;
    assert_eq!(adapter.weights.len(), 2 * 5, "published");
}
