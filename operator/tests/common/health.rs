//! What other tools make of Graft's statuses: `kubectl wait` (kstatus conditions, with their
//! observedGeneration) and the Argo CD health checks the repository ships, run with Argo CD's
//! own Lua runtime. Shared by the FineTuneJob and AdapterDeployment tests.

#![allow(dead_code)] // each test binary uses a subset

use graft_testenv::ControlPlane;
use serde_json::Value;

/// `kubectl wait --for=<condition> <object>` with `timeout`: whether it was met.
pub fn kubectl_wait(
    cp: &ControlPlane,
    ns: &str,
    object: &str,
    condition: &str,
    timeout: &str,
) -> bool {
    cp.command("kubectl")
        .args(["wait", "--namespace", ns, object])
        .arg(format!("--for={condition}"))
        .arg(format!("--timeout={timeout}"))
        .output()
        .expect("kubectl wait")
        .status
        .success()
}

/// Argo CD's health check for `kind` from `examples/gitops/argocd-cm.yaml`, run with Argo CD's
/// Lua on `object`: (status, message).
pub fn argocd_health(kind: &str, object: &impl serde::Serialize) -> (String, String) {
    let cm: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(graft_testenv::repo_root().join("examples/gitops/argocd-cm.yaml"))
            .expect("argocd-cm.yaml"),
    )
    .expect("YAML");
    let script = cm["data"][format!("resource.customizations.health.graft.dev_{kind}")]
        .as_str()
        .unwrap_or_else(|| panic!("no health check for {kind}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("health.lua");
    std::fs::write(&path, script).expect("script");
    let mut child = std::process::Command::new(graft_testenv::tool("argocd-lua"))
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("argocd-lua");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&serde_json::to_vec(object).expect("JSON"))
            .expect("writing the object");
    }
    let out = child.wait_with_output().expect("argocd-lua");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    (
        health["status"].as_str().unwrap_or_default().to_owned(),
        health["message"].as_str().unwrap_or_default().to_owned(),
    )
}
