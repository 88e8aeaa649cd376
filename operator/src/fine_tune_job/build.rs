//! Spec in, Kubernetes objects out: the one place that builds a training pod.

use std::collections::BTreeMap;

use graft_api::FineTuneJob;
use k8s_openapi::{
    api::{
        batch::v1::{
            Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
            PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
        },
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource,
            EnvVar, EnvVarSource, PodSecurityContext, PodSpec, PodTemplateSpec,
            ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext,
            ServiceAccount, Volume, VolumeMount,
        },
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::Resource;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The trainer exits with this code for a bad config or dataset: the Job fails at once
/// instead of retrying what cannot succeed.
pub const CONFIG_ERROR_EXIT_CODE: i32 = 2;

pub(crate) const CONTAINER: &str = "trainer";
const CONFIG_DIR: &str = "/etc/graft";
const CONFIG_FILE: &str = "config.yaml";
const CACHE_DIR: &str = "/cache";
const NON_ROOT_UID: i64 = 65532;
/// Kueue's label naming the LocalQueue a Job waits in. Copied from the FineTuneJob to its Job,
/// which then starts suspended; Kueue unsuspends it on admission.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

/// Operator-wide settings a FineTuneJob may not choose for itself.
#[derive(Clone, Debug)]
pub struct TrainerDefaults {
    /// Image used unless the job sets `spec.image`.
    pub image: String,
    /// Size limit of the emptyDir holding the downloaded base model.
    pub model_cache_size: Quantity,
    /// Pod failures (not counting disruptions) before the Job gives up.
    pub backoff_limit: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the FineTuneJob has no {0}; it was not read from the apiserver")]
    MissingMetadata(&'static str),
    #[error("rendering the training config: {0}")]
    RenderConfig(#[from] serde_yaml::Error),
}

/// Every object the operator creates for one FineTuneJob, all owned by it.
#[derive(Clone, Debug)]
pub struct Children {
    pub job: Job,
    /// The rendered trainer config: immutable, named by its content's digest. `None` once the
    /// Job exists: it keeps the config it was created with.
    pub config: Option<ConfigMap>,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
}

impl Children {
    /// Keeps the spec of the Job that already exists, changing only `suspend`. A Job's pod
    /// template and failure policy are immutable once it exists: re-applying a changed one
    /// (after `spec.image` or `spec.resources` was edited, or after an operator upgrade that
    /// builds pods differently) would be refused, and the job's status would stop updating.
    /// Such changes apply to jobs created from then on.
    ///
    /// A queued job's `suspend` belongs to Kueue unless the FineTuneJob itself is suspended:
    /// the operator then keeps whatever value the Job has.
    pub fn keep_job_spec_of(&mut self, existing: &Job, ftj: &FineTuneJob) {
        let Some(mut spec) = existing.spec.clone() else {
            return;
        };
        if ftj.spec.suspend || queue_of(ftj).is_none() {
            spec.suspend = Some(ftj.spec.suspend);
        }
        self.job.spec = Some(spec);
        self.config = None;
        // Optimistic concurrency: if the Job changed since it was read (Kueue admitting it),
        // the apply fails with a conflict and the next reconcile starts from the new state
        // instead of writing back a stale `suspend`.
        self.job
            .metadata
            .resource_version
            .clone_from(&existing.metadata.resource_version);
    }
}

/// What the trainer reads from its config file: the spec, plus where to report progress.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TrainerConfig<'a> {
    #[serde(flatten)]
    spec: &'a graft_api::FineTuneJobSpec,
    status_target: StatusTarget<'a>,
}

#[derive(Serialize)]
struct StatusTarget<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// Builds the Job, its config and its least-privilege identity for `ftj`.
pub fn build(ftj: &FineTuneJob, defaults: &TrainerDefaults) -> Result<Children, BuildError> {
    let name = ftj
        .metadata
        .name
        .as_deref()
        .ok_or(BuildError::MissingMetadata("name"))?;
    let namespace = ftj
        .metadata
        .namespace
        .as_deref()
        .ok_or(BuildError::MissingMetadata("namespace"))?;
    let owner = ftj
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("uid"))?;
    let config = TrainerConfig {
        spec: &ftj.spec,
        status_target: StatusTarget { namespace, name },
    };
    let rendered = serde_yaml::to_string(&config)?;
    let names = Names::new(name, &rendered);
    let meta = |object_name: &str| ObjectMeta {
        name: Some(object_name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(name)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    // Immutable, and named by its content: a pod always mounts exactly the config its Job was
    // made for, and the kubelet need not watch it.
    let config_map = ConfigMap {
        metadata: meta(&names.config),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), rendered)])),
        immutable: Some(true),
        ..ConfigMap::default()
    };

    let service_account = ServiceAccount {
        metadata: meta(&names.identity),
        // The trainer authenticates with this token to patch its FineTuneJob's status.
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(&names.identity),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![graft_api::GROUP.to_owned()]),
            resources: Some(vec!["finetunejobs/status".to_owned()]),
            resource_names: Some(vec![name.to_owned()]),
            verbs: vec!["get".to_owned(), "patch".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    let role_binding = RoleBinding {
        metadata: meta(&names.identity),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: names.identity.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: names.identity.clone(),
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        }]),
    };

    let mut job_meta = meta(&names.job);
    if let Some(queue) = queue_of(ftj) {
        job_meta
            .labels
            .get_or_insert_default()
            .insert(QUEUE_LABEL.to_owned(), queue.to_owned());
    }
    let job = Job {
        metadata: job_meta,
        spec: Some(JobSpec {
            suspend: Some(ftj.spec.suspend || queue_of(ftj).is_some()),
            backoff_limit: Some(defaults.backoff_limit),
            active_deadline_seconds: ftj.spec.active_deadline_seconds,
            pod_failure_policy: Some(pod_failure_policy()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(ftj, defaults, &names)),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    };

    Ok(Children {
        job,
        config: Some(config_map),
        service_account,
        role,
        role_binding,
    })
}

/// Names of the children, derived from the FineTuneJob's name (and the config's content).
struct Names {
    job: String,
    config: String,
    identity: String,
}

impl Names {
    fn new(name: &str, rendered_config: &str) -> Self {
        let digest = Sha256::digest(rendered_config.as_bytes());
        let short = digest[..5].iter().fold(String::new(), |mut hex, b| {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
            hex
        });
        Self {
            job: name.to_owned(),
            config: format!("{name}-config-{short}"),
            identity: format!("{name}-trainer"),
        }
    }
}

/// The Kueue queue `ftj` asks for, if any.
pub fn queue_of(ftj: &FineTuneJob) -> Option<&str> {
    ftj.metadata
        .labels
        .as_ref()?
        .get(QUEUE_LABEL)
        .map(String::as_str)
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "graft-trainer".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            crate::FIELD_MANAGER.to_owned(),
        ),
        ("graft.dev/finetunejob".to_owned(), name.to_owned()),
    ])
}

