//! The krew manifest: `plugin/krew/package.sh` packs the built binary and writes the manifest
//! with the archive's real digest, the binary named as krew installs it.

use std::process::Command;

use sha2::{Digest, Sha256};

#[test]
fn package_writes_an_archive_and_a_manifest_naming_its_digest() {
    let root = graft_testenv::repo_root();
    let out = tempfile::tempdir().expect("tempdir");
    let run = Command::new("bash")
        .arg(root.join("plugin/krew/package.sh"))
        .arg(out.path())
        .arg(format!(
            "linux/amd64={}",
            env!("CARGO_BIN_EXE_kubectl-graft")
        ))
        .output()
        .expect("package.sh runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let archive = out.path().join("kubectl-graft_v0.1.0_linux_amd64.tar.gz");
    let bytes = std::fs::read(&archive).expect("the archive");
    let digest = format!("{:x}", Sha256::digest(&bytes));
    let manifest: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(out.path().join("graft.yaml")).expect("the manifest"),
    )
    .expect("YAML");
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["metadata"]["name"], "graft");
    let platforms = manifest["spec"]["platforms"].as_array().expect("platforms");
    let linux = platforms
        .iter()
        .find(|p| {
            p["selector"]["matchLabels"] == serde_json::json!({"os": "linux", "arch": "amd64"})
        })
        .expect("linux/amd64");
    assert_eq!(linux["sha256"], digest.as_str());
    assert_eq!(linux["bin"], "kubectl-graft");
    assert!(
        linux["uri"]
            .as_str()
            .expect("uri")
            .ends_with("kubectl-graft_v0.1.0_linux_amd64.tar.gz")
    );

    let listing = Command::new("tar")
        .args(["-tzf"])
        .arg(&archive)
        .output()
        .expect("tar");
    let names = String::from_utf8_lossy(&listing.stdout);
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["kubectl-graft", "README.md"]
    );
}
