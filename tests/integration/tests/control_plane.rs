//! The harness itself: the binaries are the pinned versions, and with the controllers started
//! a Job makes Pods and deleting it cascades, as on a real cluster.

use std::time::Duration;

use graft_testenv::{ControlPlane, eventually};
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

const VERSIONS: &str = include_str!("../../controlplane/versions.env");

#[tokio::test]
async fn apiserver_reports_the_pinned_kubernetes_version() {
    let cp = ControlPlane::shared().await;
    let info = cp
        .client()
        .await
        .apiserver_version()
        .await
        .expect("/version");
    let pinned = VERSIONS
        .lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .expect("KUBERNETES_VERSION in versions.env");
    assert_eq!(info.git_version, pinned);
    assert_eq!(
        format!("v{}.{}", info.major, info.minor),
        pinned.rsplit_once('.').expect("vX.Y.Z").0
    );
}

#[tokio::test]
async fn with_controllers_a_job_creates_pods_and_deletion_cascades() {
    let cp = ControlPlane::shared().await;
    cp.start_controllers().await;
    let ns = cp.namespace("controllers").await;
    let client = cp.client().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "example.invalid/none:1"}]
            }}
        }
    }))
    .expect("job");
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create job");

    let selector = ListParams::default().labels("batch.kubernetes.io/job-name=probe");
    eventually(
        "the job controller to create a pod",
        Duration::from_secs(60),
        async || pods.list(&selector).await.is_ok_and(|l| l.items.len() == 1),
    )
    .await;

    jobs.delete("probe", &DeleteParams::background())
        .await
        .expect("delete job");
    eventually(
        "the garbage collector to delete the pod",
        Duration::from_secs(60),
        async || pods.list(&selector).await.is_ok_and(|l| l.items.is_empty()),
    )
    .await;
}
