//! Where training progress goes: a JSON line per step on stdout (a progress bar instead when
//! stdout is a terminal), the FineTuneJob's `status.progress` through server-side apply with
//! the trainer's own field manager (with a short loss history, see `history`), checkpoints
//! to the output store, and TensorBoard event files beside them (see `tensorboard`).

use std::time::{Duration, Instant, SystemTime};

use graft_api::{AdapterArtifact, FineTuneJob, Metrics, StatusTarget};
use graft_engine::storage::Location;
use indicatif::{ProgressBar, ProgressStyle};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::runtime::Runtime;

use crate::{
    checkpoint::Checkpoint,
    history::LossHistory,
    job::save_checkpoint,
    tensorboard::{self, EventLog},
    train::{HookError, Hooks, StepReport},
};

/// The field manager of `status.progress`; the operator never writes that field.
pub const FIELD_MANAGER: &str = "graft-trainer";
/// Status patches are rate-limited: the apiserver needs no more than this.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Progress<'rt> {
    rt: &'rt Runtime,
    output: Location,
    status: Option<Status>,
    bar: Option<ProgressBar>,
    last: Option<StepReport>,
    eval_loss: Option<f64>,
    history: LossHistory,
    /// Where the event files go: `<output>/runs/`.
    runs: Location,
    events: EventLog,
}

struct Status {
    target: StatusTarget,
    client: Option<Client>,
    /// Set after the first failure to build a client: progress then stays local.
    unavailable: bool,
    last_patch: Option<Instant>,
    /// The progress last applied: every apply as `graft-trainer` carries it, since server-side
    /// apply drops the fields a manager's new apply leaves out.
    progress: Option<graft_api::Progress>,
    /// Whether an earlier attempt's loss history has been read (once, before the first patch).
    seeded: bool,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("target", &self.target)
            .field("connected", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl<'rt> Progress<'rt> {
    pub fn new(
        rt: &'rt Runtime,
        output: Location,
        target: Option<StatusTarget>,
        terminal: bool,
    ) -> Self {
        let runs = Location {
            store: output.store.clone(),
            prefix: output.child(tensorboard::DIRECTORY),
        };
        // An earlier attempt's files, so this attempt's sorts after them.
        let existing = match rt.block_on(runs.list_all()) {
            Ok(files) => files.into_iter().map(|(name, _)| name).collect(),
            Err(e) => {
                eprintln!("graft-trainer: listing the earlier TensorBoard event files: {e}");
                Vec::new()
            }
        };
        let events = EventLog::new(&tensorboard::hostname(), unix_now(), &existing);
        Self {
            rt,
            output,
            runs,
            events,
            status: target.map(|target| Status {
                target,
                client: None,
                unavailable: false,
                last_patch: None,
                progress: None,
                seeded: false,
            }),
            bar: terminal.then(|| {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                    )
                    .expect("a valid template"),
                );
                bar
            }),
            last: None,
            eval_loss: None,
            history: LossHistory::default(),
        }
    }

