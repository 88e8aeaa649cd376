//! The operator running with exactly the rights the Helm chart grants its ServiceAccount,
//! cluster-wide and in the namespaced-Roles mode: everything a FineTuneJob needs works,
//! nothing is refused, and no Secret can be read. Teams get Graft's kinds through Kubernetes'
//! own `edit`, `view` and `admin` roles.

use graft_api::FineTuneJobPhase::*;
use graft_operator::conditions;
use graft_testenv::{ControlPlane, eventually, unique_name};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::Api;

use crate::support::{
    SECRET, WAIT, condition, create, create_secret, events_of, jobs_of, live_pod, manifest,
    set_pod_config_error, set_pod_running, setup, start_operator_with, wait_for_phase,
};

/// This binary's CRDs are installed already (by the harness, not by a Helm release), and several
/// releases share them.
const NO_CRDS: &str = "crds.install=false";

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

fn can_i(cp: &ControlPlane, kubeconfig: Option<&std::path::Path>, args: &[&str]) -> bool {
    let mut command = cp.command("kubectl");
    if let Some(kubeconfig) = kubeconfig {
        command.env("KUBECONFIG", kubeconfig);
    }
    let out = command
        .args(["auth", "can-i"])
        .args(args)
        .output()
        .expect("kubectl auth can-i");
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// `helm install` of the chart as `release` in `namespace`, with `extra` arguments.
fn install(cp: &ControlPlane, release: &str, namespace: &str, extra: &[&str]) {
    let chart = graft_testenv::repo_root().join("charts/graft");
    let chart = chart.to_str().expect("a UTF-8 path");
    let mut args = vec![
        "install",
        release,
        chart,
        "--namespace",
        namespace,
        "--set",
        NO_CRDS,
    ];
    args.extend_from_slice(extra);
    helm(cp, &args);
}

/// Runs a job that starts and one whose Secret is missing under the chart's identity.
async fn jobs_work_as(cp: &ControlPlane, kubeconfig: &std::path::Path, ns: &str, lease_ns: &str) {
    let client = cp.client().await;
    create_secret(&client, ns, SECRET).await;
    let operator = start_operator_with(kubeconfig, ns, lease_ns, &[]).await;
    create(&client, ns, &manifest("least", SECRET)).await;
    create(&client, ns, &manifest("no-secret", "absent")).await;

    let pod = live_pod(&client, ns, "least").await;
    set_pod_running(&client, ns, &pod).await;
    let running = wait_for_phase(&client, ns, "least", Running).await;
    assert_eq!(
        condition(&running, conditions::RECONCILING).map(|c| (c.0, c.1)),
        Some(("True".to_owned(), conditions::POD_RUNNING.to_owned()))
    );
    assert_eq!(jobs_of(&client, ns, "least").await.len(), 1);
    assert!(!events_of(&client, ns, "least").await.is_empty());

    // Without `get` on Secrets the operator cannot look first; the kubelet's report of the
    // missing Secret stalls the job instead, with the kubelet's words.
    let stuck = live_pod(&client, ns, "no-secret").await;
    set_pod_config_error(&client, ns, &stuck, "secret \"absent\" not found").await;
    let api: Api<graft_api::FineTuneJob> = Api::namespaced(client.clone(), ns);
    eventually("no-secret to stall on its Secret", WAIT, async || {
        api.get("no-secret").await.is_ok_and(|f| {
            condition(&f, conditions::STALLED)
                .is_some_and(|c| c.0 == "True" && c.1 == conditions::SECRET_NOT_FOUND)
        })
    })
    .await;

    let log = operator.log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
}

#[tokio::test]
async fn the_charts_service_account_may_do_everything_a_job_needs_and_read_no_secret() {
    let (cp, _client) = setup().await;
    let system = cp.namespace("graft-system").await;
    let release = unique_name("rbac");
    install(cp, &release, &system, &[]);
    let account = format!("system:serviceaccount:{system}:{release}-graft-operator");
    let kubeconfig = cp.kubeconfig_as(&account);
    for secrets in [
        ["get", "secrets", "--all-namespaces"],
        ["list", "secrets", "--all-namespaces"],
    ] {
        assert!(
            !can_i(cp, Some(&kubeconfig), &secrets),
            "the operator may not {secrets:?}"
        );
    }
    for unused in [
        ["delete", "jobs.batch", "--all-namespaces"],
        ["list", "configmaps", "--all-namespaces"],
        ["watch", "serviceaccounts", "--all-namespaces"],
        [
            "delete",
            "roles.rbac.authorization.k8s.io",
            "--all-namespaces",
        ],
    ] {
        assert!(
            !can_i(cp, Some(&kubeconfig), &unused),
            "the operator has no use for {unused:?}"
        );
    }

    let ns = cp.namespace("ftj-rbac").await;
    jobs_work_as(cp, &kubeconfig, &ns, &system).await;
    helm(cp, &["uninstall", &release, "--namespace", &system]);
}

#[tokio::test]
async fn with_a_watched_namespace_the_operator_gets_namespaced_roles_only() {
    let (cp, client) = setup().await;
    let system = cp.namespace("graft-system").await;
    let ns = cp.namespace("ftj-namespaced").await;
    let release = unique_name("rbac-ns");
    install(
        cp,
        &release,
        &system,
        &["--set", &format!("operator.watchNamespace={ns}")],
    );
    let operator = format!("{release}-graft-operator");
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&operator)
            .await
            .expect("get")
            .is_none(),
        "no cluster-wide role"
    );
    for namespace in [&ns, &system] {
        Api::<Role>::namespaced(client.clone(), namespace)
            .get(&operator)
            .await
            .unwrap_or_else(|e| panic!("a Role in {namespace}: {e}"));
    }
    let account = format!("system:serviceaccount:{system}:{operator}");
    let kubeconfig = cp.kubeconfig_as(&account);
    let elsewhere = cp.namespace("ftj-elsewhere").await;
    assert!(can_i(
        cp,
        Some(&kubeconfig),
        &["create", "jobs.batch", "--namespace", &ns]
    ));
    assert!(!can_i(
        cp,
        Some(&kubeconfig),
        &["create", "jobs.batch", "--namespace", &elsewhere]
    ));
    assert!(!can_i(
        cp,
        Some(&kubeconfig),
        &["list", "finetunejobs.graft.dev", "--all-namespaces"]
    ));
    jobs_work_as(cp, &kubeconfig, &ns, &system).await;
    helm(cp, &["uninstall", &release, "--namespace", &system]);
}

