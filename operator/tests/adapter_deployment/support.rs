//! The AdapterDeployment tests' world: the shared control plane, the operator, and a "server
//! Deployment" whose pods are real graft-server processes on 127.0.0.1, registered as Pods
//! (IP, admin port annotation, Ready) since there is no kubelet. Like a kubelet, the harness
//! mounts the `<deployment>-graft-adapters` ConfigMap for a starting server: it writes the
//! ConfigMap's keys into the directory the server reads at start-up.

use std::{path::PathBuf, time::Duration};

use graft_api::{AdapterDeployment, all_crds};
use graft_engine::{adapters::Site, models::Config};
use graft_testenv::{
    ControlPlane, Daemon, S3Server, eventually, install_crds, repo_root, unique_name,
    workspace_binary,
};
use graft_trainer::tiny::random_adapter;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Pod, Secret},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

const OPERATOR: &str = env!("CARGO_BIN_EXE_graft-operator");
pub const TOKEN: &str = "admin-token-for-tests";
pub const WAIT: Duration = Duration::from_secs(60);

pub async fn setup() -> (&'static ControlPlane, Client) {
    static READY: OnceCell<()> = OnceCell::const_new();
    let cp = ControlPlane::shared().await;
    READY
        .get_or_init(async || {
            install_crds(&cp.client().await, &all_crds()).await;
            // The Job controller makes the trainer's pod; the tests play the kubelet.
            cp.start_controllers().await;
        })
        .await;
    (cp, cp.client().await)
}

fn model_dir() -> PathBuf {
    repo_root().join("engine/tests/data/tiny/made")
}

/// `graft-operator run` for `namespace`, re-checking AdapterDeployments every 2 s.
pub async fn start_operator(cp: &ControlPlane, namespace: &str) -> Daemon {
    start_operator_with(cp, namespace, &[]).await
}

/// A file holding the servers' admin token, as the operator's projected token is mounted.
pub fn token_file() -> PathBuf {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("token file");
    path
}

