//! `kubectl graft canary` and `kubectl graft promote` against the operator and real server
//! pods: each edits the versions server-side, waits until the operator reports Ready, prints
//! every server pod and the versions, and leaves the pods serving exactly what it said.

use graft_api::AdapterDeployment;
use graft_testenv::{ControlPlane, S3Server, workspace_binary};
use kube::{Api, api::PostParams};
use serde_json::Value;

use crate::support::{Fleet, Version, listing, manifest, setup, start_operator, wait_for_reason};

/// Runs `kubectl-graft ARGS -n NS` against the test control plane.
fn kubectl_graft(cp: &ControlPlane, ns: &str, args: &[&str]) -> (bool, String) {
    let args = [args, &["--namespace", ns]].concat();
    cp.run(&workspace_binary("kubectl-graft"), &args)
}

/// The (sha256, weight) pairs a pod serves under `name`.
async fn served(url: &str, name: &str) -> Vec<(String, u64)> {
    let listing = listing(url).await;
    let mut versions: Vec<(String, u64)> = listing["adapters"][name]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|v: &Value| {
            (
                v["sha256"].as_str().unwrap_or_default().to_owned(),
                v["weight"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    versions.sort();
    versions
}

fn sorted(mut pairs: Vec<(String, u64)>) -> Vec<(String, u64)> {
    pairs.sort();
    pairs
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_graft_canary_and_promote_wait_for_ready_and_show_each_pod() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-plugin").await;
    let bucket = S3Server::shared().await.bucket("ad-plugin");
    let v1 = crate::support::store_adapter(&bucket, "bot/v1", 4, 11).await;
    let v2 = crate::support::store_adapter(&bucket, "bot/v2", 4, 12).await;
    let fleet = Fleet::start(&client, &ns, "llama", 2, &[]).await;
    let _operator = start_operator(cp, &ns).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;

    let Version { uri, sha256 } = &v2;
    let (ok, out) = kubectl_graft(
        cp,
        &ns,
        &[
            "canary",
            "bot",
            uri,
            "25",
            "--sha256",
            sha256,
            "--timeout",
            "60",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("versions: {} 75% + {uri} 25%", v1.uri)),
        "{out}"
    );
    assert!(out.contains("Ready (2/2 pods)"), "{out}");
    for pod in &fleet.pods {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("{} ", pod.name)))
            .unwrap_or_else(|| panic!("no row for {} in\n{out}", pod.name));
        assert!(row.split_whitespace().nth(1) == Some("yes"), "{row}");
        assert_eq!(
            served(&pod.url, "bot").await,
            sorted(vec![(v1.sha256.clone(), 75), (v2.sha256.clone(), 25)])
        );
    }
    let version_row = out
        .lines()
        .find(|l| l.starts_with(uri.as_str()))
        .unwrap_or_else(|| panic!("no row for {uri} in\n{out}"));
    assert!(
        version_row.contains("25%") && version_row.ends_with("2/2"),
        "{version_row}"
    );
    let managers: Vec<String> = api
        .get("bot")
        .await
        .expect("get")
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| f.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "kubectl-graft"),
        "{managers:?}"
    );

    let (ok, out) = kubectl_graft(
        cp,
        &ns,
        &["promote", "bot", uri, "--sha256", sha256, "--timeout", "60"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("Ready (2/2 pods)"), "{out}");
    for pod in &fleet.pods {
        assert_eq!(
            served(&pod.url, "bot").await,
            vec![(v2.sha256.clone(), 100)]
        );
    }
}