    /// The figures of the run so far, for `graft.json`.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            final_loss: self.last.as_ref().map(|r| r.loss),
            eval_loss: self.eval_loss,
            tokens_per_second: self.last.as_ref().map(|r| r.tokens_per_second),
            ..Metrics::default()
        }
    }

    /// Records the published adapter in the FineTuneJob's `status.adapter` before the trainer
    /// exits, so the outcome survives the pod and its termination message (garbage-collected,
    /// or the Job deleted before the operator saw it). A few attempts; the termination message
    /// stays the fallback.
    pub fn record_adapter(&mut self, adapter: &AdapterArtifact) {
        let Some(status) = &self.status else {
            return;
        };
        let mut fields = serde_json::json!({"adapter": adapter});
        if let Some(progress) = &status.progress {
            fields["progress"] = serde_json::json!(progress);
        }
        let patch = serde_json::json!({
            "apiVersion": "graft.dev/v1alpha1",
            "kind": "FineTuneJob",
            "status": fields,
        });
        for attempt in 1..=3 {
            match self.apply_status(&patch) {
                Ok(()) => return,
                Err(reason) => {
                    eprintln!("graft-trainer: recording the adapter in the FineTuneJob: {reason}");
                    let no_cluster = self.status.as_ref().is_some_and(|s| s.unavailable);
                    if no_cluster || attempt == 3 {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Server-side apply of `patch` to the FineTuneJob's status as `graft-trainer`; `Ok` when
    /// there is no FineTuneJob to report to, or no cluster to reach (found once, then kept).
    fn apply_status(&mut self, patch: &serde_json::Value) -> Result<(), String> {
        let Some(status) = &mut self.status else {
            return Ok(());
        };
        if status.unavailable {
            return Ok(());
        }
        let result = self.rt.block_on(async {
            if status.client.is_none() {
                status.client = Some(
                    Client::try_default()
                        .await
                        .map_err(|e| (true, e.to_string()))?,
                );
            }
            let client = status.client.clone().expect("set above");
            let api: Api<FineTuneJob> = Api::namespaced(client, &status.target.namespace);
            api.patch_status(
                &status.target.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
            .map(|_| ())
            .map_err(|e| (false, e.to_string()))
        });
        result.map_err(|(no_client, reason)| {
            status.unavailable |= no_client;
            reason
        })
    }

    /// The loss history an earlier attempt of this job recorded in its status.
    fn earlier_history(&mut self) -> Result<Vec<graft_api::LossPoint>, String> {
        let Some(status) = &mut self.status else {
            return Ok(Vec::new());
        };
        self.rt.block_on(async {
            if status.client.is_none() {
                status.client = Some(Client::try_default().await.map_err(|e| e.to_string())?);
            }
            let client = status.client.clone().expect("set above");
            let api: Api<FineTuneJob> = Api::namespaced(client, &status.target.namespace);
            let job = api
                .get_status(&status.target.name)
                .await
                .map_err(|e| e.to_string())?;
            Ok(job
                .status
                .and_then(|s| s.progress)
                .map(|p| p.history)
                .unwrap_or_default())
        })
    }

    /// Writes the TensorBoard events recorded since the last write. They are informative: a
    /// failed write never stops training, and the next one writes them again.
    pub fn write_events(&mut self) {
        let Some((name, bytes)) = self.events.unwritten() else {
            return;
        };
        match self.rt.block_on(self.runs.put(&name, bytes.to_vec())) {
            Ok(()) => self.events.written(unix_now()),
            Err(e) => eprintln!("graft-trainer: writing the TensorBoard events {name}: {e}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }

    /// The step's scalars under the tags transformers' `TensorBoardCallback` uses.
    #[allow(clippy::cast_possible_truncation)]
    fn record_events(&mut self, report: &StepReport) {
        let mut scalars = vec![
            ("train/loss", report.loss as f32),
            ("train/learning_rate", report.learning_rate as f32),
            ("train/grad_norm", report.grad_norm as f32),
            ("train/tokens_per_second", report.tokens_per_second as f32),
        ];
        if let Some(eval_loss) = report.eval_loss {
            scalars.push(("eval/loss", eval_loss as f32));
        }
        self.events.record(unix_now(), report.step, &scalars);
    }

    fn print(&self, report: &StepReport) {
        if let Some(bar) = &self.bar {
            bar.set_length(report.total_steps);
            bar.set_position(report.step);
            let eval = self
                .eval_loss
                .map(|l| format!("  eval {l:.4}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.4}{eval}  {:.0} tok/s",
                report.loss, report.tokens_per_second
            ));
            return;
        }
        let line = serde_json::json!({
            "step": report.step,
            "totalSteps": report.total_steps,
            "epoch": report.epoch,
            "loss": report.loss,
            "evalLoss": report.eval_loss,
            "learningRate": report.learning_rate,
            "gradNorm": report.grad_norm,
            "tokensPerSecond": report.tokens_per_second,
            "etaSeconds": report.eta_seconds,
        });
        #[allow(clippy::print_stdout)]
        {
            println!("{line}");
        }
    }

    fn patch_status(&mut self, report: &StepReport) {
        let eval_loss = self.eval_loss;
        let Some(status) = &mut self.status else {
            return;
        };
        let last = report.step == report.total_steps;
        if status.unavailable
            || !last
                && status
                    .last_patch
                    .is_some_and(|t| t.elapsed() < STATUS_INTERVAL)
        {
            return;
        }
        status.last_patch = Some(Instant::now());
        if !status.seeded {
            status.seeded = true;
            // A retried pod resumes after a checkpoint: keep the curve its predecessors drew.
            match self.earlier_history() {
                Ok(earlier) => self.history.seed(&earlier),
                Err(reason) => {
                    eprintln!("graft-trainer: reading the earlier loss history: {reason}");
                }
            }
        }
        let Some(status) = &mut self.status else {
            return;
        };
        let progress = graft_api::Progress {
            step: report.step,
            total_steps: report.total_steps,
            epoch: report.epoch,
            loss: Some(report.loss),
            eval_loss,
            tokens_per_second: Some(report.tokens_per_second),
            eta_seconds: Some(report.eta_seconds),
            updated_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            history: self.history.points().to_vec(),
        };
        let patch = serde_json::json!({
            "apiVersion": "graft.dev/v1alpha1",
            "kind": "FineTuneJob",
            "status": {"progress": progress},
        });
        status.progress = Some(progress);
        // Progress is informative: a failed report never stops training.
        if let Err(reason) = self.apply_status(&patch) {
            eprintln!("graft-trainer: reporting progress to the FineTuneJob: {reason}");
        }
    }
}

impl Hooks for Progress<'_> {
    fn step(&mut self, report: &StepReport) -> Result<(), HookError> {
        if report.eval_loss.is_some() {
            self.eval_loss = report.eval_loss;
        }
        self.history.record(
            report.step,
            report.total_steps,
            report.loss,
            report.eval_loss,
        );
        self.record_events(report);
        self.print(report);
        self.patch_status(report);
        self.last = Some(report.clone());
        Ok(())
    }

    fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), HookError> {
        self.rt
            .block_on(save_checkpoint(&self.output, checkpoint))
            .map_err(|e| Box::new(e) as HookError)?;
        // After the checkpoint, which a retried attempt resumes from: the events written at
        // checkpoints never run past the steps a retry keeps.
        self.write_events();
        Ok(())
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
