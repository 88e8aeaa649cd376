//! The chaos suite: faults injected into a real training run and into rollouts under load, on
//! this binary's own control plane and S3 server (127.0.0.1 only; the apiserver and the S3
//! server are restarted here, so no other test shares them). Each scenario is bounded in time;
//! the suite ends with a table of what was injected, how many requests were sent, how many
//! failed and how long recovery took, on stderr and in `$GRAFT_CHAOS_REPORT` when set (where
//! `tests/run.sh` prints it at the end of the run).

mod load;
mod rollout;
#[path = "../adapter_deployment/support.rs"]
#[allow(dead_code)]
mod support;
mod trainer;

use std::{fmt::Write as _, io::Write as _, time::Duration};

/// One line of the table.
#[derive(Debug)]
pub struct Row {
    pub scenario: String,
    pub faults: String,
    pub requests: Option<usize>,
    pub failures: usize,
    pub recovered: Option<Duration>,
}

/// The longest any scenario may take.
const BOUND: Duration = Duration::from_secs(240);

fn table(rows: &[(String, Result<Row, String>)]) -> String {
    let mut out = String::from("\nchaos suite\n");
    let _ = writeln!(
        out,
        "{:<40} {:>9} {:>9} {:>11}  faults injected",
        "scenario", "requests", "failures", "recovered"
    );
    for (name, row) in rows {
        match row {
            Ok(row) => {
                let _ = writeln!(
                    out,
                    "{:<40} {:>9} {:>9} {:>11}  {}",
                    row.scenario,
                    row.requests
                        .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                    row.failures,
                    row.recovered
                        .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
                    row.faults
                );
            }
            Err(why) => {
                let _ = writeln!(
                    out,
                    "{name:<40} {:>9} {:>9} {:>11}  FAILED: {why}",
                    "-", "-", "-"
                );
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_lost_when_processes_die_and_dependencies_go_away() {
    let (cp, client) = support::setup().await;
    let mut rows: Vec<(String, Result<Row, String>)> = Vec::new();
    // One at a time: the outage scenario restarts the apiserver and the S3 server.
    macro_rules! scenario {
        ($name:expr, $future:expr) => {{
            let started = std::time::Instant::now();
            let outcome = tokio::time::timeout(
                BOUND,
                futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe($future)),
            )
            .await;
            let row = match outcome {
                Ok(Ok(row)) => Ok(row),
                Ok(Err(panic)) => Err(panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "the scenario panicked".to_owned())),
                Err(_) => Err(format!("did not finish within {BOUND:?}")),
            };
            eprintln!(
                "chaos: {} in {:.1?}: {}",
                $name,
                started.elapsed(),
                if row.is_ok() { "ok" } else { "FAILED" }
            );
            rows.push(($name.to_owned(), row));
        }};
    }
    scenario!("trainer SIGKILL x3", trainer::scenario());
    let c = client.clone();
    scenario!("leader killed mid-promotion", async move {
        rollout::leader_failover(cp, &c).await
    });
    let c = client.clone();
    scenario!("server restarted in a 90/10 canary", async move {
        rollout::server_restart(cp, &c).await
    });
    let c = client.clone();
    scenario!("apiserver restart + S3 down mid-rollout", async move {
        rollout::outage(cp, &c).await
    });
    let c = client.clone();
    scenario!(
        "20 hot swaps",
        async move { rollout::hot_swaps(cp, &c).await }
    );

    let table = table(&rows);
    // Straight to the process's stderr, past the test harness's capture.
    let _ = std::io::stderr().lock().write_all(table.as_bytes());
    if let Some(path) = std::env::var_os("GRAFT_CHAOS_REPORT") {
        let _ = std::fs::write(path, &table);
    }
    let failed: Vec<&String> = rows
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(name, _)| name)
        .collect();
    assert!(
        failed.is_empty(),
        "chaos scenarios failed: {failed:?}{table}"
    );
    for (_, row) in &rows {
        let row = row.as_ref().expect("checked above");
        assert_eq!(row.failures, 0, "{}: failed requests", row.scenario);
    }
}
