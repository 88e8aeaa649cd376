use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use tokio::sync::OnceCell;

use crate::{
    pki::{self, Pki},
    process::{self, Process},
    tool, unique_name,
};

const FIELD_MANAGER: &str = "graft-testenv";
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A real etcd + kube-apiserver on 127.0.0.1, with token auth, RBAC and a kubeconfig;
/// kube-controller-manager and kube-scheduler join when a test asks for them.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    pki: Pki,
    etcd: Process,
    /// Behind a lock: [`ControlPlane::restart_apiserver`] replaces it.
    apiserver: std::sync::Mutex<Process>,
    apiserver_args: Vec<String>,
    controllers: OnceCell<(Process, Process)>,
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

impl ControlPlane {
    /// The control plane of this test binary, started on first use.
    pub async fn shared() -> &'static ControlPlane {
        SHARED.get_or_init(Self::start).await
    }

    async fn start() -> Self {
        let started = Instant::now();
        let dir = process::scratch_dir("graft-controlplane-");
        let pki = pki::generate(&dir);

        let etcd_port = free_port();
        let peer_port = free_port();
        let mut etcd = Command::new(tool("etcd"));
        etcd.args([
            "--name=graft-test",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-cluster=graft-test=http://127.0.0.1:{peer_port}"),
            // Test data is thrown away: skip fsync, which dominates etcd latency on CI disks.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        let etcd = process::spawn("etcd", etcd, &dir);
        wait_for_port(&etcd, etcd_port).await;

        let token = random_hex(16);
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{token},graft-admin,graft-admin,\"system:masters\"\n"),
        )
        .expect("writing the token file");
        let api_port = free_port();
        let apiserver_args: Vec<String> = [
            &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--secure-port={api_port}"),
            &format!("--tls-cert-file={}", pki.serving_cert.display()),
            &format!("--tls-private-key-file={}", pki.serving_key.display()),
            &format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!(
                "--service-account-key-file={}",
                pki.service_account_pub.display()
            ),
            &format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ),
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=false",
            "--profiling=false",
            &format!("--cert-dir={}", dir.join("certs").display()),
        ]
        .map(str::to_owned)
        .to_vec();
        let mut apiserver = Command::new(tool("kube-apiserver"));
        apiserver.args(&apiserver_args);
        let apiserver = process::spawn("kube-apiserver", apiserver, &dir);

        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&server, &pki.ca_cert, &token))
            .expect("writing the kubeconfig");

        let cp = Self {
            dir,
            kubeconfig,
            server,
            pki,
            etcd,
            apiserver: std::sync::Mutex::new(apiserver),
            apiserver_args,
            controllers: OnceCell::new(),
        };
        cp.wait_ready().await;
        eprintln!(
            "graft-testenv: control plane ready at {} in {:.1?}",
            cp.server,
            started.elapsed()
        );
        cp
    }

    fn apiserver(&self) -> std::sync::MutexGuard<'_, Process> {
        self.apiserver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops kube-apiserver (SIGKILL, as a crashed control-plane node), leaves it down for
    /// `down`, then starts it again on the same port with the same etcd and waits until it
    /// is ready. Clients keep their address and reconnect.
    pub async fn restart_apiserver(&self, down: Duration) {
        {
            let apiserver = self.apiserver();
            apiserver.signal(libc::SIGKILL);
            assert!(
                apiserver.wait(Duration::from_secs(10)),
                "kube-apiserver survived SIGKILL"
            );
        }
        tokio::time::sleep(down).await;
        let mut command = Command::new(tool("kube-apiserver"));
        command.args(&self.apiserver_args);
        *self.apiserver() = process::spawn("kube-apiserver", command, &self.dir);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            assert!(
                self.etcd.is_running(),
                "etcd exited during start-up:\n{}",
                self.etcd.log_tail()
            );
            {
                let apiserver = self.apiserver();
                assert!(
                    apiserver.is_running(),
                    "kube-apiserver exited during start-up:\n{}",
                    apiserver.log_tail()
                );
            }
            match self.readyz().await {
                Ok(()) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "kube-apiserver not ready after {START_TIMEOUT:?} ({last}):\n{}",
            self.apiserver().log_tail()
        );
    }

    async fn readyz(&self) -> Result<(), String> {
        let client = self.try_client().await.map_err(|e| e.to_string())?;
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        client
            .request_text(request)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    async fn try_client(&self) -> Result<Client, kube::Error> {
        Client::try_from(self.config().await?)
    }

    async fn config(&self) -> Result<Config, kube::Error> {
        let kubeconfig =
            Kubeconfig::read_from(&self.kubeconfig).map_err(kube::Error::InferKubeconfig)?;
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(kube::Error::InferKubeconfig)
    }

    /// A client acting as `user` (e.g. `system:serviceaccount:ns:name`) through impersonation,
    /// with only that identity's RBAC rights.
    pub async fn client_as(&self, user: &str) -> Client {
        let mut config = self.config().await.expect("reading the test kubeconfig");
        config.auth_info.impersonate = Some(user.to_owned());
        Client::try_from(config).expect("building an impersonating client")
    }

    /// A client with cluster-admin rights. Make one per test: a client is bound to the
    /// tokio runtime that created it.
    pub async fn client(&self) -> Client {
        self.try_client()
            .await
            .expect("building a client from the test kubeconfig")
    }

    /// The kubeconfig file, for `kubectl`, `helm` and processes under test.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig acting as `user` through impersonation, for a process under test that
    /// must get by with that identity's RBAC rights (e.g. the chart's ServiceAccount).
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("reading the kubeconfig");
        let text = text.replacen("    token: ", &format!("    as: {user}\n    token: "), 1);
        let path = crate::process::scratch_dir("graft-kubeconfig-").join("kubeconfig");
        std::fs::write(&path, text).expect("writing an impersonating kubeconfig");
        path
    }

    /// A token of ServiceAccount `namespace/name` bound to `audience` (the TokenRequest API, as
    /// the kubelet gets a projected token), valid for `seconds`.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        seconds: i64,
    ) -> String {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        let client = self.client().await;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let account = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}});
        accounts
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(account),
            )
            .await
            .expect("creating the ServiceAccount");
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                expiration_seconds: Some(seconds),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let data = serde_json::to_vec(&request).expect("a TokenRequest");
        let response: TokenRequest = client
            .request(
                http::Request::post(format!(
                    "/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
                ))
                .header("content-type", "application/json")
                .body(data)
                .expect("a request"),
            )
            .await
            .expect("the TokenRequest API");
        response.status.expect("a token").token
    }

    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA that signed the apiserver's serving certificate.
    pub fn ca_cert(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// A command for a cached tool (`kubectl`, `helm`) pointed at this control plane, with
    /// helm's caches inside the control plane's directory so tests leave nothing in `$HOME`.
    pub fn command(&self, name: &str) -> Command {
        let mut command = Command::new(tool(name));
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        command
    }

    /// Runs `program` with `args` against this control plane (its kubeconfig in `KUBECONFIG`,
    /// as kubectl plugins read it): whether it succeeded, and its stdout then its stderr.
    pub fn run(&self, program: &Path, args: &[&str]) -> (bool, String) {
        let out = Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `kubectl apply --dry-run=server` of `manifests` in `namespace`: the apiserver runs
    /// admission and schema validation and stores nothing. Returns kubectl's report.
    ///
    /// # Panics
    /// When the apiserver refuses any object, with kubectl's output.
    pub fn server_dry_run(&self, namespace: &str, manifests: &[u8]) -> String {
        use std::{io::Write, process::Stdio};
        let mut child = self
            .command("kubectl")
            .args([
                "apply",
                "--dry-run=server",
                "--namespace",
                namespace,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl");
        child
            .stdin
            .take()
            .expect("kubectl stdin")
            .write_all(manifests)
            .expect("piping manifests to kubectl");
        let out = child.wait_with_output().expect("waiting for kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "server dry run refused:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Starts kube-controller-manager and kube-scheduler (once per test binary), so that Jobs
    /// create Pods, deletions cascade and namespaces get their default ServiceAccount.
    pub async fn start_controllers(&self) {
        self.controllers
            .get_or_init(|| self.spawn_controllers())
            .await;
    }

    async fn spawn_controllers(&self) -> (Process, Process) {
        let mut kcm = Command::new(tool("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={}", self.kubeconfig.display()),
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            &format!("--secure-port={}", free_port()),
            &format!(
                "--service-account-private-key-file={}",
                self.pki.service_account_key.display()
            ),
            &format!("--root-ca-file={}", self.pki.ca_cert.display()),
            "--use-service-account-credentials=false",
            // Fast garbage collection and job updates keep cascade tests short.
            "--concurrent-gc-syncs=5",
        ]);
        let kcm = process::spawn("kube-controller-manager", kcm, &self.dir);
        let mut scheduler = Command::new(tool("kube-scheduler"));
        scheduler.args([
            &format!("--kubeconfig={}", self.kubeconfig.display()),
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            &format!("--secure-port={}", free_port()),
        ]);
        let scheduler = process::spawn("kube-scheduler", scheduler, &self.dir);

        // The service-account controller creating kube-system's default account shows the
        // controller-manager is connected and running its controllers.
        let client = self.client().await;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "kube-system");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for p in [&kcm, &scheduler] {
                assert!(
                    p.is_running(),
                    "{} exited during start-up:\n{}",
                    p.name,
                    p.log_tail()
                );
            }
            if accounts.get_opt("default").await.ok().flatten().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-controller-manager not working:\n{}",
                kcm.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (kcm, scheduler)
    }

    /// Creates a fresh namespace (with its default ServiceAccount, which Pods need even when
    /// no controller-manager runs) and returns its name.
    pub async fn namespace(&self, prefix: &str) -> String {
        let client = self.client().await;
        let name = unique_name(prefix);
        let params = PatchParams::apply(FIELD_MANAGER);
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        Api::<Namespace>::all(client.clone())
            .patch(&name, &params, &Patch::Apply(ns))
            .await
            .expect("creating a test namespace");
        let sa = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
        Api::<ServiceAccount>::namespaced(client, &name)
            .patch("default", &params, &Patch::Apply(sa))
            .await
            .expect("creating the default ServiceAccount");
        name
    }
}

/// Applies CRDs (server-side) and waits until the apiserver serves them.
pub async fn install_crds(client: &Client, crds: &[CustomResourceDefinition]) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in crds {
        let name = crd.metadata.name.clone().expect("a CRD has a name");
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established after 30 s"))
        .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
    }
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: graft-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: graft-admin\n  user:\n    token: {token}\ncontexts:\n- name: graft-test\n  context:\n    cluster: graft-test\n    user: graft-admin\n\
         current-context: graft-test\n",
        ca = ca.display()
    )
}

/// A port that was free a moment ago. Another process could take it before ours binds;
/// on a test machine that race is rare enough, and a start-up failure then names the port.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

pub(crate) async fn wait_for_port(process: &Process, port: u16) {
    let deadline = Instant::now() + START_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            process.is_running(),
            "{} exited during start-up:\n{}",
            process.name,
            process.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "{} not listening on {port}:\n{}",
            process.name,
            process.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter()
        .fold(String::with_capacity(bytes * 2), |mut hex, b| {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
            hex
        })
}
