//! The FineTuneJob reconciler's build and apply steps against a real apiserver with the
//! controller-manager running: the objects are accepted, the Job makes a restricted Pod, the
//! trainer's identity may patch only its own job's status, and deletion cascades.

use graft_api::FineTuneJob;
use graft_operator::fine_tune_job::{TrainerDefaults, apply_children, build};
use graft_testenv::{ControlPlane, eventually};
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ManagedFieldsEntry},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};

use crate::support::{SECRET, WAIT, assert_children_removed, create, get, manifest, setup};

fn defaults() -> TrainerDefaults {
    TrainerDefaults {
        image: "ghcr.io/graft-dev/graft-trainer:0.1.0".to_owned(),
        model_cache_size: Quantity("20Gi".to_owned()),
        backoff_limit: 2,
    }
}

async fn create_job(client: &Client, ns: &str, name: &str) -> FineTuneJob {
    create(client, ns, &manifest(name, SECRET)).await;
    get(client, ns, name).await
}

fn can_i(cp: &ControlPlane, ns: &str, user: &str, args: &[&str]) -> bool {
    let out = cp
        .command("kubectl")
        .args(["auth", "can-i", "--namespace", ns, "--as", user])
        .args(args)
        .output()
        .expect("kubectl auth can-i");
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
async fn built_children_run_as_a_restricted_pod_with_least_privilege_and_cascade_on_delete() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-children").await;
    let ftj = create_job(&client, &ns, "tiny").await;

    let children = build(&ftj, &defaults()).expect("build");
    apply_children(&client, &children).await.expect("apply");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let first = jobs.get("tiny").await.expect("Job");
    let managers: Vec<_> = first
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "graft-operator"),
        "{managers:?}"
    );

    // Applying the same children again is a no-op: the spec's generation and the operator's
    // managed-fields entry stay as they were. (The resourceVersion may move meanwhile: the
    // Job controller writes the Job's status.)
    apply_children(&client, &children).await.expect("re-apply");
    let second = jobs.get("tiny").await.expect("Job");
    assert_eq!(first.metadata.generation, second.metadata.generation);
    assert_eq!(operator_entry(&first), operator_entry(&second));

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = ListParams::default().labels("batch.kubernetes.io/job-name=tiny");
    eventually("the Job's pod", WAIT, async || {
        pods.list(&selector).await.is_ok_and(|l| l.items.len() == 1)
    })
    .await;
    let pod = pods.list(&selector).await.expect("pods").items.remove(0);
    let spec = pod.spec.expect("pod spec");
    assert_eq!(spec.service_account_name.as_deref(), Some("tiny-trainer"));
    let container = &spec.containers[0];
    assert_eq!(
        container.args.as_deref(),
        Some(
            &[
                "train".to_owned(),
                "--config".to_owned(),
                "/etc/graft/config.yaml".to_owned()
            ][..]
        )
    );
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem),
        Some(true)
    );

    assert_trainer_may_patch_only_its_own_status(cp, &ns);

    Api::<FineTuneJob>::namespaced(client.clone(), &ns)
        .delete("tiny", &DeleteParams::background())
        .await
        .expect("delete FineTuneJob");
    assert_children_removed(&client, &ns, "tiny").await;
}

fn assert_trainer_may_patch_only_its_own_status(cp: &ControlPlane, ns: &str) {
    let trainer = format!("system:serviceaccount:{ns}:tiny-trainer");
    assert!(can_i(
        cp,
        ns,
        &trainer,
        &[
            "patch",
            "finetunejobs.graft.dev/tiny",
            "--subresource=status"
        ]
    ));
    assert!(!can_i(
        cp,
        ns,
        &trainer,
        &[
            "patch",
            "finetunejobs.graft.dev/other",
            "--subresource=status"
        ]
    ));
    assert!(
        !can_i(cp, ns, &trainer, &["patch", "finetunejobs.graft.dev/tiny"]),
        "the spec stays out of reach"
    );
    assert!(!can_i(cp, ns, &trainer, &["get", "secrets"]));
}

fn operator_entry(job: &Job) -> Option<ManagedFieldsEntry> {
    job.metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some("graft-operator"))
        .cloned()
}
