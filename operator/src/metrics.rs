//! Prometheus metrics: reconciles, errors by kind, reconcile durations, jobs by phase and
//! leadership, each FineTuneJob's phase and training progress, each AdapterDeployment's
//! phase, in the text exposition format `/metrics` serves.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::AtomicU64},
    time::Instant,
};

use graft_api::{AdapterDeploymentPhase, FineTuneJob, FineTuneJobPhase};
use kube::ResourceExt;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// One object's series: its namespace and name (the operator's ServiceMonitor honours these
/// labels over the scrape target's own `namespace`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    namespace: String,
    finetunejob: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobPhaseLabels {
    namespace: String,
    finetunejob: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentPhaseLabels {
    namespace: String,
    adapterdeployment: String,
    phase: String,
}

type DurationFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;
type JobGauge = Family<JobLabels, Gauge<f64, AtomicU64>>;

/// A running job's figures from its `status.progress`, as the trainer last reported them.
#[derive(Debug, Default)]
struct Training {
    progress: JobGauge,
    loss: JobGauge,
    eval_loss: JobGauge,
    tokens_per_second: JobGauge,
    eta_seconds: JobGauge,
}

impl Training {
    fn register(&self, registry: &mut Registry) {
        for (name, help, family) in [
            (
                "finetunejob_progress_ratio",
                "Steps done over total steps, per running FineTuneJob",
                &self.progress,
            ),
            (
                "finetunejob_loss",
                "Training loss of the last reported step, per running FineTuneJob",
                &self.loss,
            ),
            (
                "finetunejob_eval_loss",
                "Loss on the validation split at the last evaluation, per running FineTuneJob",
                &self.eval_loss,
            ),
            (
                "finetunejob_tokens_per_second",
                "Training throughput, per running FineTuneJob",
                &self.tokens_per_second,
            ),
            (
                "finetunejob_eta_seconds",
                "Estimated seconds to completion, per running FineTuneJob",
                &self.eta_seconds,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
    }

    fn clear(&self) {
        for family in [
            &self.progress,
            &self.loss,
            &self.eval_loss,
            &self.tokens_per_second,
            &self.eta_seconds,
        ] {
            family.clear();
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: DurationFamily,
    jobs: Family<PhaseLabels, Gauge>,
    leader: Gauge,
    job_phases: Family<JobPhaseLabels, Gauge>,
    training: Training,
    deployment_phases: Family<DeploymentPhaseLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("graft");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations: DurationFamily = Family::new_with_constructor(|| {
            // 1 ms to ~16 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        let jobs = Family::<PhaseLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            durations.clone(),
        );
        registry.register(
            "finetunejobs",
            "FineTuneJobs by phase (as of the last scrape)",
            jobs.clone(),
        );
        registry.register(
            "leader",
            "Whether this replica holds the leader Lease",
            leader.clone(),
        );
        let job_phases = Family::<JobPhaseLabels, Gauge>::default();
        registry.register(
            "finetunejob_phase",
            "1 for each FineTuneJob, labelled with its phase",
            job_phases.clone(),
        );
        let training = Training::default();
        training.register(&mut registry);
        let deployment_phases = Family::<DeploymentPhaseLabels, Gauge>::default();
        registry.register(
            "adapterdeployment_phase",
            "1 for each AdapterDeployment, labelled with its phase",
            deployment_phases.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            durations,
            jobs,
            leader,
            job_phases,
            training,
            deployment_phases,
        }
    }
}

impl Metrics {
    /// Counts a reconcile of `controller` and times it until the guard drops.
    pub fn reconcile(&self, controller: &str) -> ReconcileTimer {
        let labels = ControllerLabels {
            controller: controller.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            histogram: self.durations.get_or_create(&labels).clone(),
            start: Instant::now(),
        }
    }

    pub fn error(&self, controller: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                controller: controller.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// Replaces the jobs-by-phase gauges with `counts`.
    pub fn set_jobs_by_phase(&self, counts: impl IntoIterator<Item = (String, i64)>) {
        self.jobs.clear();
        for (phase, count) in counts {
            self.jobs.get_or_create(&PhaseLabels { phase }).set(count);
        }
    }

    /// Replaces every FineTuneJob series (counts by phase, each job's phase, running jobs'
    /// progress) with what `jobs` say.
    #[allow(clippy::cast_precision_loss)]
    pub fn observe_jobs(&self, jobs: &[Arc<FineTuneJob>]) {
        let mut counts = BTreeMap::<String, i64>::new();
        self.job_phases.clear();
        self.training.clear();
        for job in jobs {
            let status = job.status.as_ref();
            let phase = status
                .and_then(|s| s.phase)
                .map_or_else(|| "Unknown".to_owned(), |p| format!("{p:?}"));
            *counts.entry(phase.clone()).or_default() += 1;
            let labels = JobLabels {
                namespace: job.namespace().unwrap_or_default(),
                finetunejob: job.name_any(),
            };
            self.job_phases
                .get_or_create(&JobPhaseLabels {
                    namespace: labels.namespace.clone(),
                    finetunejob: labels.finetunejob.clone(),
                    phase,
                })
                .set(1);
            // A finished job's last figures stay in its status; as gauges they would only
            // repeat themselves.
            let running = status.and_then(|s| s.phase) == Some(FineTuneJobPhase::Running);
            let Some(progress) = status.and_then(|s| s.progress.as_ref()).filter(|_| running)
            else {
                continue;
            };
            let t = &self.training;
            if progress.total_steps > 0 {
                t.progress
                    .get_or_create(&labels)
                    .set(progress.step as f64 / progress.total_steps as f64);
            }
            for (family, value) in [
                (&t.loss, progress.loss),
                (&t.eval_loss, progress.eval_loss),
                (&t.tokens_per_second, progress.tokens_per_second),
                (&t.eta_seconds, progress.eta_seconds.map(|s| s as f64)),
            ] {
                if let Some(value) = value {
                    family.get_or_create(&labels).set(value);
                }
            }
        }
        self.set_jobs_by_phase(counts);
    }

    /// Sets an AdapterDeployment's phase series (`None`: it is gone).
    pub fn set_adapter_deployment_phase(
        &self,
        namespace: &str,
        name: &str,
        phase: Option<AdapterDeploymentPhase>,
    ) {
        use AdapterDeploymentPhase::{Degraded, Failed, Loading, Pending, Ready};
        let labels = |phase: AdapterDeploymentPhase| DeploymentPhaseLabels {
            namespace: namespace.to_owned(),
            adapterdeployment: name.to_owned(),
            phase: format!("{phase:?}"),
        };
        for other in [Pending, Loading, Ready, Degraded, Failed] {
            if Some(other) != phase {
                self.deployment_phases.remove(&labels(other));
            }
        }
        if let Some(phase) = phase {
            self.deployment_phases.get_or_create(&labels(phase)).set(1);
        }
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Observes the reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_errors_and_phases_appear_in_the_exposition() {
        let metrics = Metrics::default();
        drop(metrics.reconcile("finetunejob"));
        metrics.error("finetunejob", "apply");
        metrics.set_jobs_by_phase([("Running".to_owned(), 3)]);
        metrics.set_leader(true);
        let text = metrics.encode();
        for line in [
            r#"graft_reconciles_total{controller="finetunejob"} 1"#,
            r#"graft_reconcile_errors_total{controller="finetunejob",error="apply"} 1"#,
            r#"graft_reconcile_duration_seconds_count{controller="finetunejob"} 1"#,
            r#"graft_finetunejobs{phase="Running"} 3"#,
            "graft_leader 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    fn job(yaml: &str) -> Arc<FineTuneJob> {
        Arc::new(serde_yaml::from_str(yaml).expect("a FineTuneJob"))
    }

    #[test]
    fn running_jobs_export_their_progress_and_every_job_its_phase() {
        let metrics = Metrics::default();
        let spec = "spec: {baseModel: {uri: 's3://m/x/'}, dataset: {uri: 's3://d/x'}, output: {uri: 's3://o/x/'}}";
        let running = job(&format!(
            "{{apiVersion: graft.dev/v1alpha1, kind: FineTuneJob, metadata: {{name: a, namespace: t}}, {spec}, \
             status: {{phase: Running, progress: {{step: 25, totalSteps: 100, loss: 1.5, tokensPerSecond: 900.0, etaSeconds: 60}}}}}}"
        ));
        let done = job(&format!(
            "{{apiVersion: graft.dev/v1alpha1, kind: FineTuneJob, metadata: {{name: b, namespace: t}}, {spec}, \
             status: {{phase: Failed, progress: {{step: 3, totalSteps: 100, loss: 9.0}}}}}}"
        ));
        metrics.observe_jobs(&[running, done]);
        let text = metrics.encode();
        for line in [
            r#"graft_finetunejob_phase{namespace="t",finetunejob="a",phase="Running"} 1"#,
            r#"graft_finetunejob_phase{namespace="t",finetunejob="b",phase="Failed"} 1"#,
            r#"graft_finetunejob_progress_ratio{namespace="t",finetunejob="a"} 0.25"#,
            r#"graft_finetunejob_loss{namespace="t",finetunejob="a"} 1.5"#,
            r#"graft_finetunejob_tokens_per_second{namespace="t",finetunejob="a"} 900.0"#,
            r#"graft_finetunejob_eta_seconds{namespace="t",finetunejob="a"} 60.0"#,
            r#"graft_finetunejobs{phase="Failed"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(!text.contains(r#"finetunejob_loss{namespace="t",finetunejob="b"}"#));
        assert!(!text.contains("graft_finetunejob_eval_loss{"), "{text}");
        metrics.observe_jobs(&[]);
        assert!(!metrics.encode().contains(r#"finetunejob="a""#));
    }

    #[test]
    fn an_adapter_deployment_has_one_phase_series_until_it_is_gone() {
        let metrics = Metrics::default();
        metrics.set_adapter_deployment_phase("t", "bot", Some(AdapterDeploymentPhase::Loading));
        metrics.set_adapter_deployment_phase("t", "bot", Some(AdapterDeploymentPhase::Degraded));
        let text = metrics.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("graft_adapterdeployment_phase{"))
            .collect();
        assert_eq!(
            series,
            [
                r#"graft_adapterdeployment_phase{namespace="t",adapterdeployment="bot",phase="Degraded"} 1"#
            ]
        );
        metrics.set_adapter_deployment_phase("t", "bot", None);
        assert!(!metrics.encode().contains(r#"adapterdeployment="bot""#));
    }
}
