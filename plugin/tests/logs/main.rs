//! `kubectl graft logs --follow` against the real control plane, the operator and the Job
//! controller: the trainer pod fails, the Job retries it in a new pod, and the plugin prints
//! both attempts' logs in order as they are written, then the job's outcome.
//!
//! There is no kubelet here, so the test plays one: a Node whose address is a small TLS
//! server on 127.0.0.1 answering the apiserver's `/containerLogs/...` requests (what
//! `kubectl logs` goes through), and pod statuses written as a kubelet writes them.

mod kubelet;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use graft_api::all_crds;
use graft_testenv::{
    ControlPlane, Daemon, eventually, install_crds, unique_name, workspace_binary,
};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-graft");
const WAIT: Duration = Duration::from_secs(90);

async fn start_operator(cp: &ControlPlane, namespace: &str) -> Daemon {
    let operator = workspace_binary("graft-operator");
    let identity = unique_name("operator");
    let kubeconfig = cp.kubeconfig().display().to_string();
    Daemon::start_with_env(
        &identity,
        operator.to_str().expect("utf-8 path"),
        &[
            "run",
            "--namespace",
            namespace,
            "--trainer-image",
            "ghcr.io/graft-dev/graft-trainer:test",
            "--metrics-port",
            "{port}",
            "--leader-elect",
            "false",
            "--identity",
            &identity,
        ],
        &[("KUBECONFIG", &kubeconfig)],
    )
    .await
}

/// The job's pod that is not `skip`, once the scheduler has put it on a node.
async fn scheduled_pod(client: &Client, ns: &str, job: &str, skip: Option<&str>) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&format!("graft.dev/finetunejob={job}"));
    let mut found = None;
    eventually(&format!("a scheduled pod of {job}"), WAIT, async || {
        found = pods.list(&selector).await.ok().and_then(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.name.as_deref() != skip)
                .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
                .and_then(|p| p.metadata.name)
        });
        found.is_some()
    })
    .await;
    found.expect("found above")
}

async fn set_pod_status(client: &Client, ns: &str, pod: &str, status: Value) {
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {pod}: {e}"));
}

fn container(state: &Value) -> Value {
    json!([{"name": "trainer", "image": "ghcr.io/graft-dev/graft-trainer:test", "imageID": "",
            "ready": state.get("running").is_some(), "restartCount": 0, "state": state}])
}

async fn set_running(client: &Client, ns: &str, pod: &str) {
    let now = Timestamp::now().to_string();
    set_pod_status(
        client,
        ns,
        pod,
        json!({"phase": "Running", "startTime": now,
               "containerStatuses": container(&json!({"running": {"startedAt": now}}))}),
    )
    .await;
}

async fn set_exited(client: &Client, ns: &str, pod: &str, code: i32, message: &str) {
    let now = Timestamp::now().to_string();
    set_pod_status(
        client,
        ns,
        pod,
        json!({"phase": if code == 0 { "Succeeded" } else { "Failed" },
               "containerStatuses": container(&json!({"terminated": {
                   "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                   "message": message, "startedAt": now, "finishedAt": now}}))}),
    )
    .await;
}

/// What the plugin has printed so far, read on a thread as it comes.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }

    async fn wait_for(&self, needle: &str) {
        eventually(&format!("{needle:?} printed"), WAIT, async || {
            self.lines().iter().any(|l| l.contains(needle))
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_a_retried_trainer_to_the_end_of_the_job() {
    let cp = ControlPlane::shared().await;
    let client = cp.client().await;
    install_crds(&client, &all_crds()).await;
    let kubelet = kubelet::Kubelet::start(&client).await;
    cp.start_controllers().await;
    let ns = cp.namespace("plugin-logs").await;
    let _operator = start_operator(cp, &ns).await;
    let job = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "colours"},
        "spec": {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://data/train.jsonl"},
                 "output": {"uri": "s3://adapters/colours/"}},
    }))
    .expect("a FineTuneJob");
    Api::<graft_api::FineTuneJob>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await
        .expect("create");

    let first = scheduled_pod(&client, &ns, "colours", None).await;
    set_running(&client, &ns, &first).await;
    kubelet.write(&first, "step 1 loss 2.5");
    let mut child = Command::new(PLUGIN)
        .args(["logs", "colours", "--follow", "-n", &ns])
        .env("KUBECONFIG", cp.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl-graft starts");
    let output = Output::default();
    let reader = {
        let (output, stdout) = (output.clone(), child.stdout.take().expect("stdout"));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                output.0.lock().expect("lock").push(line);
            }
        })
    };
    output.wait_for("step 1 loss 2.5").await;
    // Written while the plugin follows: it arrives without a new request.
    kubelet.write(&first, "step 2 loss 2.1");
    output.wait_for("step 2 loss 2.1").await;
    kubelet.write(&first, "CUDA error: out of memory");
    kubelet.close(&first);
    set_exited(&client, &ns, &first, 1, "CUDA error: out of memory").await;

    // The Job controller retries in a new pod (after its back-off of about 10 s).
    let second = scheduled_pod(&client, &ns, "colours", Some(&first)).await;
    set_running(&client, &ns, &second).await;
    kubelet.write(&second, "resuming after step 2");
    kubelet.write(&second, "step 3 loss 1.7");
    kubelet.close(&second);
    let result = json!({"adapter": {"uri": "s3://adapters/colours/", "sha256": "b".repeat(64),
                                    "sizeBytes": 10, "trainableParameters": 5}});
    set_exited(&client, &ns, &second, 0, &result.to_string()).await;

    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().expect("kubectl-graft exits");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        (status, stderr)
    });
    let (status, stderr) = tokio::time::timeout(WAIT, status)
        .await
        .expect("kubectl-graft ends with the job")
        .expect("join");
    reader.join().expect("reader");
    assert!(status.success(), "{stderr}");
    let expected = [
        format!("==> pod {first} (attempt 1) <=="),
        "step 1 loss 2.5".to_owned(),
        "step 2 loss 2.1".to_owned(),
        "CUDA error: out of memory".to_owned(),
        format!("==> pod {first} exited with code 1: CUDA error: out of memory <=="),
        format!("==> pod {second} (attempt 2) <=="),
        "resuming after step 2".to_owned(),
        "step 3 loss 1.7".to_owned(),
        format!("==> pod {second} exited with code 0 <=="),
        "==> finetunejob/colours Succeeded: adapter s3://adapters/colours/ <==".to_owned(),
    ];
    assert_eq!(output.lines(), expected, "{stderr}");

    // Without --follow, after the fact: both attempts, then the outcome.
    let (ok, text) = cp.run(
        std::path::Path::new(PLUGIN),
        &["logs", "colours", "-n", &ns],
    );
    assert!(ok, "{text}");
    assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{text}");
}
