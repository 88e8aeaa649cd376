use std::path::PathBuf;

/// The versions `install.sh` builds, shared with it so both always agree.
const VERSIONS: &str = include_str!("../../controlplane/versions.env");

fn version(key: &str) -> &'static str {
    VERSIONS
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map_or_else(
            || panic!("{key} missing from tests/controlplane/versions.env"),
            |(_, v)| v.trim(),
        )
}

/// The cached binary `name`, built by `tests/controlplane/install.sh`.
///
/// # Panics
/// When the binary is missing, with the command that builds it.
pub fn tool(name: &str) -> PathBuf {
    let dir = match name {
        "etcd" => format!("etcd-{}", version("ETCD_VERSION")),
        "kube-apiserver" | "kube-controller-manager" | "kube-scheduler" | "kubectl" => {
            format!("kubernetes-{}", version("KUBERNETES_VERSION"))
        }
        "helm" => format!("helm-{}", version("HELM_VERSION")),
        "s3s-fs" => format!("s3s-fs-{}", version("S3S_FS_VERSION")),
        "argocd-lua" => format!(
            "argocd-lua-{}-r{}",
            version("GOPHER_LUA_VERSION"),
            version("ARGOCD_LUA_REVISION")
        ),
        other => panic!("unknown test tool {other}"),
    };
    let path = tools_dir().join(dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `bash tests/controlplane/install.sh` first",
        path.display()
    );
    path
}

fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAFT_TOOLS_DIR") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/graft/tools")
}
