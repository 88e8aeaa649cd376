//! What the schema cannot check before a Job is created: that the referenced Secret exists,
//! that this cluster's trainers can reach the base model's URI scheme, and that the output's
//! scheme is one the operator allows (`file://` writes into the pod, or into a volume only a
//! cluster admin should hand out). A job that fails here waits, Stalled with the reason, and
//! proceeds by itself once fixed.

use graft_api::FineTuneJob;
use graft_engine::storage::ObjectUri;

use crate::conditions;

/// Why a job cannot start yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

/// What the reconciler looked up in the cluster for [`validate`].
#[derive(Clone, Copy, Debug)]
pub struct Lookups {
    /// Whether `spec.storage.secretRef` names an existing Secret (true when none is referenced).
    pub secret_exists: bool,
}

/// The name of the Secret `ftj` needs, if any.
pub fn secret_name(ftj: &FineTuneJob) -> Option<&str> {
    ftj.spec
        .storage
        .as_ref()?
        .secret_ref
        .as_ref()
        .map(|s| s.name.as_str())
}

/// The URI schemes the operator lets FineTuneJobs use.
#[derive(Clone, Debug)]
pub struct Schemes {
    /// Base models (`s3`, `file`, `hf`): what the trainers can read.
    pub model: Vec<String>,
    /// Outputs (`s3`, `file`).
    pub output: Vec<String>,
}

/// Checks `ftj` against what the cluster has and what the operator was configured to allow.
pub fn validate(ftj: &FineTuneJob, schemes: &Schemes, lookups: Lookups) -> Result<(), Blocked> {
    let model_schemes = &schemes.model;
    let uri = &ftj.spec.base_model.uri;
    let scheme = uri
        .parse::<ObjectUri>()
        .map_err(|e| Blocked {
            reason: conditions::UNSUPPORTED_MODEL_SOURCE,
            message: e.to_string(),
        })?
        .scheme();
    if !model_schemes.iter().any(|s| s == scheme) {
        return Err(Blocked {
            reason: conditions::UNSUPPORTED_MODEL_SOURCE,
            message: format!(
                "base model {uri}: {scheme}:// is not enabled on this operator (enabled: {}); \
                 copy the model to one of those or ask the cluster admin to enable {scheme}",
                model_schemes.join(", ")
            ),
        });
    }
    let output = &ftj.spec.output.uri;
    let output_scheme = output
        .parse::<ObjectUri>()
        .map_err(|e| Blocked {
            reason: conditions::UNSUPPORTED_OUTPUT,
            message: e.to_string(),
        })?
        .scheme();
    if !schemes.output.iter().any(|s| s == output_scheme) {
        return Err(Blocked {
            reason: conditions::UNSUPPORTED_OUTPUT,
            message: format!(
                "output {output}: {output_scheme}:// outputs are not allowed on this operator \
                 (allowed: {}); write the adapter to object storage",
                schemes.output.join(", ")
            ),
        });
    }
    if !lookups.secret_exists {
        let name = secret_name(ftj).unwrap_or_default();
        return Err(Blocked {
            reason: conditions::SECRET_NOT_FOUND,
            message: format!(
                "Secret {name:?} (spec.storage.secretRef) does not exist in this namespace; \
                 the job starts once it does"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fine_tune_job::fixtures::job_from_yaml;

    const FULL: &str = include_str!("fixtures/full.yaml");

    fn schemes(list: &[&str]) -> Schemes {
        Schemes {
            model: list.iter().map(|&s| s.to_owned()).collect(),
            output: vec!["s3".to_owned()],
        }
    }

    #[test]
    fn a_job_with_its_secret_and_an_enabled_scheme_may_start() {
        let ftj = job_from_yaml(FULL);
        let found = Lookups {
            secret_exists: true,
        };
        assert_eq!(validate(&ftj, &schemes(&["s3", "file"]), found), Ok(()));
    }

    #[test]
    fn a_missing_secret_blocks_with_its_name() {
        let ftj = job_from_yaml(FULL);
        let missing = Lookups {
            secret_exists: false,
        };
        let blocked = validate(&ftj, &schemes(&["s3"]), missing).expect_err("blocked");
        assert_eq!(blocked.reason, conditions::SECRET_NOT_FOUND);
        let name = secret_name(&ftj).expect("the fixture references a Secret");
        assert!(blocked.message.contains(name), "{}", blocked.message);
    }

    #[test]
    fn a_disabled_scheme_blocks_and_says_which_are_enabled() {
        let mut ftj = job_from_yaml(FULL);
        ftj.spec.base_model.uri = "hf://meta-llama/Llama-3.1-8B".to_owned();
        let found = Lookups {
            secret_exists: true,
        };
        let blocked = validate(&ftj, &schemes(&["s3", "file"]), found).expect_err("blocked");
        assert_eq!(blocked.reason, conditions::UNSUPPORTED_MODEL_SOURCE);
        assert!(blocked.message.contains("hf://"), "{}", blocked.message);
        assert!(blocked.message.contains("s3, file"), "{}", blocked.message);
    }

    #[test]
    fn a_file_output_waits_unless_the_operator_allows_it() {
        let mut ftj = job_from_yaml(FULL);
        ftj.spec.output.uri = "file:///adapters/support-bot/".to_owned();
        let found = Lookups {
            secret_exists: true,
        };
        let blocked = validate(&ftj, &schemes(&["s3"]), found).expect_err("blocked");
        assert_eq!(blocked.reason, conditions::UNSUPPORTED_OUTPUT);
        let mut allowed = schemes(&["s3"]);
        allowed.output.push("file".to_owned());
        assert_eq!(validate(&ftj, &allowed, found), Ok(()));
    }
}