/// Retry what a node or preemption broke; fail at once on a config error, which a retry
/// cannot fix.
fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".to_owned(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(CONTAINER.to_owned()),
                    operator: "In".to_owned(),
                    values: vec![CONFIG_ERROR_EXIT_CODE],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".to_owned(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".to_owned(),
                    status: Some("True".to_owned()),
                }]),
            },
        ],
    }
}

fn pod_spec(ftj: &FineTuneJob, defaults: &TrainerDefaults, names: &Names) -> PodSpec {
    let resources = &ftj.spec.resources;
    let empty_dir = |size: Option<Quantity>| EmptyDirVolumeSource {
        size_limit: size,
        ..EmptyDirVolumeSource::default()
    };
    PodSpec {
        restart_policy: Some("Never".to_owned()),
        service_account_name: Some(names.identity.clone()),
        node_selector: (!resources.node_selector.is_empty())
            .then(|| resources.node_selector.clone()),
        tolerations: (!resources.tolerations.is_empty()).then(|| resources.tolerations.clone()),
        priority_class_name: resources.priority_class_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NON_ROOT_UID),
            run_as_group: Some(NON_ROOT_UID),
            fs_group: Some(NON_ROOT_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![
            Volume {
                name: "config".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names.config.clone(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "model-cache".to_owned(),
                empty_dir: Some(empty_dir(Some(defaults.model_cache_size.clone()))),
                ..Volume::default()
            },
            // The root filesystem is read-only; libraries still want a writable /tmp.
            Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(empty_dir(None)),
                ..Volume::default()
            },
        ]),
        containers: vec![trainer_container(ftj, defaults)],
        ..PodSpec::default()
    }
}

