//! The adapter registry: which versions each adapter name serves and with what traffic
//! weights, and which versions are in memory.
//!
//! A `PUT` loads and checks every version first and only then swaps the name's version list
//! in one step, so a request sees either the old list or the new one, and a refused adapter
//! changes nothing. Memory holds at most `--max-loaded-adapters` versions: the least recently
//! used are dropped from memory (their verified files stay on disk) and read back from disk
//! when a request picks them again.

mod load;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use graft_api::{AdapterAssignment, AdapterListing, AssignedVersion, LoadState, VersionState};
use graft_engine::{rng::Rng, storage::S3Options};
pub use load::{LoadError, LoadedAdapter};

use crate::{metrics::Metrics, model::BaseModel};

/// Most versions one adapter name may split its traffic over.
const MAX_VERSIONS: usize = 8;

#[derive(Debug)]
pub struct Registry {
    model: Arc<BaseModel>,
    s3: S3Options,
    cache: PathBuf,
    max_loaded: usize,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Per digest, held while a request reloads an evicted version.
    reloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug)]
struct State {
    names: BTreeMap<String, Vec<Version>>,
    /// In memory, by digest.
    resident: HashMap<String, Resident>,
    /// Digests a `put` is loading now (not listed yet): their disk copies must stay.
    loading: HashMap<String, usize>,
    clock: u64,
    rng: Rng,
}

#[derive(Clone, Debug)]
struct Version {
    spec: AssignedVersion,
    loaded_at: Option<jiff::Timestamp>,
    error: Option<String>,
}