/// [`start_operator`] with `extra` arguments, which replace the defaults they name. The operator
/// has no object-store credentials: the servers alone read adapters.
pub async fn start_operator_with(cp: &ControlPlane, namespace: &str, extra: &[&str]) -> Daemon {
    let identity = unique_name("operator");
    let kubeconfig = cp.kubeconfig().display().to_string();
    let token = token_file().display().to_string();
    let mut args = vec![
        "run",
        "--namespace",
        namespace,
        "--trainer-image",
        "ghcr.io/graft-dev/graft-trainer:test",
        "--metrics-port",
        "{port}",
        "--identity",
        &identity,
    ];
    for (flag, default) in [
        ("--leader-elect", "false"),
        ("--adapter-recheck-seconds", "2"),
        ("--admin-token-file", token.as_str()),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    Daemon::start_with_env(&identity, OPERATOR, &args, &[("KUBECONFIG", &kubeconfig)]).await
}

/// An adapter version in the test S3 server.
#[derive(Clone, Debug)]
pub struct Version {
    pub uri: String,
    pub sha256: String,
}

impl Version {
    /// What responses carry in `system_fingerprint` when this version answered.
    pub fn fingerprint(&self) -> String {
        format!("graft-{}", &self.sha256[..16])
    }
}

/// A random adapter of `rank` for the tiny model, stored under `s3://<bucket>/<prefix>/`.
pub async fn store_adapter(bucket: &str, prefix: &str, rank: usize, seed: u64) -> Version {
    let s3 = S3Server::shared().await;
    let text = std::fs::read_to_string(model_dir().join("config.json")).expect("config.json");
    let config = Config::from_json(&text).expect("config");
    let adapter = random_adapter(&config, rank, seed, &Site::SEPARATE).expect("adapter");
    let (config, weights) = adapter.to_bytes().expect("bytes");
    let uri = format!("s3://{bucket}/{prefix}/");
    let location = s3.location(&uri);
    location
        .put("adapter_config.json", config)
        .await
        .expect("put");
    let sha256 = format!("{:x}", Sha256::digest(&weights));
    location
        .put("adapter_model.safetensors", weights)
        .await
        .expect("put");
    Version { uri, sha256 }
}

/// One server pod: a graft-server process and the Pod object standing for it.
#[derive(Debug)]
pub struct ServerPod {
    pub name: String,
    pub daemon: Daemon,
    pub url: String,
}

/// A server Deployment whose pods are graft-server processes.
pub struct Fleet {
    pub client: Client,
    pub namespace: String,
    pub name: String,
    pub pods: Vec<ServerPod>,
    dir: PathBuf,
    /// The base model's URI.
    model: String,
    extra: Vec<String>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("name", &self.name)
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// The Deployment and `replicas` ready server pods serving the tiny model.
    pub async fn start(
        client: &Client,
        namespace: &str,
        name: &str,
        replicas: usize,
        extra: &[&str],
    ) -> Self {
        Self::start_with_model(client, namespace, name, replicas, &model_uri(), extra).await
    }

    /// [`Fleet::start`] serving the model at `model` (a URI).
    pub async fn start_with_model(
        client: &Client,
        namespace: &str,
        name: &str,
        replicas: usize,
        model: &str,
        extra: &[&str],
    ) -> Self {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        // A server whose admin API serves TLS says so on its Deployment, as the chart does.
        let annotations = if extra.contains(&"--admin-tls-cert") {
            json!({"graft.dev/admin-scheme": "https"})
        } else {
            json!({})
        };
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "replicas": replicas,
                // The extra label keeps the ReplicaSet controller from adopting the pods the
                // harness registers; its own pods never run (no kubelet) and stay unready.
                "selector": {"matchLabels": {"graft.dev/server": name, "test.graft.dev/replicaset": name}},
                "template": {
                    "metadata": {"labels": {"graft.dev/server": name, "test.graft.dev/replicaset": name}},
                    "spec": {"containers": [{"name": "server", "image": "ghcr.io/graft-dev/graft-server:test"}]},
                },
            },
        }))
        .expect("deployment");
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .expect("Deployment");
        let mut fleet = Self {
            client: client.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            pods: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir").keep(),
            model: model.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        for i in 0..replicas {
            let pod = fleet.start_pod(&format!("{name}-{i}")).await;
            fleet.pods.push(pod);
        }
        fleet
    }

    /// Starts a server for pod `pod` with the ConfigMap's adapters, then marks the pod ready.
    async fn start_pod(&self, pod: &str) -> ServerPod {
        let s3 = S3Server::shared().await;
        let dir = self.dir.join(pod);
        let adapters = dir.join("adapters");
        let _ = std::fs::remove_dir_all(&adapters);
        std::fs::create_dir_all(&adapters).expect("adapters dir");
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Some(cm) = config_maps
            .get_opt(&format!("{}-graft-adapters", self.name))
            .await
            .expect("ConfigMap")
        {
            for (key, value) in cm.data.unwrap_or_default() {
                std::fs::write(adapters.join(key), value).expect("mounted key");
            }
        }
        std::fs::write(dir.join("token"), TOKEN).expect("token");
        let model = self.model.clone();
        let (token, cache, adapters) = (
            dir.join("token").display().to_string(),
            dir.join("cache").display().to_string(),
            adapters.display().to_string(),
        );
        let mut args: Vec<&str> = vec![
            "--model",
            &model,
            "--listen",
            "127.0.0.1:{port}",
            "--admin-token-file",
            &token,
            "--cache-dir",
            &cache,
            "--adapters-file",
            &adapters,
            "--s3-endpoint",
            s3.endpoint(),
            "--s3-region",
            s3.region(),
        ];
        args.extend(self.extra.iter().map(String::as_str));
        let server = workspace_binary("graft-server");
        let daemon = Daemon::start_with_env(
            pod,
            server.to_str().expect("utf-8 path"),
            &args,
            &[
                ("AWS_ACCESS_KEY_ID", s3.access_key_id()),
                ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key()),
            ],
        )
        .await;
        let url = format!("http://127.0.0.1:{}", daemon.port());
        let http = reqwest::Client::new();
        eventually("the server ready", WAIT, async || {
            http.get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        let admin_port = if self.extra.iter().any(|a| a == "--admin-listen") {
            daemon.port2()
        } else {
            daemon.port()
        };
        self.register(pod, admin_port).await;
        ServerPod {
            name: pod.to_owned(),
            daemon,
            url,
        }
    }

    /// Creates (or updates) the Pod object and writes the status a kubelet would.
    pub async fn register(&self, pod: &str, port: u16) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": pod,
                "labels": {"graft.dev/server": self.name},
                "annotations": {"graft.dev/admin-port": port.to_string()},
            },
            "spec": {"containers": [{"name": "server", "image": "ghcr.io/graft-dev/graft-server:test"}]},
        });
        pods.patch(
            pod,
            &PatchParams::apply("test-kubelet").force(),
            &Patch::Apply(&object),
        )
        .await
        .expect("the Pod");
        self.set_ready(pod, true).await;
    }

    pub async fn set_ready(&self, pod: &str, ready: bool) {
        let now = Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}],
        }});
        Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .patch_status(pod, &PatchParams::default(), &Patch::Merge(status))
            .await
            .expect("pod status");
    }

    /// Kills pod `index`'s server (as a crash) and starts a fresh one for the same pod.
    pub async fn restart(&mut self, index: usize) {
        let name = self.pods[index].name.clone();
        self.pods[index].daemon.kill();
        self.set_ready(&name, false).await;
        self.pods[index] = self.start_pod(&name).await;
    }

    pub fn pids(&self) -> Vec<u32> {
        self.pods.iter().map(|p| p.daemon.pid()).collect()
    }
}

