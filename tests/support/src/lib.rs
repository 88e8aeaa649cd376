//! The test harness: real `etcd`, `kube-apiserver` (plus `kube-controller-manager` and
//! `kube-scheduler` on request), a real S3-protocol server and `helm`, all on 127.0.0.1.
//!
//! `tests/controlplane/install.sh` builds the binaries and caches them by version; this crate
//! finds them there. One control plane and one S3 server are shared per test binary (started
//! on first use); tests isolate themselves by namespace and bucket. Every process is killed
//! when the test binary exits, also when a test panics or the binary itself is killed.

mod control_plane;
mod daemon;
mod models;
mod pki;
mod process;
mod s3;
mod tools;

pub use control_plane::{ControlPlane, install_crds};
pub use daemon::{Daemon, eventually};
pub use models::{smollm2_first_layers, smollm2_gguf};
pub use s3::S3Server;
pub use tools::tool;

/// The repository's root. Read at run time (cargo sets `CARGO_MANIFEST_DIR` for every test
/// process) rather than baked in with `env!`: a shared, cached target directory may hold a test
/// binary compiled in another checkout of the same commit.
pub fn repo_root() -> std::path::PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("CARGO_MANIFEST_DIR is set: run tests through cargo");
    std::path::Path::new(&manifest_dir)
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .expect("the package lies inside the workspace")
        .to_path_buf()
}

/// A name unique within this test run, for namespaces and buckets.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// The Python of the Hugging Face oracle's virtual environment, `$GRAFT_ORACLE_PYTHON`.
///
/// # Panics
/// When it is not set, with the command that sets it.
pub fn oracle_python() -> std::path::PathBuf {
    std::env::var_os("GRAFT_ORACLE_PYTHON").map_or_else(
        || {
            panic!(
                "GRAFT_ORACLE_PYTHON is not set: run `export GRAFT_ORACLE_PYTHON=$(bash \
                 tests/oracle/venv.sh)` (a cached venv with torch, transformers, peft and openai; \
                 tests/run.sh does this)"
            )
        },
        std::path::PathBuf::from,
    )
}

/// The Python of the AdapterHub library's environment (layered on the oracle's),
/// `$GRAFT_ADAPTERHUB_PYTHON`.
///
/// # Panics
/// When it is not set, with the command that sets it.
pub fn adapterhub_python() -> std::path::PathBuf {
    std::env::var_os("GRAFT_ADAPTERHUB_PYTHON").map_or_else(
        || {
            panic!(
                "GRAFT_ADAPTERHUB_PYTHON is not set: run `export GRAFT_ADAPTERHUB_PYTHON=$(bash \
                 tests/oracle/venv.sh adapterhub)` (the AdapterHub adapters library and the \
                 transformers it pins; tests/run.sh does this)"
            )
        },
        std::path::PathBuf::from,
    )
}

/// A binary of another package of the workspace, built beside the running test binary
/// (`target/<profile>/<name>`): `cargo test --workspace` builds every package's binaries.
///
/// # Panics
/// When it has not been built, with the command that builds it.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p {name}` (cargo test --workspace builds it)",
        path.display()
    );
    path
}
