//! The operator killed mid-run: a standby replica takes the leader Lease over, makes no second
//! Job, and loses no status.

use std::time::Duration;

use graft_api::FineTuneJobPhase::*;
use graft_testenv::eventually;

use crate::support::{
    SECRET, WAIT, create, create_secret, get, http_get, jobs_of, live_pod, manifest,
    report_progress, set_pod_running, set_pod_terminated, setup, start_operator, wait_for_phase,
    wait_for_reconciles,
};

async fn leading(port: u16) -> bool {
    http_get(port, "/metrics")
        .await
        .1
        .contains("graft_leader 1")
}

#[tokio::test]
async fn a_killed_leader_is_replaced_without_a_second_job_or_lost_status() {
    let (cp, client) = setup().await;
    let ns = cp.namespace("ftj-restart").await;
    create_secret(&client, &ns, SECRET).await;
    let first = start_operator(cp, &ns, &[]).await;
    eventually("the first replica to lead", WAIT, async || {
        leading(first.port()).await
    })
    .await;
    let standby = start_operator(cp, &ns, &[]).await;
    eventually("the standby to be ready", WAIT, async || {
        http_get(standby.port(), "/readyz").await.0 == 200
    })
    .await;

    create(&client, &ns, &manifest("durable", SECRET)).await;
    let pod = live_pod(&client, &ns, "durable").await;
    set_pod_running(&client, &ns, &pod).await;
    let running = wait_for_phase(&client, &ns, "durable", Running).await;
    report_progress(cp, &ns, "durable", 7, 2.5).await;
    let job_uid = jobs_of(&client, &ns, "durable").await[0]
        .metadata
        .uid
        .clone();
    assert!(
        !leading(standby.port()).await,
        "one replica leads at a time; the standby's log:\n{}\nthe leader's:\n{}",
        standby.log(),
        first.log()
    );

    first.kill();
    eventually("the standby to take the Lease over", WAIT, async || {
        leading(standby.port()).await
    })
    .await;
    // The new leader reconciles what it finds; check after it has.
    wait_for_reconciles(standby.port(), 0, 1).await;
    let jobs = jobs_of(&client, &ns, "durable").await;
    assert_eq!(jobs.len(), 1, "no second Job");
    assert_eq!(jobs[0].metadata.uid, job_uid, "the same Job");
    let after = get(&client, &ns, "durable").await;
    let (before, after_status) = (
        running.status.expect("status"),
        after.status.expect("status"),
    );
    assert_eq!(after_status.phase, Some(Running));
    assert_eq!(after_status.start_time, before.start_time);
    assert_eq!(after_status.conditions, before.conditions);
    assert_eq!(after_status.progress.map(|p| p.step), Some(7));

    let result = r#"{"adapter":{"uri":"s3://adapters/durable/","sha256":"77aa","sizeBytes":1,"trainableParameters":1}}"#;
    set_pod_terminated(&client, &ns, &pod, 0, result).await;
    let done = wait_for_phase(&client, &ns, "durable", Succeeded).await;
    assert_eq!(
        done.status.and_then(|s| s.adapter).map(|a| a.sha256),
        Some("77aa".to_owned())
    );

    standby.terminate(Duration::from_secs(20));
    assert!(
        standby.log().contains("released the leader Lease"),
        "a graceful stop hands the Lease over at once"
    );
}