/// A greedy completion of "colour red" on `url`: `(status, body)`.
pub async fn complete(url: &str, model: &str) -> (u16, Value) {
    complete_prompt(url, model, "colour red").await
}

/// A greedy completion of `prompt` on `url`: `(status, body)`.
pub async fn complete_prompt(url: &str, model: &str, prompt: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub fn manifest(
    name: &str,
    server: &str,
    adapter: &str,
    versions: &[(&Version, u32)],
) -> AdapterDeployment {
    serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {"server": {"name": server}, "adapterName": adapter, "versions": versions_json(versions)},
    }))
    .expect("a valid AdapterDeployment")
}

pub fn versions_json(versions: &[(&Version, u32)]) -> Value {
    versions
        .iter()
        .map(|(v, w)| json!({"source": {"uri": v.uri, "sha256": v.sha256}, "weight": w}))
        .collect()
}

/// Waits until the AdapterDeployment's Ready condition has `reason` for the current generation.
pub async fn wait_for_reason(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> AdapterDeployment {
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), ns);
    let mut last = None;
    eventually(&format!("{name} with reason {reason}"), WAIT, async || {
        let ad = api.get(name).await.expect("get");
        let status = ad.status.clone().unwrap_or_default();
        let done = status.observed_generation == ad.metadata.generation
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == reason);
        last = Some(ad);
        done
    })
    .await;
    last.expect("seen")
}

pub fn ready_reason(ad: &AdapterDeployment) -> (String, String) {
    ad.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Plays the kubelet for a FineTuneJob's trainer pod: runs `graft-trainer` as the Job's pod
/// template says (its args, its env with Secret references resolved, its config ConfigMap as
/// the mounted file), marks the pod running, and on exit writes the exit code and the
/// termination message the trainer left, as a kubelet would.
pub async fn run_trainer_pod(client: &Client, ns: &str, job: &str) {
    use k8s_openapi::api::batch::v1::Job;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pod_name = None;
    eventually(&format!("the trainer pod of {job}"), WAIT, async || {
        pod_name = pods
            .list(&kube::api::ListParams::default().labels(&format!("graft.dev/finetunejob={job}")))
            .await
            .ok()
            .and_then(|l| l.items.into_iter().next())
            .and_then(|p| p.metadata.name);
        pod_name.is_some()
    })
    .await;
    let pod_name = pod_name.expect("found");
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let template = jobs
        .get(job)
        .await
        .expect("the Job")
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let container = &template.containers[0];
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mounted = dir.join("config");
    mount_config(client, ns, &template, &mounted).await;
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.replace("/etc/graft", &mounted.display().to_string()))
        .collect();
    let mut command = std::process::Command::new(workspace_binary("graft-trainer"));
    command
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from.and_then(|v| v.secret_key_ref)) {
            (Some(value), _) => Some(value),
            (None, Some(reference)) => secrets
                .get(&reference.name)
                .await
                .ok()
                .and_then(|s| s.data)
                .and_then(|d| {
                    d.get(&reference.key)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                }),
            _ => None,
        };
        if let Some(value) = value {
            command.env(&var.name, value);
        }
    }
    let cp = ControlPlane::shared().await;
    let termination_log = dir.join("termination-log");
    command
        .env("GRAFT_CACHE_DIR", dir.join("cache"))
        .env("HOME", &dir)
        .env("KUBECONFIG", cp.kubeconfig())
        .env("GRAFT_TERMINATION_LOG", &termination_log);
    set_pod_phase(
        client,
        ns,
        &pod_name,
        json!({"running": {"startedAt": Timestamp::now().to_string()}}),
        "Running",
    )
    .await;
    let output = tokio::task::spawn_blocking(move || command.output().expect("the trainer runs"))
        .await
        .expect("trainer task");
    let code = output.status.code().unwrap_or(1);
    assert_eq!(
        code,
        0,
        "the trainer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let message = std::fs::read_to_string(&termination_log).unwrap_or_default();
    let now = Timestamp::now().to_string();
    let state = json!({"terminated": {"exitCode": code, "reason": "Completed", "message": message,
                                      "startedAt": now, "finishedAt": now}});
    set_pod_phase(client, ns, &pod_name, state, "Succeeded").await;
}