#[derive(Debug)]
struct Resident {
    adapter: Arc<LoadedAdapter>,
    last_used: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PickError {
    #[error("adapter {name:?}: {reason}")]
    Unavailable { name: String, reason: String },
}

impl Registry {
    pub fn new(
        model: Arc<BaseModel>,
        s3: S3Options,
        cache: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_loaded = model.info.max_loaded_adapters.max(1);
        let seed = crate::sampling::clock_seed();
        Self {
            model,
            s3,
            cache,
            max_loaded,
            metrics,
            reloads: Mutex::new(HashMap::new()),
            state: Mutex::new(State {
                names: BTreeMap::new(),
                resident: HashMap::new(),
                loading: HashMap::new(),
                clock: 0,
                rng: Rng::seed(seed),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adapter names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().names.keys().cloned().collect()
    }

    /// Versions in memory.
    pub fn resident(&self) -> usize {
        self.lock().resident.len()
    }

    /// The version a new request for `name` uses, chosen by weight; `None` for an unknown
    /// name. A version dropped from memory is read back from disk (or fetched again).
    pub async fn pick(&self, name: &str) -> Result<Option<Arc<LoadedAdapter>>, PickError> {
        let spec = {
            let mut state = self.lock();
            let Some(versions) = state.names.get(name) else {
                return Ok(None);
            };
            let total: u64 = versions.iter().map(|v| u64::from(v.spec.weight)).sum();
            let index = if total == 0 {
                0
            } else {
                let mut target = state.rng.next_u64() % total;
                let versions = &state.names[name];
                versions
                    .iter()
                    .position(|v| {
                        let w = u64::from(v.spec.weight);
                        if target < w {
                            true
                        } else {
                            target -= w;
                            false
                        }
                    })
                    .unwrap_or(0)
            };
            let spec = state.names[name][index].spec.clone();
            state.clock += 1;
            let now = state.clock;
            if let Some(resident) = state.resident.get_mut(&spec.sha256) {
                resident.last_used = now;
                return Ok(Some(resident.adapter.clone()));
            }
            spec
        };
        // One reload per digest at a time: requests arriving meanwhile wait for it and then
        // find the version in memory, instead of each fetching and parsing it again.
        let gate = self.reload_gate(&spec.sha256);
        let _reloading = gate.lock().await;
        let resident = self
            .lock()
            .resident
            .get(&spec.sha256)
            .map(|r| r.adapter.clone());
        if let Some(adapter) = resident {
            return Ok(Some(adapter));
        }
        let loaded = self.load(&spec).await;
        let mut state = self.lock();
        let adapter = match loaded {
            Ok(adapter) => adapter,
            Err(e) => {
                for version in state.names.get_mut(name).into_iter().flatten() {
                    if version.spec.sha256 == spec.sha256 {
                        version.error = Some(e.to_string());
                    }
                }
                return Err(PickError::Unavailable {
                    name: name.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        let adapter = self.admit(&mut state, adapter, &HashSet::new());
        for version in state.names.get_mut(name).into_iter().flatten() {
            if version.spec.sha256 == spec.sha256 {
                version.error = None;
            }
        }
        Ok(Some(adapter))
    }

    fn reload_gate(&self, sha256: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self
            .reloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Gates nobody holds or waits for are dropped, so the map stays small.
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        gates.entry(sha256.to_owned()).or_default().clone()
    }

    /// Loads every version of `assignment`, then makes it what `name` serves. On error
    /// nothing changes.
    pub async fn put(&self, name: &str, assignment: &AdapterAssignment) -> Result<(), LoadError> {
        self.check(name, assignment)?;
        let _loading = Loading::new(
            self,
            assignment
                .versions
                .iter()
                .map(|v| v.sha256.clone())
                .collect(),
        );
        let mut loaded = Vec::with_capacity(assignment.versions.len());
        for version in &assignment.versions {
            let resident = self
                .lock()
                .resident
                .get(&version.sha256)
                .map(|r| r.adapter.clone());
            let adapter = match resident {
                Some(adapter) => adapter,
                None => self.load(version).await?,
            };
            loaded.push(adapter);
        }
        let now = jiff::Timestamp::now();
        let mut state = self.lock();
        let previous = state.names.get(name).cloned().unwrap_or_default();
        let pinned: HashSet<String> = loaded.iter().map(|a| a.sha256.clone()).collect();
        for adapter in loaded {
            self.admit(&mut state, adapter, &pinned);
        }
        let versions = assignment
            .versions
            .iter()
            .map(|spec| Version {
                spec: spec.clone(),
                loaded_at: previous
                    .iter()
                    .find(|p| p.spec.sha256 == spec.sha256)
                    .and_then(|p| p.loaded_at)
                    .or(Some(now)),
                error: None,
            })
            .collect();
        state.names.insert(name.to_owned(), versions);
        self.forget_unlisted(&mut state);
        Ok(())
    }

    /// Records `name` as assigned but failed (an adapter from the start-up file that did not
    /// load), so the admin listing shows why.
    pub fn record_failure(&self, name: &str, assignment: &AdapterAssignment, error: &LoadError) {
        let versions = assignment
            .versions
            .iter()
            .map(|spec| Version {
                spec: spec.clone(),
                loaded_at: None,
                error: Some(error.to_string()),
            })
            .collect();
        self.lock().names.insert(name.to_owned(), versions);
    }

    /// Stops serving `name`; false if it was not served.
    pub fn delete(&self, name: &str) -> bool {
        let mut state = self.lock();
        let existed = state.names.remove(name).is_some();
        self.forget_unlisted(&mut state);
        existed
    }

    pub fn listing(&self) -> AdapterListing {
        let state = self.lock();
        let adapters = state
            .names
            .iter()
            .map(|(name, versions)| {
                let versions = versions
                    .iter()
                    .map(|v| {
                        let sha = &v.spec.sha256;
                        let (state, error) = if state.resident.contains_key(sha) {
                            (LoadState::Loaded, None)
                        } else if let Some(error) = &v.error {
                            (LoadState::Failed, Some(error.clone()))
                        } else {
                            (LoadState::Offloaded, None)
                        };
                        VersionState {
                            uri: v.spec.uri.clone(),
                            sha256: sha.clone(),
                            weight: v.spec.weight,
                            state,
                            error,
                            loaded_at: v.loaded_at.map(|t| t.to_string()),
                        }
                    })
                    .collect();
                (name.clone(), versions)
            })
            .collect();
        AdapterListing { adapters }
    }

    fn check(&self, name: &str, assignment: &AdapterAssignment) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::Invalid(m));
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
        {
            return invalid(format!(
                "adapter name {name:?}: use 1-253 letters, digits and - _ . : /"
            ));
        }
        if name == self.model.info.model {
            return invalid(format!("adapter name {name:?} is the base model's name"));
        }
        let versions = &assignment.versions;
        if versions.is_empty() || versions.len() > MAX_VERSIONS {
            return invalid(format!("versions: give 1 to {MAX_VERSIONS}"));
        }
        let mut seen = HashSet::new();
        for v in versions {
            if !load::is_digest(&v.sha256) {
                return invalid(format!(
                    "version {}: sha256 {:?} is not 64 lower-case hex digits",
                    v.uri, v.sha256
                ));
            }
            if !seen.insert(&v.sha256) {
                return invalid(format!("version {}: listed twice", v.sha256));
            }
        }
        if versions.iter().all(|v| v.weight == 0) {
            return invalid("versions: at least one weight must be above 0".to_owned());
        }
        Ok(())
    }

    async fn load(&self, spec: &AssignedVersion) -> Result<Arc<LoadedAdapter>, LoadError> {
        let started = Instant::now();
        let result = async {
            let files = load::fetch(&spec.uri, &spec.sha256, &self.s3, &self.cache).await?;
            let model = self.model.clone();
            let (uri, sha) = (spec.uri.clone(), spec.sha256.clone());
            tokio::task::spawn_blocking(move || load::read(&files, &uri, &sha, &model))
                .await
                .map_err(|e| LoadError::Unavailable(format!("loading task: {e}")))?
        }
        .await;
        match &result {
            Ok(_) => self.metrics.adapter_loaded(started.elapsed()),
            Err(_) => self.metrics.adapter_load_failed(),
        }
        result.map(Arc::new)
    }

    /// Keeps `adapter` in memory, dropping the least recently used versions beyond the limit
    /// (never one in `pinned`). Returns the resident copy.
    fn admit(
        &self,
        state: &mut State,
        adapter: Arc<LoadedAdapter>,
        pinned: &HashSet<String>,
    ) -> Arc<LoadedAdapter> {
        state.clock += 1;
        let now = state.clock;
        let adapter = state
            .resident
            .entry(adapter.sha256.clone())
            .or_insert(Resident {
                adapter,
                last_used: now,
            })
            .adapter
            .clone();
        while state.resident.len() > self.max_loaded {
            let victim = state
                .resident
                .iter()
                .filter(|(sha, _)| !pinned.contains(*sha) && **sha != adapter.sha256)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(sha, _)| sha.clone());
            let Some(victim) = victim else { break };
            state.resident.remove(&victim);
        }
        self.metrics.set_loaded_adapters(state.resident.len());
        adapter
    }

    /// Drops from memory and disk every version no name lists any more.
    fn forget_unlisted(&self, state: &mut State) {
        let listed: HashSet<&String> = state
            .names
            .values()
            .flatten()
            .map(|v| &v.spec.sha256)
            .collect();
        let unlisted: Vec<String> = state
            .resident
            .keys()
            .filter(|sha| !listed.contains(sha))
            .cloned()
            .collect();
        for sha in &unlisted {
            state.resident.remove(sha);
        }
        if let Ok(entries) = std::fs::read_dir(self.cache.join("adapters")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if load::is_digest(&name)
                    && !listed.contains(&name)
                    && !state.loading.contains_key(&name)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.metrics.set_loaded_adapters(state.resident.len());
    }
}

/// Marks digests as being loaded for as long as it lives.
struct Loading<'r> {
    registry: &'r Registry,
    digests: Vec<String>,
}

impl<'r> Loading<'r> {
    fn new(registry: &'r Registry, digests: Vec<String>) -> Self {
        let mut state = registry.lock();
        for digest in &digests {
            *state.loading.entry(digest.clone()).or_default() += 1;
        }
        drop(state);
        Self { registry, digests }
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        for digest in &self.digests {
            if let Some(count) = state.loading.get_mut(digest) {
                *count -= 1;
                if *count == 0 {
                    state.loading.remove(digest);
                }
            }
        }
    }
}