#[tokio::test]
async fn teams_get_graft_kinds_through_the_edit_view_and_admin_roles() {
    let (cp, _client) = setup().await;
    let system = cp.namespace("graft-system").await;
    let team = cp.namespace("team").await;
    let release = unique_name("rbac-agg");
    install(cp, &release, &system, &[]);
    let bind = |user: &str, role: &str| {
        let out = cp
            .command("kubectl")
            .args(["create", "rolebinding", &format!("{user}-{role}")])
            .args(["--namespace", &team, "--clusterrole", role, "--user", user])
            .output()
            .expect("kubectl create rolebinding");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    bind("dev", "edit");
    bind("reader", "view");
    bind("lead", "admin");
    let may = |user: &str, verb: &str, resource: &str| {
        can_i(
            cp,
            None,
            &[verb, resource, "--namespace", &team, "--as", user],
        )
    };
    // The aggregation controller folds the chart's roles into the built-in ones.
    eventually("the edit role to include FineTuneJobs", WAIT, async || {
        may("dev", "create", "finetunejobs.graft.dev")
    })
    .await;
    for (user, verb, resource, allowed) in [
        ("dev", "create", "adapterdeployments.graft.dev", true),
        ("dev", "delete", "finetunejobs.graft.dev", true),
        ("dev", "create", "servergrants.graft.dev", false),
        ("dev", "patch", "finetunejobs.graft.dev/status", false),
        ("reader", "list", "adapterdeployments.graft.dev", true),
        ("reader", "get", "finetunejobs.graft.dev", true),
        ("reader", "create", "finetunejobs.graft.dev", false),
        ("lead", "create", "servergrants.graft.dev", true),
        ("lead", "delete", "adapterdeployments.graft.dev", true),
    ] {
        let resource_args = resource.split_once('/').map_or_else(
            || (resource.to_owned(), None),
            |(r, sub)| (r.to_owned(), Some(format!("--subresource={sub}"))),
        );
        let mut args = vec![
            verb,
            resource_args.0.as_str(),
            "--namespace",
            &team,
            "--as",
            user,
        ];
        if let Some(sub) = &resource_args.1 {
            args.push(sub);
        }
        eventually(
            &format!("{user} {verb} {resource}: {allowed}"),
            WAIT,
            async || can_i(cp, None, &args) == allowed,
        )
        .await;
    }
    helm(cp, &["uninstall", &release, "--namespace", &system]);
}
