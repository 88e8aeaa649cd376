//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: replicas race to
//! hold the Lease; the holder renews it; the others take over once it has gone unrenewed for
//! its lease duration. Replicas that don't lead stay idle but ready, so a takeover is quick.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election on Lease {name}: {source}")]
    Lease {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader Lease {name}: not renewed for {deadline:?}")]
    Lost { name: String, deadline: Duration },
}

/// Timings of the election. The defaults are client-go's.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How long a Lease holds without renewal before others may take it.
    pub lease_duration: Duration,
    /// The holder gives up leading when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Timings {
    /// client-go's rules: the Lease outlasts the renew deadline, which outlasts a retry (with
    /// its jitter), so the holder always gives up before another replica may take over.
    pub fn validate(&self) -> Result<(), String> {
        let Self {
            lease_duration,
            renew_deadline,
            retry_period,
        } = *self;
        if retry_period.is_zero() {
            return Err("the retry period must be positive".to_owned());
        }
        if lease_duration <= renew_deadline {
            return Err(format!(
                "the lease duration ({lease_duration:?}) must be longer than the renew deadline \
                 ({renew_deadline:?})"
            ));
        }
        if renew_deadline.as_secs_f64() <= 1.2 * retry_period.as_secs_f64() {
            return Err(format!(
                "the renew deadline ({renew_deadline:?}) must be longer than 1.2 times the retry \
                 period ({retry_period:?})"
            ));
        }
        Ok(())
    }
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// The Lease record last seen from another holder, and when we first saw it. Expiry is
    /// judged on our own clock since then, so clock skew between replicas doesn't matter.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
            observed: Mutex::new(None),
        }
    }

    /// Waits until this replica holds the Lease, then runs `work` while renewing it. Returns
    /// `None` when `shutdown` came first, `work`'s output when it finished, or [`Error::Lost`]
    /// when renewal failed for the renew deadline: the caller must stop, since another replica
    /// may be leading by then.
    pub async fn lead<F: Future>(
        &self,
        work: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Option<F::Output>, Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        let acquired = loop {
            let sent = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => break sent,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::select! {
                () = &mut shutdown => return Ok(None),
                () = tokio::time::sleep(self.timings.retry_period) => {}
            }
        };
        info!(lease = %self.name, identity = %self.identity, "became the leader");
        // `work` is expected to end by itself on shutdown (gracefully), so only renewal races it.
        tokio::select! {
            output = work => Ok(Some(output)),
            lost = self.keep_renewing(acquired) => Err(lost),
        }
    }

    /// Gives the Lease up, so a standby replica takes over at once instead of after the
    /// lease duration. Does nothing when another replica holds it.
    pub async fn release(&self) -> Result<(), Error> {
        let Some(mut lease) = self.read().await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(|e| self.error(e))?;
        info!(lease = %self.name, "released the leader Lease");
        Ok(())
    }

    async fn keep_renewing(&self, acquired: Instant) -> Error {
        let mut last_renewal = acquired;
        loop {
            tokio::time::sleep(self.timings.retry_period).await;
            // A request hanging in a partition must not outlive the deadline: by then another
            // replica may lead.
            let left = self
                .timings
                .renew_deadline
                .saturating_sub(last_renewal.elapsed());
            // The renewal counts from when it was sent: the apiserver may have stored it at any
            // moment until the answer came, and other replicas time the Lease from then.
            let sent = Instant::now();
            let attempt = tokio::time::timeout(left, self.try_acquire_or_renew())
                .await
                .unwrap_or_else(|_elapsed| Err(self.timed_out()));
            match attempt {
                Ok(true) => last_renewal = sent,
                Ok(false) => {
                    return Error::Lost {
                        name: self.name.clone(),
                        deadline: Duration::ZERO,
                    };
                }
                Err(e) => warn!(error = %e, "renewing the leader Lease failed"),
            }
            if last_renewal.elapsed() > self.timings.renew_deadline {
                return Error::Lost {
                    name: self.name.clone(),
                    deadline: self.timings.renew_deadline,
                };
            }
        }
    }

    /// One attempt; true when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.read().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return self.won(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() {
            let version = lease.metadata.resource_version.clone().unwrap_or_default();
            let held_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.timings.lease_duration, Duration::from_secs);
            if !self.expired(version, held_for) {
                return Ok(false);
            }
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // `replace` carries the resourceVersion we read: of two replicas racing for an expired
        // Lease, exactly one write succeeds.
        self.won(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    async fn read(&self) -> Result<Option<Lease>, Error> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.error(e))
    }

    fn expired(&self, version: String, held_for: Duration) -> bool {
        let mut observed = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*observed {
            Some((seen, since)) if *seen == version => since.elapsed() > held_for,
            _ => {
                *observed = Some((version, Instant::now()));
                false
            }
        }
    }

    fn won(&self, result: Result<Lease, kube::Error>) -> Result<bool, Error> {
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    fn timed_out(&self) -> Error {
        Error::Lost {
            name: self.name.clone(),
            deadline: self.timings.renew_deadline,
        }
    }

    fn error(&self, source: kube::Error) -> Error {
        Error::Lease {
            name: self.name.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(lease: u64, renew: u64, retry: u64) -> Timings {
        Timings {
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn timings_must_let_the_holder_give_up_before_another_may_take_over() {
        assert_eq!(Timings::default().validate(), Ok(()));
        assert_eq!(timings(4, 3, 1).validate(), Ok(()));
        for (bad, needle) in [
            (timings(10, 10, 2), "lease duration"),
            (timings(10, 15, 2), "lease duration"),
            (timings(15, 2, 2), "1.2 times"),
            (timings(15, 10, 0), "positive"),
        ] {
            let error = bad.validate().expect_err("invalid");
            assert!(error.contains(needle), "{error}");
        }
    }
}
