//! The operator running with exactly the rights the Helm chart grants its ServiceAccount:
//! everything a FineTuneJob needs works, and nothing is refused.

use graft_api::FineTuneJobPhase::*;
use graft_operator::conditions;
use graft_testenv::{ControlPlane, unique_name};

use crate::support::{
    SECRET, condition, create, create_secret, events_of, jobs_of, live_pod, manifest,
    set_pod_running, setup, start_operator_with, wait_for_phase,
};

fn helm(cp: &ControlPlane, args: &[&str]) {
    let out = cp
        .command("helm")
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_charts_service_account_may_do_everything_a_job_needs() {
    let (cp, client) = setup().await;
    let system = cp.namespace("graft-system").await;
    let release = unique_name("rbac");
    let chart = graft_testenv::repo_root().join("charts/graft");
    let chart = chart.to_str().expect("a UTF-8 path");
    helm(cp, &["install", &release, chart, "--namespace", &system]);
    let account = format!("system:serviceaccount:{system}:{release}-graft-operator");
    let kubeconfig = cp.kubeconfig_as(&account);
    let can_list_secrets = cp
        .command("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["auth", "can-i", "list", "secrets", "--all-namespaces"])
        .output()
        .expect("kubectl auth can-i");
    assert_eq!(
        String::from_utf8_lossy(&can_list_secrets.stdout).trim(),
        "no",
        "the kubeconfig really acts as the chart's ServiceAccount"
    );

    let ns = cp.namespace("ftj-rbac").await;
    create_secret(&client, &ns, SECRET).await;
    let operator = start_operator_with(&kubeconfig, &ns, &system, &[]).await;
    create(&client, &ns, &manifest("least", SECRET)).await;
    create(&client, &ns, &manifest("no-secret", "absent")).await;

    let pod = live_pod(&client, &ns, "least").await;
    set_pod_running(&client, &ns, &pod).await;
    let running = wait_for_phase(&client, &ns, "least", Running).await;
    assert_eq!(
        condition(&running, conditions::READY).map(|c| c.1),
        Some(conditions::JOB_CREATED.to_owned())
    );
    let waiting = wait_for_phase(&client, &ns, "no-secret", Pending).await;
    assert_eq!(
        condition(&waiting, conditions::READY).map(|c| c.1),
        Some(conditions::SECRET_NOT_FOUND.to_owned()),
        "a missing Secret reads as missing, not forbidden"
    );
    assert_eq!(jobs_of(&client, &ns, "least").await.len(), 1);
    assert!(!events_of(&client, &ns, "least").await.is_empty());

    let log = operator.log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    helm(cp, &["uninstall", &release, "--namespace", &system]);
}
