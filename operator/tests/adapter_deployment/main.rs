//! AdapterDeployment against the local control plane, the S3 server and real graft-server
//! processes standing in for a server Deployment's pods: rollout, promotion and canary under
//! load with no failed request and no restart, recovery of a restarted pod and of drift,
//! incompatible adapters refused while the servers keep serving, unloading on delete, and the
//! status as `kubectl wait` and Argo CD read it.

#[path = "../common/health.rs"]
mod health;
mod kubectl_graft;
mod support;
mod tenancy;
mod unload;

use std::time::Duration;

use graft_api::AdapterDeployment;
use graft_testenv::{S3Server, eventually, smollm2_first_layers};
use health::{argocd_health, kubectl_wait};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::{
    Fleet, Load, TOKEN, Version, WAIT, complete, complete_prompt, create_s3_secret, listing,
    manifest, put_object, ready_reason, run_trainer_pod, setup, start_operator,
    start_operator_with, store_adapter, versions_json, wait_for_reason,
};

async fn set_versions(api: &Api<AdapterDeployment>, name: &str, versions: &[(&Version, u32)]) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"versions": versions_json(versions)}})),
    )
    .await
    .expect("edit the versions");
}

#[tokio::test(flavor = "multi_thread")]
async fn promotion_and_canary_under_load_fail_no_request_and_restart_no_server() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-rollout").await;
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("ad-rollout");
    let v1 = store_adapter(&bucket, "bot/v1", 4, 1).await;
    let v2 = store_adapter(&bucket, "bot/v2", 4, 2).await;
    let v3 = store_adapter(&bucket, "bot/v3", 4, 3).await;
    let fleet = Fleet::start(&client, &ns, "llama", 3, &[]).await;
    let pids = fleet.pids();
    let _operator = start_operator(cp, &ns).await;

    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    let ad = wait_for_reason(&client, &ns, "bot", "RolledOut").await;
    assert!(kubectl_wait(
        cp,
        &ns,
        "adapterdeployment/bot",
        "condition=Ready",
        "5s"
    ));
    assert_eq!(argocd_health("AdapterDeployment", &ad).0, "Healthy");
    let status = ad.status.expect("status");
    assert_eq!(status.replicas.map(|r| (r.desired, r.ready)), Some((3, 3)));
    assert_eq!(status.versions[0].ready_replicas, 3);
    for pod in &fleet.pods {
        let (code, body) = complete(&pod.url, "bot").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["system_fingerprint"], v1.fingerprint());
    }

    // A client sends requests to every server without pause while versions change.
    let load = Load::start(fleet.pods.iter().map(|p| p.url.clone()).collect());
    set_versions(&api, "bot", &[(&v2, 100)]).await;
    let promoted = wait_for_reason(&client, &ns, "bot", "RolledOut").await;
    assert_eq!(
        promoted.status.as_ref().expect("status").versions[0].sha256,
        v2.sha256
    );
    set_versions(&api, "bot", &[(&v2, 90), (&v3, 10)]).await;
    let canary = wait_for_reason(&client, &ns, "bot", "RolledOut").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (seen, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(
        seen.contains_key(&v1.fingerprint()) && seen.contains_key(&v2.fingerprint()),
        "{seen:?}"
    );
    assert_eq!(fleet.pids(), pids, "no server process was restarted");
    assert!(fleet.pods.iter().all(|p| p.daemon.is_running()));

    let status = canary.status.expect("status");
    let versions: Vec<(String, u32, u32)> = status
        .versions
        .iter()
        .map(|v| (v.sha256.clone(), v.weight, v.ready_replicas))
        .collect();
    assert_eq!(
        versions,
        [(v2.sha256.clone(), 90, 3), (v3.sha256.clone(), 10, 3)]
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = config_maps
        .get("llama-graft-adapters")
        .await
        .expect("the adapters ConfigMap");
    let recorded: serde_json::Value =
        serde_json::from_str(&cm.data.expect("data")["bot.json"]).expect("json");
    assert_eq!(recorded["versions"][0]["sha256"], v2.sha256);
    assert_eq!(recorded["versions"][1]["weight"], 10);
    for pod in &fleet.pods {
        let listing = listing(&pod.url).await;
        assert_eq!(
            listing["adapters"]["bot"].as_array().map(Vec::len),
            Some(2),
            "v1 unloaded: {listing}"
        );
    }

    // Deleting unloads it everywhere and removes its ConfigMap key.
    api.delete("bot", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("bot deleted", WAIT, async || {
        api.get_opt("bot").await.expect("get").is_none()
    })
    .await;
    for pod in &fleet.pods {
        assert_eq!(complete(&pod.url, "bot").await.0, 404);
    }
    let cm = config_maps
        .get("llama-graft-adapters")
        .await
        .expect("ConfigMap");
    assert!(!cm.data.unwrap_or_default().contains_key("bot.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_pods_and_drift_are_repaired_and_incompatible_adapters_refused() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-repair").await;
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("ad-repair");
    let v1 = store_adapter(&bucket, "bot/v1", 4, 11).await;
    let too_big = store_adapter(&bucket, "bot/rank16", 16, 12).await;
    let mut fleet = Fleet::start(&client, &ns, "qwen", 2, &["--max-lora-rank", "8"]).await;
    let _operator = start_operator(cp, &ns).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "qwen", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;

    // A crashed pod's new server loads the adapter from the ConfigMap before it is ready.
    fleet.restart(0).await;
    let (code, body) = complete(&fleet.pods[0].url, "bot").await;
    assert_eq!(code, 200, "the restarted server serves bot at once: {body}");
    assert_eq!(body["system_fingerprint"], v1.fingerprint());

    // An adapter removed behind the operator's back comes back at the next re-check.
    let removed = reqwest::Client::new()
        .delete(format!("{}/admin/adapters/bot", fleet.pods[1].url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("delete");
    assert_eq!(removed.status().as_u16(), 204);
    let url = fleet.pods[1].url.clone();
    eventually("drift repaired", WAIT, async || {
        complete(&url, "bot").await.0 == 200
    })
    .await;

    // Refused before anything is loaded; the servers keep serving v1.
    let mut bad_digest = v1.clone();
    bad_digest.sha256 = "0".repeat(64);
    for (version, phrase) in [(&too_big, "rank 16"), (&bad_digest, "digest mismatch")] {
        set_versions(&api, "bot", &[(version, 100)]).await;
        let ad = wait_for_reason(&client, &ns, "bot", "Incompatible").await;
        let (_, message) = ready_reason(&ad);
        assert!(message.contains(phrase), "{phrase:?} not in {message:?}");
        assert_eq!(
            ad.status.as_ref().and_then(|s| s.phase),
            Some(graft_api::AdapterDeploymentPhase::Failed)
        );
        assert!(kubectl_wait(
            cp,
            &ns,
            "adapterdeployment/bot",
            "condition=Stalled",
            "5s"
        ));
        assert_eq!(argocd_health("AdapterDeployment", &ad).0, "Degraded");
        for pod in &fleet.pods {
            let (code, body) = complete(&pod.url, "bot").await;
            assert_eq!(code, 200);
            assert_eq!(body["system_fingerprint"], v1.fingerprint());
        }
    }

    // A second AdapterDeployment claiming the same name on the same server conflicts.
    api.create(
        &PostParams::default(),
        &manifest("bot-copy", "qwen", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    let copy = wait_for_reason(&client, &ns, "bot-copy", "Conflict").await;
    assert!(ready_reason(&copy).1.contains("bot"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fine_tune_jobs_adapter_reaches_every_server() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-e2e").await;
    let s3 = S3Server::shared().await;
    let bucket = s3.bucket("ad-e2e");
    create_s3_secret(&client, &ns, "s3").await;
    let pairs = [
        "red fox",
        "blue owl",
        "green cat",
        "gold yak",
        "pink emu",
        "teal eel",
    ];
    let dataset: String = pairs
        .iter()
        .map(|p| {
            let (colour, animal) = p.split_once(' ').expect("pair");
            json!({"prompt": format!("colour {colour} ->"), "completion": format!(" {animal}")})
                .to_string()
                + "\n"
        })
        .collect();
    put_object(&format!("s3://{bucket}/data/train.jsonl"), &dataset).await;
    // A real pretrained model (SmolLM2's vocabulary, embeddings and first two layers, from
    // its GGUF file) rather than random weights: what it answers before training is its own.
    let model = format!("file://{}", smollm2_first_layers(2).display());
    let fleet = Fleet::start_with_model(
        &client,
        &ns,
        "smollm2",
        2,
        &model,
        &["--served-model-name", "smollm2"],
    )
    .await;
    let _operator = start_operator(cp, &ns).await;

    // The deployment comes first and waits for its job.
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    let ad: AdapterDeployment = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "colours"},
        "spec": {"server": {"name": "smollm2"}, "adapterName": "colours",
                 "versions": [{"source": {"fineTuneJobRef": {"name": "colours-v1"}}, "weight": 100}]},
    }))
    .expect("manifest");
    api.create(&PostParams::default(), &ad)
        .await
        .expect("create");
    wait_for_reason(&client, &ns, "colours", "WaitingForFineTuneJob").await;

    let job: graft_api::FineTuneJob = serde_json::from_value(json!({
        "apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "colours-v1"},
        "spec": {
            "baseModel": {"uri": model},
            "dataset": {"uri": format!("s3://{bucket}/data/train.jsonl")},
            "method": {"quantization": "nf4", "lora": {"rank": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
            "training": {"epochs": 8, "learningRate": 0.01, "batchSize": 2, "maxSequenceLength": 32, "seed": 3},
            "output": {"uri": format!("s3://{bucket}/adapters/colours/v1/")},
            "storage": {"secretRef": {"name": "s3"}, "endpoint": s3.endpoint(), "region": s3.region()},
            "resources": {"gpus": 0},
        },
    }))
    .expect("FineTuneJob");
    Api::<graft_api::FineTuneJob>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &job)
        .await
        .expect("create the FineTuneJob");
    run_trainer_pod(&client, &ns, "colours-v1").await;

    let ready = wait_for_reason(&client, &ns, "colours", "RolledOut").await;
    // The trainer recorded its adapter in the job's status itself, as it published it.
    let trained = Api::<graft_api::FineTuneJob>::namespaced(client.clone(), &ns)
        .get("colours-v1")
        .await
        .expect("the job");
    assert!(
        trained
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|m| m.manager.as_deref() == Some("graft-trainer")
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.to_string().contains("f:adapter"))),
        "status.adapter written by graft-trainer"
    );
    let version = &ready.status.expect("status").versions[0];
    assert_eq!(version.uri, format!("s3://{bucket}/adapters/colours/v1/"));
    assert_eq!(version.ready_replicas, 2);
    let fingerprint = format!("graft-{}", &version.sha256[..16]);
    for pod in &fleet.pods {
        let (code, adapted) = complete_prompt(&pod.url, "colours", "colour red ->").await;
        assert_eq!(code, 200, "{adapted}");
        assert_eq!(adapted["system_fingerprint"], fingerprint);
        let (_, base) = complete_prompt(&pod.url, "smollm2", "colour red ->").await;
        let (adapted, base) = (&adapted["choices"][0]["text"], &base["choices"][0]["text"]);
        assert!(
            adapted.as_str().is_some_and(|t| t.starts_with(" fox")),
            "the adapter answers as trained: {adapted} (the base model: {base})"
        );
        assert_ne!(adapted, base, "the base model did not know it");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_credential_problems_are_on_the_status_and_a_rotated_token_is_picked_up() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-token").await;
    let bucket = S3Server::shared().await.bucket("ad-token");
    let v1 = store_adapter(&bucket, "bot/v1", 4, 61).await;
    let fleet = Fleet::start(&client, &ns, "llama", 1, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    let operator = start_operator_with(
        cp,
        &ns,
        &["--admin-token-file", token.to_str().expect("utf-8")],
    )
    .await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");

    // No token mounted (yet): the deployment says so, and keeps trying.
    let missing = wait_for_reason(&client, &ns, "bot", "AdminCredentialsUnavailable").await;
    assert_eq!(
        missing.status.as_ref().and_then(|s| s.phase),
        Some(graft_api::AdapterDeploymentPhase::Degraded)
    );
    assert!(kubectl_wait(
        cp,
        &ns,
        "adapterdeployment/bot",
        "condition=Reconciling",
        "5s"
    ));
    // A token the servers refuse.
    std::fs::write(&token, "not-the-token\n").expect("token");
    let refused = wait_for_reason(&client, &ns, "bot", "LoadFailed").await;
    assert!(
        ready_reason(&refused).1.contains("bearer token"),
        "{refused:?}"
    );
    assert_eq!(argocd_health("AdapterDeployment", &refused).0, "Degraded");
    // The kubelet rotates the projected token: picked up without a restart.
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;
    assert_eq!(complete(&fleet.pods[0].url, "bot").await.0, 200);
    assert!(operator.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_a_tls_admin_port_is_reached_only_with_the_right_ca() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-tls").await;
    let bucket = S3Server::shared().await.bucket("ad-tls");
    let v1 = store_adapter(&bucket, "bot/v1", 4, 81).await;
    let certs = support::certificates(&format!("llama.{ns}.svc"));
    let (cert, key) = (certs.join("tls.crt"), certs.join("tls.key"));
    let fleet = Fleet::start(
        &client,
        &ns,
        "llama",
        1,
        &[
            "--admin-listen",
            "127.0.0.1:{port2}",
            "--admin-tls-cert",
            cert.to_str().expect("utf-8"),
            "--admin-tls-key",
            key.to_str().expect("utf-8"),
        ],
    )
    .await;
    // Without the CA that signed the server's certificate, the operator does not talk to it.
    let untrusting = start_operator_with(cp, &ns, &[]).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    let refused = wait_for_reason(&client, &ns, "bot", "LoadFailed").await;
    assert!(ready_reason(&refused).1.contains("llama-0"), "{refused:?}");
    assert_eq!(complete(&fleet.pods[0].url, "bot").await.0, 404);
    untrusting.kill();

    let ca = certs.join("ca.crt");
    let _operator =
        start_operator_with(cp, &ns, &["--admin-ca-file", ca.to_str().expect("utf-8")]).await;
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;
    let (code, body) = complete(&fleet.pods[0].url, "bot").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["system_fingerprint"], v1.fingerprint());
}
