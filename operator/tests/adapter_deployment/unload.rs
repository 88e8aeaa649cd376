//! Deleting an AdapterDeployment stops its adapter being served: on every pod of the server,
//! ready or not; the finalizer waits for pods that do not answer, up to a timeout with a
//! Warning Event; and a sweep unloads what no AdapterDeployment owns.

use std::time::Duration;

use graft_api::AdapterDeployment;
use graft_testenv::{S3Server, eventually};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};

use crate::support::{
    Fleet, TOKEN, WAIT, complete, events_of, loaded, manifest, setup, start_operator_with,
    store_adapter, wait_for_reason,
};

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_adapter_leaves_every_pod_ready_or_not() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-unload").await;
    let bucket = S3Server::shared().await.bucket("ad-unload");
    let v1 = store_adapter(&bucket, "bot/v1", 4, 21).await;
    let fleet = Fleet::start(&client, &ns, "llama", 2, &[]).await;
    let _operator = start_operator_with(cp, &ns, &["--unload-timeout-seconds", "6"]).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "llama", "bot", &[(&v1, 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;

    // One pod fails its readiness probe: out of the Service, but its server still has the
    // adapter (and would serve it the moment it turns ready again).
    fleet.set_ready("llama-1", false).await;
    assert_eq!(complete(&fleet.pods[1].url, "bot").await.0, 200);
    // Another has an address but nothing answers there (its server hangs or still starts).
    fleet.register("llama-ghost", closed_port()).await;
    fleet.set_ready("llama-ghost", false).await;

    api.delete("bot", &DeleteParams::default())
        .await
        .expect("delete");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually("both live pods to drop the adapter", WAIT, async || {
        complete(&fleet.pods[0].url, "bot").await.0 == 404
            && complete(&fleet.pods[1].url, "bot").await.0 == 404
    })
    .await;
    let cm = config_maps
        .get("llama-graft-adapters")
        .await
        .expect("ConfigMap");
    assert!(
        !cm.data.unwrap_or_default().contains_key("bot.json"),
        "pods that start from now on do not load it"
    );
    // The finalizer holds the object while a pod has not confirmed...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        api.get_opt("bot").await.expect("get").is_some(),
        "the deletion waits for the pod that does not answer"
    );
    // ...up to the timeout, then lets go with a Warning.
    eventually("bot to be gone after the timeout", WAIT, async || {
        api.get_opt("bot").await.expect("get").is_none()
    })
    .await;
    assert!(
        events_of(&client, &ns, "bot")
            .await
            .contains(&("Warning".to_owned(), "UnloadTimedOut".to_owned())),
        "{:?}",
        events_of(&client, &ns, "bot").await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_unloads_what_no_adapter_deployment_owns() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ad-sweep").await;
    let bucket = S3Server::shared().await.bucket("ad-sweep");
    let owned = store_adapter(&bucket, "bot/v1", 4, 31).await;
    let stray = store_adapter(&bucket, "stray/v1", 4, 32).await;
    let fleet = Fleet::start(&client, &ns, "qwen", 2, &[]).await;
    let _operator = start_operator_with(cp, &ns, &[]).await;
    let api: Api<AdapterDeployment> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &manifest("bot", "qwen", "bot", &[(&owned, 100)]),
    )
    .await
    .expect("create");
    wait_for_reason(&client, &ns, "bot", "RolledOut").await;

    // Loaded behind the operator's back (by hand, or by a pod that started from a stale copy
    // of the ConfigMap after its AdapterDeployment was deleted).
    let put = reqwest::Client::new()
        .put(format!("{}/admin/adapters/stray", fleet.pods[0].url))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"versions": [{"uri": stray.uri, "sha256": stray.sha256, "weight": 100}]}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(put.status().as_u16(), 200);

    let url = fleet.pods[0].url.clone();
    eventually("the sweep to unload stray", WAIT, async || {
        !loaded(&url).await.contains(&"stray".to_owned())
    })
    .await;
    assert_eq!(loaded(&fleet.pods[0].url).await, ["bot"], "bot stays");
    assert_eq!(complete(&fleet.pods[0].url, "bot").await.0, 200);
    assert!(
        events_of(&client, &ns, "qwen")
            .await
            .contains(&("Normal".to_owned(), "UnloadedOrphan".to_owned()))
    );
}