/// Writes the keys of the ConfigMap the pod's config volume names into `dir`, as a kubelet
/// mounts it.
async fn mount_config(
    client: &Client,
    ns: &str,
    template: &k8s_openapi::api::core::v1::PodSpec,
    dir: &std::path::Path,
) {
    let name = template
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
        .expect("the config volume");
    let config = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&name)
        .await
        .expect("the config ConfigMap");
    std::fs::create_dir_all(dir).expect("mount dir");
    for (key, value) in config.data.unwrap_or_default() {
        std::fs::write(dir.join(key), value).expect("mounted key");
    }
}

pub async fn set_pod_phase(client: &Client, ns: &str, pod: &str, state: Value, phase: &str) {
    let now = Timestamp::now().to_string();
    let running = phase == "Running";
    let status = json!({"status": {
        "phase": phase,
        "startTime": now,
        "conditions": [{"type": "Ready", "status": if running { "True" } else { "False" }, "lastTransitionTime": now}],
        "containerStatuses": [{"name": "trainer", "image": "ghcr.io/graft-dev/graft-trainer:test", "imageID": "",
                               "ready": running, "restartCount": 0, "state": state}],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(pod, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("trainer pod status");
}

/// A Secret with the test S3 server's credentials, as a FineTuneJob's `storage.secretRef`.
pub async fn create_s3_secret(client: &Client, ns: &str, name: &str) {
    let s3 = S3Server::shared().await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key_id(), "AWS_SECRET_ACCESS_KEY": s3.secret_access_key()},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("S3 Secret");
}

/// Uploads `text` to `uri` in the test S3 server.
pub async fn put_object(uri: &str, text: &str) {
    let s3 = S3Server::shared().await;
    let location = s3.location(uri);
    location
        .put("", text.as_bytes().to_vec())
        .await
        .expect("put");
}

/// The tiny model's `file://` URI.
pub fn model_uri() -> String {
    format!("file://{}", model_dir().display())
}

/// A client sending completions for `bot` to every server in turn, without pause.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(std::collections::HashMap<String, usize>, Vec<String>)>,
}

impl Load {
    pub fn start(urls: Vec<String>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = std::collections::HashMap::new();
            let mut failures = Vec::new();
            let mut i = 0;
            while !flag.load(Ordering::Relaxed) {
                let (code, body) = complete(&urls[i % urls.len()], "bot").await;
                i += 1;
                if code == 200 {
                    *seen
                        .entry(
                            body["system_fingerprint"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        )
                        .or_default() += 1;
                } else {
                    failures.push(format!("{code}: {body}"));
                }
            }
            (seen, failures)
        });
        Self { stop, task }
    }

    /// Stops it: responses by the version fingerprint that answered, and the failures.
    pub async fn finish(self) -> (std::collections::HashMap<String, usize>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the load task")
    }
}

/// `GET /admin/adapters` of the server at `url`.
pub async fn listing(url: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{url}/admin/adapters"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("listing")
        .json()
        .await
        .expect("json")
}

/// `graft_reconciles_total` of the operator's AdapterDeployment controller.
pub async fn reconciles(operator: &Daemon) -> u64 {
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/metrics", operator.port()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"graft_reconciles_total{controller="adapterdeployment"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The (type, reason) of every Event about `name`.
pub async fn events_of(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    use k8s_openapi::api::events::v1::Event;
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect()
}

/// The adapter names `url`'s server lists.
pub async fn loaded(url: &str) -> Vec<String> {
    listing(url).await["adapters"]
        .as_object()
        .map(|a| a.keys().cloned().collect())
        .unwrap_or_default()
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.crt`) and a serving certificate it signed for `name` (`tls.crt`, `tls.key`), as
/// cert-manager would issue for a server's Service, in a new directory.
pub fn certificates(name: &str) -> PathBuf {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        ]
        .concat(),
    );
    openssl(
        &dir,
        &[
            &["req"],
            &ec[..],
            &[
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("tls.ext"),
        format!(
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:{name}\n"
        ),
    )
    .expect("extensions");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "tls.ext",
            "-out",
            "tls.crt",
        ],
    );
    dir
}