fn trainer_container(ftj: &FineTuneJob, defaults: &TrainerDefaults) -> Container {
    let resources = &ftj.spec.resources;
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if resources.gpus > 0 {
        limits.insert(
            resources.gpu_resource_name.clone(),
            Quantity(resources.gpus.to_string()),
        );
    }
    if let Some(memory) = &resources.memory {
        limits.insert("memory".to_owned(), memory.clone());
        requests.insert("memory".to_owned(), memory.clone());
    }
    if let Some(cpu) = &resources.cpu {
        requests.insert("cpu".to_owned(), cpu.clone());
    }
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    Container {
        name: CONTAINER.to_owned(),
        image: Some(
            ftj.spec
                .image
                .clone()
                .unwrap_or_else(|| defaults.image.clone()),
        ),
        args: Some(vec![
            "train".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        env: Some(env(ftj)),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            requests: (!requests.is_empty()).then_some(requests),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![
            mount("config", CONFIG_DIR, true),
            mount("model-cache", CACHE_DIR, false),
            mount("tmp", "/tmp", false),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// Credentials come from the referenced Secret by reference, never copied into the spec.
fn env(ftj: &FineTuneJob) -> Vec<EnvVar> {
    let value = |name: &str, value: &str| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    };
    let mut env = vec![value("GRAFT_CACHE_DIR", CACHE_DIR), value("HOME", "/tmp")];
    let Some(storage) = &ftj.spec.storage else {
        return env;
    };
    if let Some(endpoint) = &storage.endpoint {
        env.push(value("AWS_ENDPOINT_URL", endpoint));
    }
    if let Some(region) = &storage.region {
        env.push(value("AWS_REGION", region));
    }
    if let Some(secret) = &storage.secret_ref {
        for (key, optional) in [
            ("AWS_ACCESS_KEY_ID", false),
            ("AWS_SECRET_ACCESS_KEY", false),
            ("AWS_SESSION_TOKEN", true),
        ] {
            env.push(EnvVar {
                name: key.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.name.clone(),
                        key: key.to_owned(),
                        optional: Some(optional),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fine_tune_job::fixtures::{defaults, job_from_yaml};

    const FULL: &str = include_str!("fixtures/full.yaml");
    const MINIMAL: &str = include_str!("fixtures/minimal.yaml");

    fn pod(children: &Children) -> &PodSpec {
        children
            .job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    #[test]
    fn every_child_is_owned_by_the_finetunejob_and_labelled() {
        let ftj = job_from_yaml(FULL);
        let children = build(&ftj, &defaults()).expect("build");
        let config = children.config.as_ref().expect("a new job's config");
        let metas = [
            &children.job.metadata,
            &config.metadata,
            &children.service_account.metadata,
            &children.role.metadata,
            &children.role_binding.metadata,
        ];
        for meta in metas {
            let owners = meta.owner_references.as_ref().expect("owner references");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].uid, "0b7c7f4e-7b1e-4a53-9d55-0f0a8f8f2c11");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("team-a"));
            assert_eq!(
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get("graft.dev/finetunejob"))
                    .map(String::as_str),
                Some("support-bot-v3")
            );
        }
    }

    #[test]
    fn gpus_become_a_limit_on_the_configured_resource_and_scheduling_fields_pass_through() {
        let children = build(&job_from_yaml(FULL), &defaults()).expect("build");
        let pod = pod(&children);
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert_eq!(limits.get("amd.com/gpu"), Some(&Quantity("2".into())));
        assert_eq!(limits.get("memory"), Some(&Quantity("32Gi".into())));
        assert_eq!(
            pod.node_selector
                .as_ref()
                .and_then(|n| n.get("gpu"))
                .map(String::as_str),
            Some("a100")
        );
        assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
        assert_eq!(pod.priority_class_name.as_deref(), Some("training"));
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("registry.example/graft-trainer:custom")
        );
    }

    #[test]
    fn cpu_job_has_no_gpu_limit_and_uses_the_default_image() {
        let children = build(&job_from_yaml(MINIMAL), &defaults()).expect("build");
        let pod = pod(&children);
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        assert!(limits.keys().all(|k| !k.contains("gpu")), "{limits:?}");
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some(defaults().image.as_str())
        );
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());
    }

    #[test]
    fn pod_is_restricted_and_never_restarts_in_place() {
        let children = build(&job_from_yaml(FULL), &defaults()).expect("build");
        let pod = pod(&children);
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let pod_security = pod.security_context.as_ref().expect("pod security context");
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security
                .seccomp_profile
                .as_ref()
                .map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let container = &pod.containers[0];
        let security = container
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            container.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let cache = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "model-cache")
            .expect("model cache");
        assert_eq!(
            cache.empty_dir.as_ref().and_then(|e| e.size_limit.clone()),
            Some(Quantity("100Gi".into()))
        );
    }

    #[test]
    fn job_fails_fast_on_config_errors_and_retries_disruptions() {
        let children = build(&job_from_yaml(FULL), &defaults()).expect("build");
        let spec = children.job.spec.as_ref().expect("job spec");
        assert_eq!(spec.backoff_limit, Some(3));
        let rules = &spec
            .pod_failure_policy
            .as_ref()
            .expect("pod failure policy")
            .rules;
        let fail = rules
            .iter()
            .find(|r| r.action == "FailJob")
            .expect("FailJob rule");
        assert_eq!(
            fail.on_exit_codes.as_ref().map(|e| e.values.clone()),
            Some(vec![CONFIG_ERROR_EXIT_CODE])
        );
        let ignore = rules
            .iter()
            .find(|r| r.action == "Ignore")
            .expect("Ignore rule");
        assert_eq!(
            ignore
                .on_pod_conditions
                .as_ref()
                .map(|c| c[0].type_.as_str()),
            Some("DisruptionTarget")
        );
    }

    #[test]
    fn suspend_is_carried_to_the_job() {
        let mut ftj = job_from_yaml(FULL);
        assert_eq!(
            build(&ftj, &defaults())
                .expect("build")
                .job
                .spec
                .and_then(|s| s.suspend),
            Some(false)
        );
        ftj.spec.suspend = true;
        assert_eq!(
            build(&ftj, &defaults())
                .expect("build")
                .job
                .spec
                .and_then(|s| s.suspend),
            Some(true)
        );
    }

    #[test]
    fn an_existing_jobs_spec_is_kept_but_for_suspend() {
        let mut ftj = job_from_yaml(FULL);
        let existing = build(&ftj, &defaults()).expect("build").job;
        ftj.spec.image = Some("registry.example/graft-trainer:newer".to_owned());
        ftj.spec.suspend = true;
        let mut children = build(&ftj, &defaults()).expect("build");
        children.keep_job_spec_of(&existing, &ftj);
        let spec = children.job.spec.expect("spec");
        assert_eq!(spec.suspend, Some(true));
        assert_eq!(
            spec.template.spec.expect("pod").containers[0]
                .image
                .as_deref(),
            Some("registry.example/graft-trainer:custom"),
            "the running Job's pod template stays"
        );
    }

    #[test]
    fn a_queued_job_starts_suspended_and_leaves_suspend_to_kueue() {
        let mut ftj = job_from_yaml(FULL);
        ftj.metadata.labels = Some(BTreeMap::from([(
            QUEUE_LABEL.to_owned(),
            "team-a-gpus".to_owned(),
        )]));
        let children = build(&ftj, &defaults()).expect("build");
        let job = &children.job;
        assert_eq!(job.spec.as_ref().and_then(|s| s.suspend), Some(true));
        assert_eq!(
            job.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(QUEUE_LABEL))
                .map(String::as_str),
            Some("team-a-gpus")
        );

        // Kueue admitted it: the operator doesn't suspend it again...
        let mut admitted = job.clone();
        admitted.spec.get_or_insert_default().suspend = Some(false);
        let mut again = build(&ftj, &defaults()).expect("build");
        again.keep_job_spec_of(&admitted, &ftj);
        assert_eq!(again.job.spec.as_ref().and_then(|s| s.suspend), Some(false));
        // ...unless the FineTuneJob itself is suspended.
        ftj.spec.suspend = true;
        let mut suspended = build(&ftj, &defaults()).expect("build");
        suspended.keep_job_spec_of(&admitted, &ftj);
        assert_eq!(
            suspended.job.spec.as_ref().and_then(|s| s.suspend),
            Some(true)
        );
    }

    #[test]
    fn credentials_are_secret_references_never_values() {
        let children = build(&job_from_yaml(FULL), &defaults()).expect("build");
        let env = pod(&children).containers[0].env.clone().expect("env");
        for key in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            let var = env.iter().find(|e| e.name == key).expect(key);
            assert!(var.value.is_none(), "{key} must not be inlined");
            let secret = var
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .expect("secret ref");
            assert_eq!(secret.name, "s3-credentials");
            assert_eq!(secret.optional, Some(key == "AWS_SESSION_TOKEN"));
        }
        let endpoint = env
            .iter()
            .find(|e| e.name == "AWS_ENDPOINT_URL")
            .and_then(|e| e.value.as_deref());
        assert_eq!(endpoint, Some("http://minio.minio:9000"));
    }

    #[test]
    fn trainer_may_patch_only_its_own_status() {
        let children = build(&job_from_yaml(FULL), &defaults()).expect("build");
        let rules = children.role.rules.clone().expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources,
            Some(vec!["finetunejobs/status".to_owned()])
        );
        assert_eq!(
            rules[0].resource_names,
            Some(vec!["support-bot-v3".to_owned()])
        );
        assert_eq!(rules[0].verbs, ["get", "patch"]);
        assert_eq!(
            children
                .role_binding
                .subjects
                .as_ref()
                .map(|s| s[0].name.as_str()),
            Some("support-bot-v3-trainer")
        );
        assert_eq!(
            pod(&children).service_account_name.as_deref(),
            Some("support-bot-v3-trainer")
        );
    }

    #[test]
    fn config_map_holds_the_spec_and_the_status_target() {
        let ftj = job_from_yaml(FULL);
        let children = build(&ftj, &defaults()).expect("build");
        let config = children.config.as_ref().expect("config");
        assert_eq!(config.immutable, Some(true));
        let text = config
            .data
            .as_ref()
            .and_then(|d| d.get("config.yaml"))
            .expect("config.yaml");
        let rendered: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
        assert_eq!(rendered["statusTarget"]["namespace"], "team-a");
        assert_eq!(rendered["statusTarget"]["name"], "support-bot-v3");
        let spec: graft_api::FineTuneJobSpec =
            serde_yaml::from_str(text).expect("the trainer reads the spec back");
        assert_eq!(spec, ftj.spec);
    }

    #[test]
    fn the_config_is_named_by_its_content_and_the_pod_mounts_that_name() {
        let mut ftj = job_from_yaml(FULL);
        let first = build(&ftj, &defaults()).expect("build");
        let name = |c: &Children| {
            c.config
                .as_ref()
                .and_then(|c| c.metadata.name.clone())
                .expect("name")
        };
        let mounted = |c: &Children| {
            pod(c)
                .volumes
                .iter()
                .flatten()
                .find_map(|v| v.config_map.as_ref().map(|c| c.name.clone()))
                .expect("config volume")
        };
        assert!(name(&first).starts_with("support-bot-v3-config-"));
        assert_eq!(mounted(&first), name(&first));
        assert_eq!(
            name(&build(&ftj, &defaults()).expect("build")),
            name(&first)
        );
        ftj.spec.training.epochs += 1;
        let changed = build(&ftj, &defaults()).expect("build");
        assert_ne!(name(&changed), name(&first));
        assert_eq!(mounted(&changed), name(&changed));

        let mut kept = build(&ftj, &defaults()).expect("build");
        kept.keep_job_spec_of(&first.job, &ftj);
        assert!(
            kept.config.is_none(),
            "an existing Job keeps its own config"
        );
        assert_eq!(mounted(&kept), name(&first));
    }

    #[test]
    fn the_active_deadline_bounds_the_job() {
        let mut ftj = job_from_yaml(FULL);
        ftj.spec.active_deadline_seconds = Some(3600);
        let job = build(&ftj, &defaults()).expect("build").job;
        assert_eq!(job.spec.and_then(|s| s.active_deadline_seconds), Some(3600));
    }

    #[test]
    fn an_object_not_read_from_the_apiserver_is_refused() {
        let mut ftj = job_from_yaml(FULL);
        ftj.metadata.uid = None;
        assert!(matches!(
            build(&ftj, &defaults()),
            Err(BuildError::MissingMetadata("uid"))
        ));
    }
}
